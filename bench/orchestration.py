"""In-process benchmarks: boundary cost, run throughput, burst, progress calls.

Everything here drives the project's own code (``Executor``, ``Service``) in
this process, on SQLite files on the real disk, against a reference run
beside it: plain ``sqlite3`` making the same durable writes, or Huey.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sqlite3
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.pool import Pool

from bench import reference
from bench.common import Row, Target, Workdir, count_status, interleaved, sqlite_connect, url_of
from bench.phases import NOOP5, WRITE5, noop
from pipeline import db
from pipeline.config import Settings
from pipeline.liveness import process_identity
from pipeline.orchestrator import Executor, Phase, RunContext, phase_labels
from pipeline.service import Service

WAIT_LIMIT_SECONDS = 300.0


# -- helpers ---------------------------------------------------------------------------


@contextlib.contextmanager
def synchronous(level: str) -> Iterator[None]:
    """Every pooled connection checked out meanwhile gets ``PRAGMA synchronous = level``.

    ``db.create_engine`` sets NORMAL in its ``connect`` listener; a ``checkout``
    listener on the Pool class runs after it, for every engine of the process
    (the runners' own engines included), without touching src/.
    """
    if level == "NORMAL":
        yield
        return

    def on_checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        dbapi_conn.execute(f"PRAGMA synchronous = {level}")

    event.listen(Pool, "checkout", on_checkout)
    try:
        yield
    finally:
        event.remove(Pool, "checkout", on_checkout)


@contextlib.contextmanager
def traced() -> Iterator[list[tuple[str, str]]]:
    """(thread name, SQL) of every statement SQLite itself receives, on every new connection."""
    seen: list[tuple[str, str]] = []

    def trace(statement: str) -> None:
        seen.append((threading.current_thread().name, statement))

    def on_connect(dbapi_conn: Any, record: Any) -> None:
        dbapi_conn.set_trace_callback(trace)

    event.listen(Pool, "connect", on_connect)
    try:
        yield seen
    finally:
        event.remove(Pool, "connect", on_connect)


def statement_kind(sql: str) -> str:
    words = sql.split()
    if not words:
        return ""
    head = words[0].upper()
    if head in ("UPDATE", "DELETE"):
        return f"{head} {words[1] if head == 'UPDATE' else words[2]}"
    if head == "INSERT":
        return f"INSERT {words[2]}"
    if head == "BEGIN":
        return " ".join(words[:2]).upper()
    return head


def wait_idle(executor: Executor, limit: float = WAIT_LIMIT_SECONDS) -> None:
    """Until no runner thread is left (they retire when the queue is empty).

    Joins the executor's threads rather than polling the database, so that the
    wait itself costs nothing (reads the executor's private state on purpose).
    """
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with executor._lock:
            threads = list(executor._threads)
            runners = executor._runners
        if not threads and runners == 0:
            return
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0))
        if not threads:
            time.sleep(0.001)
    raise TimeoutError("the executor did not become idle in time")


def make_service(path: Path, registry: Sequence[Phase], concurrency: int) -> Service:
    settings = Settings(
        database_url=url_of(path),
        max_concurrent_runs=concurrency,
        executor="thread",
        heartbeat_seconds=1.0,
    )
    return Service(settings, registry, execute=True)


class LockErrorCounter(logging.Handler):
    """Counts WARNING+ records of the ``pipeline`` loggers that speak of a busy database."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.samples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage().lower()
        if "busy" in text or "locked" in text:
            self.count += 1
            if len(self.samples) < 5:
                self.samples.append(record.getMessage()[:200])


@contextlib.contextmanager
def counting_lock_errors() -> Iterator[LockErrorCounter]:
    handler = LockErrorCounter()
    logger = logging.getLogger("pipeline")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def reference_owner() -> str:
    return f"{process_identity()}:bench-reference"


# -- statement check -------------------------------------------------------------------


def trace_run(workdir: Workdir, phases: int = 6) -> dict[str, Any]:
    """The statements SQLite receives for one run: orchestrator thread vs the reference."""
    registry = [(i, f"Phase {i}", noop) for i in range(1, phases + 1)]
    path = workdir.fresh_db("trace")
    executor = Executor(url_of(path), registry, max_concurrent=1)
    with traced() as seen:
        _run_id, thread = executor.start_reserved({})
        thread.join(WAIT_LIMIT_SECONDS)
    executor.shutdown()
    pipeline_kinds = Counter(
        statement_kind(sql)
        for name, sql in seen
        if not sql.upper().startswith("PRAGMA") and name != "pipeline-heartbeat"
    )
    ref_path = workdir.fresh_db("trace-ref")
    ref_seen: list[str] = []
    conn = sqlite_connect(ref_path)
    conn.set_trace_callback(ref_seen.append)
    owner = reference_owner()
    run_id = reference.create_run(conn, owner)
    reference.whole_run(conn, owner, phase_labels(registry), lambda num: None, run_id)
    conn.close()
    ref_kinds = Counter(statement_kind(s) for s in ref_seen if not s.upper().startswith("PRAGMA"))
    return {
        "phases": phases,
        "pipeline": dict(sorted(pipeline_kinds.items())),
        "reference": dict(sorted(ref_kinds.items())),
        "same": pipeline_kinds == ref_kinds,
    }


# -- boundary cost ---------------------------------------------------------------------


def _marking_registry(n: int, marks: dict[str, float]) -> list[Phase]:
    def first(conn: Connection, ctx: RunContext) -> None:
        marks["first"] = time.perf_counter()

    def last(conn: Connection, ctx: RunContext) -> None:
        marks["last"] = time.perf_counter()

    middle: list[Phase] = [(i, f"Phase {i}", noop) for i in range(2, n)]
    return [(1, "Phase 1", first), *middle, (n, f"Phase {n}", last)]


def boundary_pipeline(
    workdir: Workdir, n: int, sync: str, wholes: list[float], cold: list[float]
) -> float:
    """µs per phase boundary (phase 1 entered .. phase n entered) through the real runner.

    The executor runs the pipeline twice and the second run is the figure: a
    server runs the same registry again and again, and the first run of a
    process pays once for things such as a metrics series per phase label
    (the cold figure is kept in the JSON).

    As in a server or a worker, another connection of the process (there,
    the service's engine) keeps the database open meanwhile. Without one, the
    runner's engine was the only connection and closed after the cold run;
    SQLite deletes the WAL at its last close, so the warm run grew a new WAL
    file (at FULL, an fsync that grows the file costs about twice one that
    rewrites it) while the reference's connection kept its WAL: 1.6x at FULL
    with the file deleted, 1.2x without, in the same minute.
    """
    marks: dict[str, float] = {}
    registry = _marking_registry(n, marks)
    path = workdir.fresh_db("boundary")
    executor = Executor(url_of(path), registry, max_concurrent=1)
    keeper = db.create_engine(url_of(path))
    with synchronous(sync), keeper.connect() as held:
        held.exec_driver_sql("SELECT count(*) FROM analysis_runs").all()
        held.rollback()  # the file and its WAL stay open; no snapshot is held
        for attempt in ("cold", "warm"):
            started = time.perf_counter()
            _run_id, thread = executor.start_reserved({})
            thread.join(WAIT_LIMIT_SECONDS)
            whole = (time.perf_counter() - started) * 1e6 / n
            per_phase = (marks["last"] - marks["first"]) * 1e6 / (n - 1)
            if attempt == "cold":
                cold.append(per_phase)
    keeper.dispose()
    wholes.append(whole)
    executor.shutdown()
    if count_status(path) != {"completed": 2}:
        raise RuntimeError(f"boundary runs did not complete: {count_status(path)}")
    return per_phase


def boundary_reference(workdir: Workdir, n: int, sync: str, wholes: list[float]) -> float:
    """The same on raw sqlite3: the second of two runs in one database, as on the pipeline's side.

    The second run finds the file as the pipeline's second run does (the same
    rows, the WAL as long, kept open by a connection): at FULL, an fsync that
    also grows the WAL file costs about twice one that rewrites it, and that,
    not the code, decided the ratio whenever only one side had to grow it.
    """
    marks: dict[str, float] = {}

    def phase(num: int) -> None:
        if num == 1:
            marks["first"] = time.perf_counter()
        elif num == n:
            marks["last"] = time.perf_counter()

    labels = [(i, f"Phase {i}") for i in range(1, n + 1)]
    path = workdir.fresh_db("boundary-ref")
    owner = reference_owner()
    conn = sqlite_connect(path, sync)
    for _attempt in ("cold", "warm"):
        started = time.perf_counter()
        run_id = reference.create_run(conn, owner)
        reference.whole_run(conn, owner, labels, phase, run_id)
        whole = (time.perf_counter() - started) * 1e6 / n
    conn.close()
    wholes.append(whole)
    return (marks["last"] - marks["first"]) * 1e6 / (n - 1)


def synchronous_seen(workdir: Workdir, sync: str) -> int:
    """What ``PRAGMA synchronous`` answers on the runner's own connection (1 NORMAL, 2 FULL)."""
    seen: list[int] = []

    def probe(conn: Connection, ctx: RunContext) -> None:
        seen.append(int(conn.exec_driver_sql("PRAGMA synchronous").scalar_one()))

    executor = Executor(url_of(workdir.fresh_db("sync")), [(1, "Probe", probe)], max_concurrent=1)
    with synchronous(sync):
        _run_id, thread = executor.start_reserved({})
        thread.join(WAIT_LIMIT_SECONDS)
    executor.shutdown()
    return seen[0] if seen else -1


def bench_boundary(workdir: Workdir, quick: bool) -> list[Row]:
    reps = 3 if quick else 5
    rows = []
    trace = trace_run(workdir)
    for sync, n, limit in (
        ("NORMAL", 500 if quick else 2000, 2.0),
        ("FULL", 100 if quick else 300, 1.2),
    ):
        whole_p: list[float] = []
        whole_r: list[float] = []
        cold: list[float] = []
        pipe, ref = interleaved(
            reps,
            functools.partial(boundary_pipeline, workdir, n, sync, whole_p, cold),
            functools.partial(boundary_reference, workdir, n, sync, whole_r),
        )
        rows.append(
            Row(
                bench="boundary cost",
                measure=f"{n} no-op phases, synchronous={sync}",
                unit="µs/phase",
                pipeline=pipe,
                reference=ref,
                ref_name="raw sqlite3",
                target=Target("<=", limit),
                extra={
                    "phases": n,
                    "synchronous_on_runner_connection": synchronous_seen(workdir, sync),
                    "whole_run_us_per_phase": {
                        "pipeline": statistics.median(whole_p),
                        "reference": statistics.median(whole_r),
                    },
                    "pipeline_first_run_of_the_process_us_per_phase": cold,
                    "statements_per_run": trace,
                },
            )
        )
    return rows


# -- run throughput --------------------------------------------------------------------


def throughput_pipeline(workdir: Workdir, n: int, concurrency: int, info: list[int]) -> float:
    """Runs/s: n runs of 5 no-op phases through ``Service.create_run``, to completion."""
    path = workdir.fresh_db("throughput")
    service = make_service(path, NOOP5, concurrency)
    service.start()
    try:
        started = time.perf_counter()
        for _ in range(n):
            service.create_run({})
        wait_idle(service.executor)
        elapsed = time.perf_counter() - started
        info.append(service.executor._serial)  # runner threads started, each with its engine
    finally:
        service.stop()
    counts = count_status(path)
    if counts != {"completed": n}:
        raise RuntimeError(f"throughput runs did not all complete: {counts}")
    return n / elapsed


def _huey_classes() -> tuple[Any, Any]:
    from huey import Huey  # type: ignore[import-untyped]
    from huey.storage import SqliteStorage  # type: ignore[import-untyped]

    class NormalSyncStorage(SqliteStorage):  # type: ignore[misc]
        """SqliteStorage at synchronous=NORMAL, like the pipeline (its default is FULL)."""

        def _create_connection(self) -> sqlite3.Connection:
            conn: sqlite3.Connection = super()._create_connection()
            conn.execute("PRAGMA synchronous = NORMAL")
            return conn

    return Huey, NormalSyncStorage


def throughput_huey(workdir: Workdir, n: int) -> float:
    """Runs/s: the same writes, queued with Huey (SqliteHuey storage, one consumer thread).

    The caller inserts the run row and enqueues a task; the task claims the
    run and executes its 5 no-op phases with plain sqlite3 (one connection
    per consumer thread), one commit each, as the pipeline does; Huey stores
    the task's result.
    """
    from huey.signals import SIGNAL_COMPLETE  # type: ignore[import-untyped]

    huey_cls, storage_cls = _huey_classes()
    app_path = workdir.fresh_db("huey-app")
    huey = huey_cls(
        "bench", storage_class=storage_cls, filename=str(workdir.file("huey.db")), results=True
    )
    labels = phase_labels(NOOP5)
    owner = reference_owner()
    local = threading.local()
    done = threading.Event()
    completed = [0]

    @huey.task()  # type: ignore[untyped-decorator]
    def execute_run(run_id: int) -> str:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = sqlite_connect(app_path)
        claimed = reference.whole_run(conn, owner, labels, lambda num: None)
        if claimed != run_id:
            raise RuntimeError(f"huey task claimed run {claimed}, not {run_id}")
        return "completed"

    @huey.signal(SIGNAL_COMPLETE)  # type: ignore[untyped-decorator]
    def on_complete(sig: str, task: Any) -> None:
        completed[0] += 1
        if completed[0] >= n:
            done.set()

    consumer = huey.create_consumer(
        workers=1,
        worker_type="thread",
        periodic=False,
        initial_delay=0.01,
        check_worker_health=False,
    )
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    consumer.start()
    try:
        conn = sqlite_connect(app_path)
        started = time.perf_counter()
        for _ in range(n):
            execute_run(reference.create_run(conn, None))
        if not done.wait(WAIT_LIMIT_SECONDS):
            raise TimeoutError("huey did not finish in time")
        elapsed = time.perf_counter() - started
        conn.close()
    finally:
        consumer.stop(graceful=True)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        huey.storage.close()
    stored = huey.storage.result_store_size()
    counts = count_status(app_path)
    if counts != {"completed": n} or stored != n:
        raise RuntimeError(f"huey runs did not all complete: {counts}, {stored} results")
    return n / elapsed


def bench_throughput(workdir: Workdir, quick: bool) -> list[Row]:
    n = 150 if quick else 2000
    # The ratio is near 1 now, and one full run's median of 3 moved by 10-20%
    # from one run to the next (1.09x, then 0.87x minutes later): 5 in full.
    reps = 3 if quick else 5
    threads_default: list[int] = []
    threads_one: list[int] = []
    default = Settings.model_fields["max_concurrent_runs"].default
    pipe_default, huey_runs, pipe_one = interleaved(
        reps,
        lambda: throughput_pipeline(workdir, n, default, threads_default),
        lambda: throughput_huey(workdir, n),
        lambda: throughput_pipeline(workdir, n, 1, threads_one),
    )
    common = {"runs": n, "phases_per_run": 5, "huey_version": _huey_version()}
    return [
        Row(
            bench="run throughput",
            measure=f"{n} runs x 5 no-op phases, {default} runners (default)",
            unit="runs/s",
            pipeline=pipe_default,
            reference=huey_runs,
            ref_name="Huey, 1 thread",
            target=Target(">=", 1.0),
            extra={**common, "runner_threads_started": threads_default},
        ),
        Row(
            bench="run throughput",
            measure=f"{n} runs x 5 no-op phases, 1 runner",
            unit="runs/s",
            pipeline=pipe_one,
            reference=huey_runs,
            ref_name="Huey, 1 thread",
            target=Target(">=", 1.0),
            extra={**common, "runner_threads_started": threads_one},
        ),
    ]


def _huey_version() -> str:
    import huey

    version: str = huey.__version__
    return version


# -- burst -----------------------------------------------------------------------------


def burst_once(workdir: Workdir, n: int, together: bool, errors: list[int]) -> float:
    """Seconds for n runs (5 phases of 10 inserted rows each) from creation to completion.

    ``together``: n threads call ``Service.create_run`` at the same instant,
    as n concurrent POSTs would; else each run is created after the previous
    one completed. Lock errors: ``DatabaseBusy`` raised to a creator, runs
    that failed, and "busy"/"locked" warnings logged by the runners.
    """
    path = workdir.fresh_db("burst")
    service = make_service(path, WRITE5, Settings.model_fields["max_concurrent_runs"].default)
    service.start()
    busy: list[BaseException] = []
    try:
        with counting_lock_errors() as logged:
            if together:
                barrier = threading.Barrier(n + 1)

                def create() -> None:
                    barrier.wait()
                    try:
                        service.create_run({})
                    except db.DatabaseBusy as exc:
                        busy.append(exc)

                creators = [threading.Thread(target=create) for _ in range(n)]
                for thread in creators:
                    thread.start()
                barrier.wait()
                started = time.perf_counter()
                for thread in creators:
                    thread.join(WAIT_LIMIT_SECONDS)
                wait_idle(service.executor)
            else:
                started = time.perf_counter()
                for _ in range(n):
                    try:
                        service.create_run({})
                    except db.DatabaseBusy as exc:
                        busy.append(exc)
                    wait_idle(service.executor)
            elapsed = time.perf_counter() - started
    finally:
        service.stop()
    counts = count_status(path)
    errors.append(len(busy) + logged.count + counts.get("failed", 0))
    if counts.get("completed", 0) + counts.get("failed", 0) != n - len(busy):
        raise RuntimeError(f"burst runs did not all end: {counts}")
    return elapsed


def bench_burst(workdir: Workdir, quick: bool) -> list[Row]:
    n = 50
    reps = 3 if quick else 5
    errors_burst: list[int] = []
    errors_seq: list[int] = []
    burst, sequential = interleaved(
        reps,
        lambda: burst_once(workdir, n, True, errors_burst),
        lambda: burst_once(workdir, n, False, errors_seq),
    )
    return [
        Row(
            bench="burst of 50",
            measure="50 runs started at once (5 phases x 10 rows), wall time",
            unit="s",
            pipeline=burst,
            reference=sequential,
            ref_name="one after another",
            target=Target("<=", 1.5),
        ),
        Row(
            bench="burst of 50",
            measure="lock errors during the burst (all repetitions)",
            unit="count",
            pipeline=[float(e) for e in errors_burst],
            target=Target("<=", 0, on="value"),
            extra={"sequential": errors_seq},
        ),
    ]


# -- progress calls --------------------------------------------------------------------


class _Floor:
    """The least a progress call can do: store a tuple on an object."""

    __slots__ = ("_progress", "phase_num")

    def __init__(self) -> None:
        self.phase_num = 1
        self._progress: tuple[int, int | None, int | None] = (1, None, None)

    def progress(self, current: int, total: int | None = None) -> None:
        self._progress = (self.phase_num, current, total)


def _progress_writes(workdir: Workdir, seconds: float) -> dict[str, Any]:
    """ctx.progress in a tight loop for ``seconds``: how many database writes followed."""
    window: dict[str, float] = {}
    calls = [0]
    writes: list[tuple[float, str]] = []
    path = workdir.fresh_db("progress")

    def phase(conn: Connection, ctx: RunContext) -> None:
        window["start"] = time.perf_counter()
        deadline = window["start"] + seconds
        i = 0
        while True:
            for _ in range(1000):
                i += 1
                ctx.progress(i, 10**9)
            if time.perf_counter() >= deadline:
                break
        window["end"] = time.perf_counter()
        calls[0] = i

    def on_execute(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        head = statement.lstrip()[:6].upper()
        if head in ("INSERT", "UPDATE", "DELETE"):
            writes.append((time.perf_counter(), statement))

    executor = Executor(url_of(path), [(1, "Progress", phase)], max_concurrent=1)
    event.listen(sa.engine.Engine, "before_cursor_execute", on_execute)
    try:
        _run_id, thread = executor.start_reserved({})
        thread.join(WAIT_LIMIT_SECONDS)
    finally:
        event.remove(sa.engine.Engine, "before_cursor_execute", on_execute)
        executor.shutdown()
    inside = [s for t, s in writes if window["start"] <= t <= window["end"]]
    duration = window["end"] - window["start"]
    progress_writes = [s for s in inside if "phase_progress_current" in s]
    return {
        "seconds": duration,
        "calls": calls[0],
        "calls_per_second": calls[0] / duration,
        "writes_during_phase": len(inside),
        "progress_writes_during_phase": len(progress_writes),
        "writes_per_second": len(inside) / duration,
    }


def bench_progress(workdir: Workdir, quick: bool) -> list[Row]:
    calls = 200_000 if quick else 1_000_000
    reps = 3 if quick else 5
    holder: dict[str, list[float]] = {}

    def phase(conn: Connection, ctx: RunContext) -> None:
        ours, floor, _ = _progress_loops_inner(ctx, calls, reps)
        holder["pipeline"], holder["floor"] = ours, floor

    executor = Executor(url_of(workdir.fresh_db("progress-calls")), [(1, "Calls", phase)])
    _run_id, thread = executor.start_reserved({})
    thread.join(WAIT_LIMIT_SECONDS)
    executor.shutdown()
    writes = _progress_writes(workdir, 1.5 if quick else 4.0)
    return [
        Row(
            bench="progress calls",
            measure=f"ctx.progress() in a tight loop ({calls:,} calls), inside a running phase",
            unit="µs/call",
            pipeline=holder["pipeline"],
            reference=holder["floor"],
            ref_name="tuple store",
            target=Target("<=", 2.0, on="value"),
        ),
        Row(
            bench="progress calls",
            measure=(
                f"database writes while calling it flat out for {writes['seconds']:.1f} s "
                f"({writes['calls_per_second']:,.0f} calls/s)"
            ),
            unit="writes/s",
            pipeline=[writes["writes_per_second"]],
            target=Target("<=", 3.0, on="value"),
            extra=writes,
        ),
    ]


def _progress_loops_inner(
    ctx: RunContext, calls: int, reps: int
) -> tuple[list[float], list[float], int]:
    """K calls of ctx.progress, then K of the floor, alternating; µs per call.

    The values keep growing across repetitions (a total of reps x K), so that
    no call takes the cheap "would go backwards" exit.
    """
    floor = _Floor()
    total = 2 * reps * calls
    offset = [0]

    def timed(progress: Callable[[int, int], None]) -> float:
        base = offset[0]
        offset[0] += calls
        started = time.perf_counter()
        for i in range(base, base + calls):
            progress(i, total)
        return (time.perf_counter() - started) * 1e6 / calls

    ours_s, floor_s = interleaved(reps, lambda: timed(ctx.progress), lambda: timed(floor.progress))
    return ours_s, floor_s, calls


BENCHMARKS: dict[str, Callable[[Workdir, bool], list[Row]]] = {
    "boundary": bench_boundary,
    "throughput": bench_throughput,
    "burst": bench_burst,
    "progress": bench_progress,
}
