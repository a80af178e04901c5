"""The runner thread: its own engine, atomic phases, truthful outcomes."""

from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import sqlalchemy as sa

from pipeline import db
from pipeline.orchestrator import Executor, start_run
from pipeline.runs import RunStatus

from .conftest import read_run, scalar, wait_for


@pytest.fixture
def items(engine):
    """A table of the test's own, written by its phases."""
    with db.write(engine) as conn:
        conn.exec_driver_sql(
            "CREATE TABLE items (run_id INTEGER NOT NULL, phase INTEGER NOT NULL, value TEXT)"
        )
    return engine


def insert_item(conn, ctx, value="x"):
    conn.execute(
        sa.text("INSERT INTO items (run_id, phase, value) VALUES (:r, :p, :v)"),
        {"r": ctx.run_id, "p": ctx.phase_num, "v": value},
    )


def item_phases(engine, run_id):
    with db.read(engine) as conn:
        rows = conn.execute(
            sa.text("SELECT phase FROM items WHERE run_id = :r ORDER BY phase"), {"r": run_id}
        )
        return [r[0] for r in rows]


def run_to_end(db_url, registry, params=None):
    run_id, thread = start_run(db_url, params or {}, registry)
    thread.join(30)
    assert not thread.is_alive()
    return run_id


def test_runner_uses_its_own_engine_and_connection(db_url, engine):
    """The phase's connection is a different engine and DBAPI connection, in its own thread."""
    seen = {}

    def inspect_connection(conn, ctx):
        seen["engine"] = conn.engine
        seen["dbapi"] = conn.connection.dbapi_connection
        seen["thread"] = threading.current_thread()

    with engine.connect() as mine:
        my_dbapi = mine.connection.dbapi_connection
        run_id = run_to_end(db_url, [(1, "Inspect", inspect_connection)])
        assert seen["engine"] is not engine
        assert seen["dbapi"] is not my_dbapi
    assert seen["thread"] is not threading.current_thread()
    assert seen["thread"].daemon is False
    assert seen["thread"].name == f"pipeline-run-{run_id}"
    assert read_run(engine, run_id).status is RunStatus.COMPLETED


def test_runner_connection_has_the_sqlite_pragmas(sqlite_url):
    """WAL, foreign keys, a busy timeout and synchronous=NORMAL on the runner's connection."""
    seen = {}

    def pragmas(conn, ctx):
        for name in ("journal_mode", "foreign_keys", "busy_timeout", "synchronous"):
            seen[name] = conn.exec_driver_sql(f"PRAGMA {name}").scalar()

    run_to_end(sqlite_url, [(1, "Pragmas", pragmas)])
    assert seen["journal_mode"] == "wal"
    assert seen["foreign_keys"] == 1
    assert seen["busy_timeout"] >= 1000
    assert seen["synchronous"] == 1  # NORMAL


def test_the_pool_hands_out_the_connection_returned_last(db_url):
    """LIFO: the warm connection serves the next request, not the one idle longest.

    On SQLite a connection that another one wrote after reads its pages again.
    """
    engine = db.create_engine(db_url, pool_size=10, max_overflow=40)
    try:
        first, second = engine.connect(), engine.connect()
        first_dbapi = first.connection.dbapi_connection
        second_dbapi = second.connection.dbapi_connection
        first.close()
        second.close()  # returned last
        with engine.connect() as again:
            assert again.connection.dbapi_connection is second_dbapi
        with engine.connect() as again, engine.connect() as other:
            assert again.connection.dbapi_connection is second_dbapi
            assert other.connection.dbapi_connection is first_dbapi
    finally:
        engine.dispose()
    # A pool of the caller's choosing, which has no such option, still works.
    unpooled = db.create_engine(db_url, poolclass=sa.NullPool)
    with unpooled.connect() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    unpooled.dispose()


def test_foreign_key_violation_inside_a_phase_fails_the_run(db_url, engine):
    """foreign_keys=ON is in force on the runner's connection: a dangling reference fails."""

    def dangling(conn, ctx):
        conn.exec_driver_sql(
            "INSERT INTO example_comments VALUES (999999, 'c1', 't1', 'a', 'body', 0)"
        )

    run_id = run_to_end(db_url, [(1, "Dangling", dangling)])
    run = read_run(engine, run_id)
    assert run.status is RunStatus.FAILED
    assert "foreign key" in (run.error_message or "").lower()
    assert scalar(engine, "SELECT count(*) FROM example_comments") == 0


