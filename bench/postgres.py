"""PostgreSQL: runs/s of 2 ``pipeline worker`` (concurrency 4 each) against Procrastinate.

The same workload on both sides: 500 runs (jobs) of 5 transactions with one
INSERT each, queued at once in one transaction while the workers are idle;
the figure is runs completed per second from the queueing to the last one.
Each repetition uses a fresh database; the two sides are interleaved. Needs a
PostgreSQL server: ``BENCH_POSTGRES_URL`` (or ``PIPELINE_TEST_POSTGRES_URL``,
which ``.ci/run`` sets), a SQLAlchemy URL of a database whose server lets
this user create databases.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.common import ROOT, Row, Target, Workdir, interleaved, tail_of_log

WORKERS, CONCURRENCY = 2, 4


def server_url() -> str | None:
    return os.environ.get("BENCH_POSTGRES_URL") or os.environ.get("PIPELINE_TEST_POSTGRES_URL")


@contextlib.contextmanager
def fresh_database(url: str) -> Iterator[str]:
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    name = f"bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield sa.make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _start(argv: Sequence[str], env: dict[str, str], logs: Path, ready: str) -> list[Any]:
    processes = []
    for index in range(WORKERS):
        log = logs.with_name(f"{logs.name}-{index}.log")
        with log.open("wb") as out:
            processes.append(
                (subprocess.Popen(list(argv), env=env, stdout=out, stderr=subprocess.STDOUT), log)
            )
    deadline = time.monotonic() + 60
    for process, log in processes:
        while ready not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"a worker did not start:\n{tail_of_log(log)}")
            time.sleep(0.05)
    return processes


def _stop(processes: list[Any]) -> None:
    for process, _ in processes:
        process.terminate()
    for process, _ in processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _wait_for(engine: sa.Engine, query: str, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            if conn.exec_driver_sql(query).scalar_one() >= count:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done in {timeout}s: {query}")
        time.sleep(0.01)


def pipeline_runs_per_s(workdir: Workdir, url: str, runs: int) -> float:
    from pipeline import db
    from pipeline import runs as runs_module

    with fresh_database(url) as database:
        db.migrate(database)
        engine = db.create_engine(database)
        try:
            with db.write(engine) as conn:
                conn.exec_driver_sql("CREATE TABLE bench_ledger (run_id bigint, phase int)")
            env = _environment(
                PIPELINE_DATABASE_URL=database, PIPELINE_PHASES="bench.phases:INSERT5"
            )
            argv = [sys.executable, "-m", "pipeline.cli", "worker", "--concurrency", "4"]
            workers = _start(argv, env, workdir.file("pg-pipeline"), "ready")
            try:
                started = time.perf_counter()
                with db.write(engine) as conn:
                    for _ in range(runs):
                        runs_module.create_run(conn, params={}, pipeline="insert5")
                _wait_for(
                    engine, "SELECT count(*) FROM analysis_runs WHERE status = 'completed'", runs
                )
                elapsed = time.perf_counter() - started
            finally:
                _stop(workers)
            with engine.connect() as conn:
                rows = conn.exec_driver_sql("SELECT count(*) FROM bench_ledger").scalar_one()
            if rows != runs * 5:
                raise RuntimeError(f"{rows} ledger rows for {runs} runs")
        finally:
            engine.dispose()
    return runs / elapsed


def procrastinate_runs_per_s(workdir: Workdir, url: str, runs: int) -> float:
    import psycopg

    with fresh_database(url) as database:
        conninfo = (
            sa.make_url(database).set(drivername="postgresql").render_as_string(hide_password=False)
        )
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("CREATE TABLE bench_ledger (run_id bigint, phase int)")
        from bench import procrastinate_jobs

        app = procrastinate_jobs.make_app(conninfo)
        env = _environment(BENCH_PG_CONNINFO=conninfo)
        argv = [
            sys.executable,
            "-m",
            "procrastinate",
            "--app=bench.procrastinate_jobs.app",
            "worker",
            "--concurrency",
            str(CONCURRENCY),
        ]
        engine = sa.create_engine(database, poolclass=sa.NullPool)
        with app.open():
            app.schema_manager.apply_schema()
            workers = _start(argv, env, workdir.file("pg-procrastinate"), "Starting worker")
            try:
                started = time.perf_counter()
                jobs: list[dict[str, Any]] = [{"run_id": i} for i in range(runs)]
                app.configure_task("five").batch_defer(*jobs)
                _wait_for(
                    engine,
                    "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'",
                    runs,
                )
                elapsed = time.perf_counter() - started
            finally:
                _stop(workers)
                engine.dispose()
    return runs / elapsed


def bench_postgres(workdir: Workdir, quick: bool) -> list[Row]:
    url = server_url()
    if url is None:
        print("  postgres: skipped (set BENCH_POSTGRES_URL)", flush=True)
        return []
    runs, reps = (500, 1) if quick else (500, 3)
    ours, theirs = interleaved(
        reps,
        lambda: pipeline_runs_per_s(workdir, url, runs),
        lambda: procrastinate_runs_per_s(workdir, url, runs),
    )
    return [
        Row(
            bench="postgres",
            measure=f"{runs} runs x 5 one-INSERT transactions, {WORKERS} workers x {CONCURRENCY}",
            unit="runs/s",
            pipeline=ours,
            reference=theirs,
            ref_name="Procrastinate, same",
            target=Target(">=", 1.0),
        )
    ]


BENCHMARKS: dict[str, Callable[[Workdir, bool], list[Row]]] = {"postgres": bench_postgres}
