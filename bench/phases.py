"""The pipelines the benchmarks run, in process or in a bench server.

A server picks one with ``PIPELINE_PHASES=bench.phases:NAME``.
"""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Connection

from pipeline.orchestrator import Phase, RunContext


def noop(conn: Connection, ctx: RunContext) -> None:
    """Nothing: what is left is the orchestrator's own cost."""


def noop_registry(n: int) -> list[Phase]:
    return [(i, f"Phase {i}", noop) for i in range(1, n + 1)]


NOOP5 = noop_registry(5)
# Phase-count independence (bench/watching.py): `pipeline run --wait` of each.
NOOP100 = noop_registry(100)
NOOP10000 = noop_registry(10_000)

_INSERT = text("INSERT INTO bench_rows (run_id, phase, n, value) VALUES (:r, :p, :n, :v)")


def writes(conn: Connection, ctx: RunContext) -> None:
    """A small burst of writes (10 rows), as a real phase ends."""
    conn.execute(
        _INSERT,
        [{"r": ctx.run_id, "p": ctx.phase_num, "n": n, "v": n * 0.5} for n in range(10)],
    )


WRITE5 = [(i, f"Write {i}", writes) for i in range(1, 6)]

_LEDGER = text("INSERT INTO bench_ledger (run_id, phase) VALUES (:r, :p)")


def one_insert(conn: Connection, ctx: RunContext) -> None:
    """One row: what bench.postgres's Procrastinate job does in each of its 5 transactions."""
    conn.execute(_LEDGER, {"r": ctx.run_id, "p": ctx.phase_num})


INSERT5 = [(i, f"Insert {i}", one_insert) for i in range(1, 6)]

# -- runs that write progress while the API is under load ----------------------------

PROGRESS_STEPS = 20
PROGRESS_STEP_SECONDS = 0.002


def progressing(conn: Connection, ctx: RunContext) -> None:
    """Work outside the lock with sub-progress (20 x 2 ms), then 20 rows in one burst."""
    for step in range(1, PROGRESS_STEPS + 1):
        ctx.raise_if_cancelled()
        time.sleep(PROGRESS_STEP_SECONDS)
        ctx.progress(step, PROGRESS_STEPS)
    conn.execute(
        _INSERT,
        [{"r": ctx.run_id, "p": ctx.phase_num, "n": n, "v": n * 0.5} for n in range(20)],
    )


PROGRESS = [(1, "Fetch", progressing), (2, "Score", progressing), (3, "Report", progressing)]

# -- runs that stay running until released (memory) -----------------------------------

BLOCK_LIMIT_SECONDS = 60.0


def blocks(conn: Connection, ctx: RunContext) -> None:
    """Hold a runner until the file ``params["release"]`` exists (60 s at most)."""
    release = Path(str(ctx.params.get("release", "")))
    deadline = time.monotonic() + BLOCK_LIMIT_SECONDS
    while not release.exists() and time.monotonic() < deadline:
        ctx.raise_if_cancelled()
        time.sleep(0.02)


BLOCK = [(1, "Block", blocks)]