def test_every_phase_gets_connection_and_context_and_warnings_persist(db_url, engine):
    """run_id, params, phase number and label reach each phase; warnings are stored."""
    seen = []

    def record(conn, ctx):
        seen.append((ctx.run_id, dict(ctx.params), ctx.phase_num, ctx.phase_label))
        assert isinstance(conn, sa.engine.Connection)
        assert conn.in_transaction()
        ctx.warn(f"note from {ctx.phase_label}")

    registry = [(1, "First", record), (2, "Second", record)]
    run_id = run_to_end(db_url, registry, {"subreddit": "python"})
    assert seen == [
        (run_id, {"subreddit": "python"}, 1, "First"),
        (run_id, {"subreddit": "python"}, 2, "Second"),
    ]
    run = read_run(engine, run_id)
    assert [(w.phase, w.message) for w in run.warnings] == [
        (1, "note from First"),
        (2, "note from Second"),
    ]


def test_boundary_updates_are_visible_while_each_phase_runs(db_url, engine):
    """From another connection, phase k shows current_phase=k, its label, k-1 done of n."""
    entered = {k: threading.Event() for k in (1, 2, 3)}
    release = {k: threading.Event() for k in (1, 2, 3)}

    def gated(conn, ctx):
        entered[ctx.phase_num].set()
        assert release[ctx.phase_num].wait(10)

    registry = [(1, "One", gated), (2, "Two", gated), (3, "Three", gated)]
    run_id, thread = start_run(db_url, {}, registry)
    try:
        for k, label in ((1, "One"), (2, "Two"), (3, "Three")):
            assert entered[k].wait(10)
            run = read_run(engine, run_id)
            assert run.status is RunStatus.RUNNING
            assert (run.current_phase, run.phase_label) == (k, label)
            assert (run.progress_current, run.progress_total) == (k - 1, 3)
            assert run.started_at is not None
            assert run.completed_at is None
            release[k].set()
    finally:
        for event in release.values():
            event.set()
        thread.join(10)


def test_success_marks_completed_in_utc(db_url, items):
    engine = items
    """A run whose phases all return is completed, at 100%, with completed_at in UTC."""
    before = dt.datetime.now(dt.UTC)
    run_id = run_to_end(db_url, [(1, "A", insert_item), (2, "B", insert_item)])
    run = read_run(engine, run_id)
    assert run.status is RunStatus.COMPLETED
    assert run.progress_current == run.progress_total == 2
    assert run.percent == 100.0
    assert run.completed_at is not None
    assert run.completed_at.utcoffset() == dt.timedelta(0)
    assert before <= run.completed_at <= dt.datetime.now(dt.UTC)
    assert run.to_dict()["completed_at"].endswith("Z")
    assert [p.status for p in run.phases] == ["completed", "completed"]


def test_each_boundary_is_one_instant_of_the_database(db_url, items):
    """A phase ends when the next starts, the first starts with the run, the last ends with it.

    The phase rows read the instant back from the run row the boundary
    wrote (``runs._BOUNDARY_AT``, ``runs._COMPLETED_AT``); a row that took
    another instant, or the wrong one of the two, breaks an equality here.
    """

    def slow(conn, ctx):
        # Distinct instants at each boundary (SQLite's clock has milliseconds).
        time.sleep(0.003)

    run_id = run_to_end(db_url, [(1, "A", slow), (2, "B", slow), (3, "C", slow)])
    run = read_run(items, run_id)
    first, second, third = run.phases
    assert run.started_at == first.started_at
    assert first.finished_at == second.started_at
    assert second.finished_at == third.started_at
    assert third.finished_at == run.completed_at
    instants = [first.started_at, first.finished_at, second.finished_at, third.finished_at]
    assert None not in instants
    assert instants == sorted(instants)  # type: ignore[type-var]
    assert len(set(instants)) == 4


class Boom(Exception):
    pass


