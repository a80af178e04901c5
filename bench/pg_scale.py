"""PostgreSQL at scale: a claim, a boundary, GET /runs/{id} and GET /runs, big vs almost empty.

Two scratch databases on the server of ``BENCH_POSTGRES_URL`` (see
``bench/postgres.py``), migrated by ``pipeline.db.migrate``:

* big: 1,000,000 completed runs of 5 phase rows each, then 10,000 queued runs
  (100,000 + 1,000 with ``--quick``), written by the server itself
  (``INSERT ... SELECT FROM generate_series``), then ``VACUUM (ANALYZE)``, as
  autovacuum would have left a database of that age;
* almost empty: 10 completed runs and 60 queued, the same way. 60 and not 10
  queued so that the first page of GET /runs holds the same 50 queued runs on
  both (the newest runs are the queued ones): the same work, on two sizes.

The operations, each as the project calls them (``pipeline.runs``) on one
engine per database (``pipeline.db.create_engine``):

* claim: ``runs.claim`` in a transaction that is **rolled back**, so that
  the queue keeps its size and every claim takes the same oldest queued run;
* boundary: ``runs.finish_phase`` (phase 1 done, phase 2 running) of a run
  claimed and committed beforehand, in a transaction that is rolled back, so
  that each one crosses the same boundary;
* GET /runs/{id}: ``runs.get_run`` of a completed run in the middle of the
  ids, in ``db.read``;
* first page of GET /runs: ``runs.list_runs(limit=50)``, in ``db.read``.

A rollback costs what a commit costs minus the WAL flush, on both sides
alike. Each repetition times a batch of each operation on each database
(interleaved), and keeps the median per operation. Then one more execution of
each, with a ``before_cursor_execute`` listener, gives the statements it
sends; each is explained on another connection with the same parameters
(``EXPLAIN``: the custom plan PostgreSQL makes for those values) and as a
generic plan (``PREPARE`` + ``plan_cache_mode = force_generic_plan``: what a
prepared statement may use after psycopg prepares it, at its 5th execution on
a connection). Row figure: statements with a ``Seq Scan`` of
``analysis_runs`` or ``run_phases`` in either plan, at the big size.
"""

from __future__ import annotations

import datetime as dt
import re
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from bench.common import Row, Target, Workdir, interleaved
from bench.postgres import fresh_database, server_url
from pipeline import db, runs

PIPELINE = "pgscale5"
PHASES = [(1, "A"), (2, "B"), (3, "C"), (4, "D"), (5, "E")]
REGISTRY = {PIPELINE: PHASES}
OWNER = "bench-pg-scale:1:0:main"  # host:pid:process-start:thread, as pipeline.liveness makes
EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

SMALL_FINISHED, SMALL_QUEUED = 10, 60
GENERIC = " (generic plan)"
SCANNED = re.compile(r"Seq Scan on (analysis_runs|run_phases)\b")

# -- filling a database on the server --------------------------------------------------

# Run i was created at EPOCH + 10 i s, started 1 s later; phase n ran from
# started + (n-1) s to started + n s; the run completed with its 5th phase.
_FILL_FINISHED = """
INSERT INTO analysis_runs (id, status, pipeline, params, current_phase, phase_label,
    progress_current, progress_total, created_at, started_at, completed_at)
SELECT i, 'completed', %(pipeline)s, '{}'::json, 5, 'E', 5, 5,
    %(epoch)s::timestamptz + i * interval '10 seconds',
    %(epoch)s::timestamptz + i * interval '10 seconds' + interval '1 second',
    %(epoch)s::timestamptz + i * interval '10 seconds' + interval '6 seconds'
FROM generate_series(1, %(finished)s) AS i
"""
# Five rows per run in run_id, phase_num order (as claims insert them), no sort.
_FILL_PHASES = """
INSERT INTO run_phases (run_id, phase_num, label, status, attempts, started_at, finished_at)
SELECT r, n, chr(64 + n), 'completed', 1,
    %(epoch)s::timestamptz + r * interval '10 seconds' + n * interval '1 second',
    %(epoch)s::timestamptz + r * interval '10 seconds' + (n + 1) * interval '1 second'
FROM generate_series(0, 5 * %(finished)s - 1) AS k,
    LATERAL (SELECT k / 5 + 1 AS r, k %% 5 + 1 AS n) AS ids
"""
_FILL_QUEUED = """
INSERT INTO analysis_runs (id, status, pipeline, params, progress_current, created_at)
SELECT i, 'queued', %(pipeline)s, '{}'::json, 0,
    %(epoch)s::timestamptz + i * interval '10 seconds'
FROM generate_series(%(finished)s + 1, %(finished)s + %(queued)s) AS i
"""
_SET_SEQUENCE = (
    "SELECT setval(pg_get_serial_sequence('analysis_runs', 'id'), max(id)) FROM analysis_runs"
)


