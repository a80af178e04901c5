"""Phase-count independence: a phase costs the same in a run of 100 phases and of 10,000.

``pipeline run --wait`` (a real subprocess: the runner, its watcher and the
progress bars in one process) executes a run of 100 and a run of 10,000 no-op
phases; the figure is the run's span in the database (first phase started to
last phase finished) divided by its phases. A watcher whose reads grow with
the number of phases (it used to read every phase row ten times a second)
takes CPU from the runner and makes the long run's phases dearer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import sqlalchemy as sa

from bench.common import ROOT, Row, Target, Workdir, interleaved, url_of
from pipeline import db
from pipeline.schema import run_phases


def per_phase_ms(workdir: Workdir, phases: int) -> float:
    path = workdir.fresh_db(f"watching-{phases}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        PIPELINE_DATABASE_URL=url_of(path),
        PIPELINE_PHASES=f"bench.phases:NOOP{phases}",
    )
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--wait"],
        env=env,
        capture_output=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"run --wait exited {done.returncode}: {done.stderr[-2000:]!r}")
    engine = db.create_engine(url_of(path))
    query = sa.select(
        sa.func.min(run_phases.c.started_at),
        sa.func.max(run_phases.c.finished_at),
        sa.func.count(),
    )
    try:
        with db.read(engine) as conn:
            start, end, count = conn.execute(query).one()
    finally:
        engine.dispose()
    if count != phases:
        raise RuntimeError(f"{count} phase rows, expected {phases}")
    return float((end - start).total_seconds() * 1000 / phases)


def bench_watching(workdir: Workdir, quick: bool) -> list[Row]:
    reps = 1 if quick else 3
    long, short = interleaved(
        reps, lambda: per_phase_ms(workdir, 10_000), lambda: per_phase_ms(workdir, 100)
    )
    return [
        Row(
            bench="watching",
            measure="`run --wait`: cost of a phase at 10,000 phases vs at 100",
            unit="ms/phase",
            pipeline=long,
            reference=short,
            ref_name="100 phases",
            target=Target("<=", 1.2),
        )
    ]


BENCHMARKS: dict[str, Callable[[Workdir, bool], list[Row]]] = {"watching": bench_watching}