@pytest.mark.parametrize(
    ("exc", "expected_message"),
    [
        pytest.param(Boom("phase two broke"), "phase two broke", id="message"),
        pytest.param(Boom(), "Boom", id="empty-message"),
        pytest.param(SystemExit(3), "3", id="SystemExit"),
        pytest.param(KeyboardInterrupt(), "KeyboardInterrupt", id="KeyboardInterrupt"),
        pytest.param(GeneratorExit(), "GeneratorExit", id="GeneratorExit"),
    ],
)
def test_failed_phase_rolls_back_and_run_is_failed(db_url, items, caplog, exc, expected_message):
    """Phase 2 of 3 reads, writes, warns and raises: its rows go, phase 1's stay, 3 never runs."""
    ran = []

    def phase_one(conn, ctx):
        ran.append(1)
        insert_item(conn, ctx)
        ctx.warn("before the failure")

    def phase_two(conn, ctx):
        ran.append(2)
        conn.exec_driver_sql("SELECT count(*) FROM items").scalar()
        insert_item(conn, ctx)
        insert_item(conn, ctx)
        ctx.warn("inside the failed phase")
        raise exc

    def phase_three(conn, ctx):
        ran.append(3)

    caplog.set_level(logging.INFO)
    run_id = run_to_end(db_url, [(1, "A", phase_one), (2, "B", phase_two), (3, "C", phase_three)])
    run = read_run(items, run_id)
    assert ran == [1, 2]
    assert item_phases(items, run_id) == [1]
    assert run.status is RunStatus.FAILED
    assert run.error_message == expected_message
    assert run.completed_at is not None
    assert (run.current_phase, run.phase_label, run.progress_current) == (2, "B", 1)
    assert [w.message for w in run.warnings] == ["before the failure", "inside the failed phase"]
    assert [p.status for p in run.phases] == ["completed", "failed", "pending"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors, "the failure was not logged at ERROR"
    assert errors[0].exc_info is not None
    assert "phase_two" in caplog.text  # the traceback names the failing function
    assert getattr(errors[0], "run_id", None) == run_id


def test_run_log_records_name_their_run_and_phase(sqlite_url, caplog):
    """The runner's own INFO records and a phase's ``ctx.logger`` say which run and phase,
    in the message and as record attributes, each record the phase it was made in."""

    def first(conn, ctx):
        ctx.logger.info("hello from one")

    def second(conn, ctx):
        ctx.logger.warning("careful in two")

    caplog.set_level(logging.INFO, logger="pipeline.run")
    run_id = run_to_end(sqlite_url, [(1, "One", first), (2, "Two", second)])
    seen = [(r.getMessage(), r.run_id, r.phase) for r in caplog.records if r.name == "pipeline.run"]
    assert seen == [
        (f"run {run_id} phase 1: phase started: One", run_id, 1),
        (f"run {run_id} phase 1: hello from one", run_id, 1),
        (f"run {run_id} phase 2: phase started: Two", run_id, 2),
        (f"run {run_id} phase 2: careful in two", run_id, 2),
        (f"run {run_id} phase 2: run completed", run_id, 2),
    ]


def test_read_then_write_then_raise_leaves_nothing(db_url, items):
    """DDL, a CTE write and writes after a read all roll back with the phase (real BEGIN)."""

    def reads_then_writes_then_raises(conn, ctx):
        conn.exec_driver_sql("SELECT count(*) FROM items").scalar()
        conn.exec_driver_sql("CREATE TABLE made_by_phase (x INTEGER)")
        conn.execute(
            sa.text(
                "WITH v(x) AS (SELECT 'cte') INSERT INTO items (run_id, phase, value) "
                "SELECT :r, :p, x FROM v"
            ),
            {"r": ctx.run_id, "p": ctx.phase_num},
        )
        insert_item(conn, ctx)
        raise Boom("after writing")

    run_id = run_to_end(db_url, [(1, "Writes", reads_then_writes_then_raises)])
    assert read_run(items, run_id).status is RunStatus.FAILED
    assert scalar(items, "SELECT count(*) FROM items") == 0
    tables = sa.inspect(items).get_table_names()
    assert "made_by_phase" not in tables


def test_a_concurrent_write_is_never_silently_overwritten(sqlite_url):
    """Read-modify-write in a phase and in another connection: both increments survive.

    SQLite's promise (BEGIN IMMEDIATE at the first read). On PostgreSQL a
    phase uses SELECT ... FOR UPDATE for this, as anywhere on PostgreSQL.
    """
    db_url = sqlite_url
    engine = db.create_engine(db_url)
    with db.write(engine) as conn:
        conn.exec_driver_sql("CREATE TABLE counter (n INTEGER NOT NULL)")
        conn.exec_driver_sql("INSERT INTO counter VALUES (0)")
    phase_has_read = threading.Event()
    other_is_writing = threading.Event()
    other_done = threading.Event()

    def increment(conn, ctx):
        value = conn.exec_driver_sql("SELECT n FROM counter").scalar_one()
        phase_has_read.set()
        assert other_is_writing.wait(10)
        # Give the other writer every chance to slip in between our read and write.
        other_done.wait(0.5)
        conn.execute(sa.text("UPDATE counter SET n = :n"), {"n": value + 1})

    def other_writer():
        assert phase_has_read.wait(10)
        other = db.create_engine(db_url)
        try:
            other_is_writing.set()
            with db.write(other) as conn:
                value = conn.exec_driver_sql("SELECT n FROM counter").scalar_one()
                conn.execute(sa.text("UPDATE counter SET n = :n"), {"n": value + 10})
        finally:
            other_done.set()
            other.dispose()

    writer = threading.Thread(target=other_writer)
    writer.start()
    run_id = run_to_end(db_url, [(1, "Increment", increment)])
    writer.join(20)
    assert read_run(engine, run_id).status is RunStatus.COMPLETED
    assert scalar(engine, "SELECT n FROM counter") == 11
    engine.dispose()


def test_sub_progress_is_readable_from_another_connection_during_the_phase(db_url, engine):
    """ctx.progress() reaches the database (throttled) while the phase is still running."""
    release = threading.Event()

    def slow(conn, ctx):
        ctx.progress(40, 200)
        assert release.wait(20)

    executor = Executor(db_url, [(1, "Slow", slow)], heartbeat_seconds=0.1)
    run_id, thread = executor.start_reserved({})
    try:

        def progress_written():
            run = read_run(engine, run_id)
            return run if run.phase_progress_current == 40 else None

        run = wait_for(progress_written, timeout=10)
        assert run.phase_progress_total == 200
        assert run.status is RunStatus.RUNNING
        assert run.percent == 20.0
    finally:
        release.set()
        thread.join(10)
    run = read_run(engine, run_id)
    assert run.status is RunStatus.COMPLETED
    assert run.phase_progress_current is None


def test_progress_never_goes_backwards_and_ignores_nonsense(db_url):
    """Negative, oversized, zero-total and non-numeric progress never fail the phase."""
    observed = []

    def noisy(conn, ctx):
        for current, total in [(5, 10), (-3, 10), (50, 10), (2, 10), (1, 0), ("x", None), (7, 10)]:
            ctx.progress(current, total)
            observed.append(ctx._progress[1:])

    run_id = run_to_end(db_url, [(1, "Noisy", noisy)])
    assert observed == [(5, 10), (5, 10), (10, 10), (10, 10), (10, 10), (10, 10), (10, 10)]
    engine = db.create_engine(db_url)
    try:
        assert read_run(engine, run_id).status is RunStatus.COMPLETED
    finally:
        engine.dispose()


def test_a_phase_that_closes_its_connection_fails_truthfully(db_url, engine):
    """Closing or committing the runner's transaction is reported, not silently accepted."""

    def closes(conn, ctx):
        conn.close()

    def commits(conn, ctx):
        conn.commit()

    for fn in (closes, commits):
        run_id = run_to_end(db_url, [(1, "Misbehaves", fn), (2, "Never", insert_item)])
        run = read_run(engine, run_id)
        assert run.status is RunStatus.FAILED, fn.__name__
        assert "leave its transaction to the runner" in (run.error_message or "")


def test_non_daemon_runner_finishes_after_main_thread_returns(tmp_path, db_url, engine):
    """A process whose main thread returns right after starting a run still completes it."""
    script = tmp_path / "starter.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import time
            from pipeline.orchestrator import start_run

            def slow(conn, ctx):
                time.sleep(1.0)
                conn.exec_driver_sql("CREATE TABLE proof (x INTEGER)")

            run_id, thread = start_run({db_url!r}, {{}}, [(1, "Slow", slow)])
            print(run_id, flush=True)
            # the main thread ends here, while the run is still in its phase
            """
        )
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=os.environ
    )
    assert result.returncode == 0, result.stderr
    run = read_run(engine, int(result.stdout.strip()))
    assert run.status is RunStatus.COMPLETED
    assert "proof" in sa.inspect(engine).get_table_names()