def fill(url: str, finished: int, queued: int) -> float:
    """Write the runs and phases (one transaction), VACUUM (ANALYZE); the seconds it took.

    The foreign-key checks of 5 phase rows per run are most of the cost of
    such an INSERT; a superuser skips them (``session_replication_role =
    replica``: the rows are consistent by construction), others pay them.
    """
    started = time.perf_counter()
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    params = {"pipeline": PIPELINE, "epoch": EPOCH, "finished": finished, "queued": queued}
    try:
        with engine.connect() as conn:
            with conn.begin():
                conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
                superuser = conn.exec_driver_sql(
                    "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
                ).scalar_one()
                if superuser:
                    conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
                conn.exec_driver_sql(_FILL_FINISHED, params)
                conn.exec_driver_sql(_FILL_PHASES, params)
                conn.exec_driver_sql(_FILL_QUEUED, params)
                conn.exec_driver_sql(_SET_SEQUENCE)
            counts: dict[str, int] = dict(
                conn.exec_driver_sql(
                    "SELECT status, count(*) FROM analysis_runs GROUP BY status"
                ).all()
            )
            phases = conn.exec_driver_sql("SELECT count(*) FROM run_phases").scalar_one()
            conn.rollback()
            if counts != {"completed": finished, "queued": queued} or phases != 5 * finished:
                raise RuntimeError(f"filled {counts} runs and {phases} phases")
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM (ANALYZE) analysis_runs, run_phases")
            conn.exec_driver_sql("ANALYZE")
    finally:
        engine.dispose()
    return time.perf_counter() - started


# -- the operations --------------------------------------------------------------------


@dataclass
class Side:
    """One database, its engine, and the ids its operations use."""

    name: str
    url: str
    finished: int
    queued: int
    engine: Engine = field(init=False)
    claimed: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.engine = db.create_engine(self.url)

    @property
    def middle(self) -> int:
        return max(1, self.finished // 2)

    def prepare(self) -> None:
        """Claim one run for good: the boundary's run (running, phase 1 in flight)."""
        with db.write(self.engine) as conn:
            claimed = runs.claim(conn, owner=OWNER, phases=REGISTRY)
        if claimed is None or claimed.run_id != self.finished + 1:
            raise RuntimeError(f"{self.name}: claimed {claimed}, expected run {self.finished + 1}")
        self.claimed = claimed.run_id

    # Each returns nothing and checks what it got: a figure of a no-op would be wrong.

    def claim(self) -> None:
        with self.engine.connect() as conn:
            tx = conn.begin()
            try:
                got = runs.claim(conn, owner=OWNER, phases=REGISTRY)
            finally:
                tx.rollback()
        if got is None or got.run_id != self.claimed + 1:
            raise RuntimeError(f"{self.name}: the claim took {got}")

    def boundary(self) -> None:
        with self.engine.connect() as conn:
            tx = conn.begin()
            try:
                status = runs.finish_phase(
                    conn,
                    run_id=self.claimed,
                    owner=OWNER,
                    phase_num=1,
                    next_phase=PHASES[1],
                    warnings=[],
                )
            finally:
                tx.rollback()
        if status is not runs.RunStatus.RUNNING:
            raise RuntimeError(f"{self.name}: the boundary says {status}")

    def get_run(self) -> None:
        with db.read(self.engine) as conn:
            run = runs.get_run(conn, run_id=self.middle)
        if run is None or len(run.phases) != 5:
            raise RuntimeError(f"{self.name}: GET /runs/{self.middle} read {run}")

    def first_page(self) -> None:
        with db.read(self.engine) as conn:
            page, cursor = runs.list_runs(conn, limit=50)
        if len(page) != 50 or cursor is None:
            raise RuntimeError(f"{self.name}: the first page has {len(page)} runs")


OPERATIONS: dict[str, Callable[[Side], None]] = {
    "claim": Side.claim,
    "boundary": Side.boundary,
    "GET /runs/{id}": Side.get_run,
    "GET /runs first page": Side.first_page,
}


def timer(op: Callable[[Side], None], side: Side, count: int) -> Callable[[], float]:
    """One repetition: ``count`` executions of ``op`` on ``side``; their median, in µs."""

    def repetition() -> float:
        samples = []
        for _ in range(count):
            began = time.perf_counter()
            op(side)
            samples.append((time.perf_counter() - began) * 1e6)
        return statistics.median(samples)

    return repetition


# -- query plans -----------------------------------------------------------------------

_EXPLAINED = ("SELECT", "UPDATE", "INSERT", "DELETE", "WITH")
_BIND = re.compile(r"%\((\w+)\)s")


@contextmanager
def captured(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """Every statement (and its parameters) the engine sends meanwhile."""
    found: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        found.append((statement, params))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        yield found
    finally:
        event.remove(engine, "before_cursor_execute", capture)


def _table(statement: str) -> str:
    found = re.search(r"\b(?:FROM|UPDATE|INTO)\s+(\w+)", statement)
    return found.group(1) if found else "?"


def _sql_type(value: Any) -> str:
    """The type psycopg would send a value as, for PREPARE (unknown: inferred)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "bigint"
    if isinstance(value, float):
        return "double precision"
    if isinstance(value, dt.datetime):
        return "timestamptz" if value.tzinfo else "timestamp"
    return "unknown"


def _plan(conn: Connection, sql: str, params: Mapping[str, Any]) -> list[str]:
    return [row[0] for row in conn.exec_driver_sql("EXPLAIN " + sql, dict(params))]


def _generic_plan(conn: Connection, sql: str, params: Mapping[str, Any]) -> list[str]:
    """The generic plan: PREPARE with $n for the binds, EXPLAIN EXECUTE, forced generic."""
    import psycopg

    order: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in order:
            order.append(match.group(1))
        return f"${order.index(match.group(1)) + 1}"

    text = _BIND.sub(number, sql).replace("%%", "%")
    types = ", ".join(_sql_type(params[name]) for name in order)
    raw = conn.connection.dbapi_connection
    assert isinstance(raw, psycopg.Connection)
    with psycopg.ClientCursor(raw) as cursor:
        cursor.execute("SET plan_cache_mode = force_generic_plan")
        cursor.execute(f"PREPARE bench_generic{f'({types})' if order else ''} AS {text}")
        try:
            args = ", ".join(f"%({name})s" for name in order)
            cursor.execute(f"EXPLAIN EXECUTE bench_generic{f'({args})' if order else ''}", params)
            return [row[0] for row in cursor.fetchall()]
        finally:
            cursor.execute("DEALLOCATE bench_generic")
            cursor.execute("RESET plan_cache_mode")


def query_plans(side: Side) -> dict[str, list[str]]:
    """Per statement of each operation: its custom plan, then its generic plan if it differs."""
    plans: dict[str, list[str]] = {}
    explainer = sa.create_engine(side.url, poolclass=sa.NullPool)
    try:
        with explainer.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for name, op in OPERATIONS.items():
                with captured(side.engine) as statements:
                    op(side)
                number = 0
                for sql, params in statements:
                    if not sql.lstrip().upper().startswith(_EXPLAINED):
                        continue
                    first = params[0] if isinstance(params, Sequence) and params else params
                    values: Mapping[str, Any] = first or {}
                    number += 1
                    verb = sql.split(None, 1)[0].upper()
                    key = f"{name} #{number}: {verb} {_table(sql)}"
                    custom = _plan(conn, sql, values)
                    generic = _generic_plan(conn, sql, values)
                    plans[key] = custom
                    if _shape(generic) != _shape(custom):
                        plans[key + GENERIC] = generic
    finally:
        explainer.dispose()
    return plans


def _shape(plan: Sequence[str]) -> list[str]:
    """A plan's nodes (which scan of which index), without costs, conditions or values."""
    nodes = list(plan[:1]) + [line for line in plan[1:] if line.lstrip().startswith("->")]
    return [re.sub(r"\s+\(cost=.*\)$", "", line) for line in nodes]


# -- the benchmark ---------------------------------------------------------------------


def bench_pg_scale(workdir: Workdir, quick: bool) -> list[Row]:
    url = server_url()
    if url is None:
        print("  pg_scale: skipped (set BENCH_POSTGRES_URL)", flush=True)
        return []
    finished, queued = (100_000, 1_000) if quick else (1_000_000, 10_000)
    reps, batch = (3, 150) if quick else (5, 600)
    sizes = f"{finished:,} finished + {queued:,} queued"
    with fresh_database(url) as big_url, fresh_database(url) as small_url:
        db.migrate(big_url)
        db.migrate(small_url)
        build = {"big": fill(big_url, finished, queued)}
        build["small"] = fill(small_url, SMALL_FINISHED, SMALL_QUEUED)
        big = Side("big", big_url, finished, queued)
        small = Side("almost empty", small_url, SMALL_FINISHED, SMALL_QUEUED)
        try:
            for side in (big, small):
                side.prepare()
                for op in OPERATIONS.values():  # warm-up: caches, prepared statements
                    for _ in range(20):
                        op(side)
            samples = {
                name: interleaved(reps, timer(op, big, batch), timer(op, small, batch))
                for name, op in OPERATIONS.items()
            }
            plans = query_plans(big)
        finally:
            big.engine.dispose()
            small.engine.dispose()
    scans = [
        f"{query}: {line.strip()}"
        for query, lines in plans.items()
        for line in lines
        if SCANNED.search(line)
    ]
    scanning = {
        query.removesuffix(GENERIC)
        for query, lines in plans.items()
        if any(SCANNED.search(line) for line in lines)
    }
    rows = [
        Row(
            bench="pg scale",
            measure=f"{name}, {sizes} vs almost empty",
            unit="µs",
            pipeline=on_big,
            reference=on_small,
            ref_name="almost empty",
            target=Target("<=", 2.0),
            note=(
                "its transaction is rolled back each time, so that the queue and the run "
                "stay as they were (a commit would add its WAL flush to both sides)"
                if name in ("claim", "boundary")
                else ""
            ),
            extra={
                "build_seconds": build,
                "ops_per_repetition": batch,
                "almost_empty": f"{SMALL_FINISHED} finished + {SMALL_QUEUED} queued",
            },
        )
        for name, (on_big, on_small) in samples.items()
    ]
    rows.append(
        Row(
            bench="pg scale",
            measure=f"statements whose plan has a Seq Scan of analysis_runs or run_phases, {sizes}",
            unit="statements",
            pipeline=[float(len(scanning))],
            target=Target("<=", 0, on="value"),
            note="EXPLAIN with the same parameters; generic plans listed where their shape differs",
            extra={"plans": plans, "offending": scans},
        )
    )
    return rows


BENCHMARKS: dict[str, Callable[[Workdir, bool], list[Row]]] = {"pg_scale": bench_pg_scale}
