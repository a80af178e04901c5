"""The invariant checker: silent on what real runs leave, loud on every corruption."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline import db, runs
from pipeline.check import check_database
from pipeline.orchestrator import Executor, RunContext, load_registry, start_run
from pipeline.runs import RunStatus

from .conftest import read_run, wait_for

ROOT = Path(__file__).resolve().parents[1]

# -- registries ---------------------------------------------------------------------

# Phases and tests meet through events keyed by a token in the run's params
# (run ids repeat from one test database to the next).
_events: dict[tuple[str, str], threading.Event] = {}
_events_lock = threading.Lock()
_failed_once: set[str] = set()


def event(name: str, token: str) -> threading.Event:
    with _events_lock:
        return _events.setdefault((name, token), threading.Event())


def new_token() -> str:
    return uuid.uuid4().hex


def quick(conn: Connection, ctx: RunContext) -> None:
    ctx.progress(1, 2)
    conn.exec_driver_sql("SELECT 1")
    ctx.progress(2, 2)


def warns(conn: Connection, ctx: RunContext) -> None:
    ctx.warn(f"a warning from phase {ctx.phase_num}")
    quick(conn, ctx)


def fails(conn: Connection, ctx: RunContext) -> None:
    ctx.warn("about to fail")
    raise RuntimeError("the analysis could not finish")


def fails_once(conn: Connection, ctx: RunContext) -> None:
    if ctx.params["token"] not in _failed_once:
        _failed_once.add(ctx.params["token"])
        raise RuntimeError("first attempt fails")
    quick(conn, ctx)


def gated(conn: Connection, ctx: RunContext) -> None:
    """Holds the run in this phase (running) until the test opens the gate."""
    ctx.progress(1, 3)
    event("entered", ctx.params["token"]).set()
    if not event("gate", ctx.params["token"]).wait(30):
        raise TimeoutError("the gate never opened")
    quick(conn, ctx)


def until_cancelled(conn: Connection, ctx: RunContext) -> None:
    event("entered", ctx.params["token"]).set()
    deadline = time.monotonic() + 30
    step = 0
    while time.monotonic() < deadline:
        ctx.raise_if_cancelled()
        step += 1
        ctx.progress(step, 10_000)  # a heartbeat is written (and a cancel learned) each second
        time.sleep(0.01)
    raise TimeoutError("never cancelled")


COMPLETES = [(1, "Warns", warns), (2, "Quick", quick)]
FAILS = [(1, "Quick", quick), (2, "Fails", fails), (3, "Never", quick)]
FAILS_ONCE = [(1, "Quick", quick), (2, "Fails once", fails_once), (3, "Quick", quick)]
GATED = [(1, "Gated", gated), (2, "Quick", quick), (3, "Quick too", quick)]
CANCEL_INSIDE = [(1, "Quick", quick), (2, "Until cancelled", until_cancelled), (3, "Quick", quick)]


# -- helpers -------------------------------------------------------------------------


def run_to_end(url: str, registry, params=None) -> int:
    run_id, thread = start_run(url, params or {}, registry)
    thread.join(30)
    assert not thread.is_alive()
    return run_id


def create_queued(url: str) -> int:
    engine = db.create_engine(url)
    try:
        with db.write(engine) as conn:
            return runs.create_run(conn, params={"q": 1}).id
    finally:
        engine.dispose()


def cancel(url: str, run_id: int) -> None:
    engine = db.create_engine(url)
    try:
        with db.write(engine) as conn:
            assert runs.request_cancel(conn, run_id=run_id) is runs.Outcome.DONE
    finally:
        engine.dispose()


def resume(url: str, run_id: int) -> None:
    engine = db.create_engine(url)
    try:
        with db.write(engine) as conn:
            recorded = runs.recorded_phases(conn, run_id=run_id)
            assert runs.resume(conn, run_id=run_id, phases=recorded) is runs.Outcome.DONE
    finally:
        engine.dispose()


def snapshot(url: str, target: Path) -> str:
    """A consistent copy of a live SQLite database (WAL content included)."""
    source = sqlite3.connect(sa_path(url))
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)
    finally:
        copy.close()
        source.close()
    return f"sqlite:///{target}"


def sa_path(url: str) -> str:
    return url.removeprefix("sqlite:///")


def check(url: str, *, expect_idle: bool = False) -> list[str]:
    engine = db.create_engine(url)
    try:
        return check_database(engine, expect_idle=expect_idle)
    finally:
        engine.dispose()


def start_gated(url: str) -> tuple[int, threading.Thread, str]:
    """A run held inside its first phase (running) until ``event("gate", token)`` is set."""
    token = new_token()
    run_id, thread = start_run(url, {"token": token}, GATED)
    assert event("entered", token).wait(30)
    return run_id, thread, token


# -- real runs leave nothing to report ----------------------------------------------


def test_no_violation_after_real_runs_of_every_outcome(db_url, engine):
    """Completed, failed, cancelled (queued, at a boundary, inside a phase), resumed: all clean."""
    url = db_url
    completed = run_to_end(url, COMPLETES, {"k": 1})
    example = run_to_end(url, load_registry("pipeline.example:PHASES"), {"fetch_delay": 0})
    failed = run_to_end(url, FAILS)

    # Cancelled at the boundary: the phase in flight commits, the next stays pending.
    at_boundary, thread, token = start_gated(url)
    cancel(url, at_boundary)
    event("gate", token).set()
    thread.join(30)

    # Cancelled inside a phase that checks (the runner learns of it by its heartbeat).
    token = new_token()
    inside, thread = start_run(url, {"token": token}, CANCEL_INSIDE)
    assert event("entered", token).wait(30)
    cancel(url, inside)
    thread.join(30)

    # Failed, resumed (queued again with its completed phase kept), then completed
    # by an executor that claims it (so nothing else may be queued meanwhile).
    again = run_to_end(url, FAILS_ONCE, {"token": new_token()})
    assert read_run(engine, again).status is RunStatus.FAILED
    resume(url, again)
    assert check(url) == []
    executor = Executor(url, FAILS_ONCE)
    try:
        executor.wake()
        wait_for(lambda: read_run(engine, again).status is RunStatus.COMPLETED, timeout=30)
    finally:
        assert executor.shutdown(wait=True, timeout=30)

    # Resumed, then cancelled while queued; queued; cancelled while queued.
    failed_again = run_to_end(url, FAILS)
    resume(url, failed_again)
    cancel(url, failed_again)
    queued = create_queued(url)
    cancelled_queued = create_queued(url)
    cancel(url, cancelled_queued)

    outcomes = {
        completed: RunStatus.COMPLETED,
        example: RunStatus.COMPLETED,
        failed: RunStatus.FAILED,
        at_boundary: RunStatus.CANCELLED,
        inside: RunStatus.CANCELLED,
        again: RunStatus.COMPLETED,
        failed_again: RunStatus.CANCELLED,
        queued: RunStatus.QUEUED,
        cancelled_queued: RunStatus.CANCELLED,
    }
    assert {i: read_run(engine, i).status for i in outcomes} == outcomes
    phases = {i: [p.status for p in read_run(engine, i).phases] for i in outcomes}
    assert phases[at_boundary] == ["completed", "pending", "pending"]
    assert phases[inside] == ["completed", "cancelled", "pending"]
    assert phases[failed] == ["completed", "failed", "pending"]
    assert phases[failed_again] == ["completed", "pending", "pending"]
    assert phases[again] == ["completed"] * 3
    assert check(url, expect_idle=True) == []


def test_no_violation_in_the_middle_of_a_run_but_not_idle(db_url):
    """A run in flight is consistent, and only ``expect_idle`` reports it as still running."""
    run_id, thread, token = start_gated(db_url)
    try:
        assert check(db_url) == []
        problems = check(db_url, expect_idle=True)
        assert len(problems) == 1
        assert problems[0].startswith(f"run {run_id} (running): still running")
    finally:
        event("gate", token).set()
        thread.join(30)
    assert check(db_url, expect_idle=True) == []


# -- every corruption is reported ----------------------------------------------------


@pytest.fixture(scope="module")
def corruptible(tmp_path_factory: pytest.TempPathFactory, migrated_template: Path):
    """A database with a run in every state, one of them running (copied mid-run).

    Returns the copy's path and the ids, by state.
    """
    directory = tmp_path_factory.mktemp("corruptible")
    live = directory / "live.db"
    shutil.copy(migrated_template, live)
    url = f"sqlite:///{live}"
    ids = {
        "completed": run_to_end(url, COMPLETES),
        "failed": run_to_end(url, FAILS),
        "queued": create_queued(url),
        "cancelled": create_queued(url),
    }
    cancel(url, ids["cancelled"])
    ids["running"], thread, token = start_gated(url)
    try:
        snapshot(url, directory / "base.db")
    finally:
        event("gate", token).set()
        thread.join(30)
    return directory / "base.db", ids


@pytest.fixture
def corrupt(corruptible, tmp_path):
    """Copy the base database, apply SQL to it with sqlite3 (no foreign keys), check it."""
    base, ids = corruptible
    path = tmp_path / "corrupt.db"
    shutil.copy(base, path)

    def apply(sql: str, *, ignore_checks: bool = False) -> list[str]:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            if ignore_checks:
                conn.execute("PRAGMA ignore_check_constraints = ON")
            conn.executescript(sql.format(**ids))
        finally:
            conn.close()
        return check(f"sqlite:///{path}")

    return apply


def test_the_base_database_is_clean(corruptible):
    """The database the corruptions start from has nothing to report (but its running run)."""
    base, ids = corruptible
    url = f"sqlite:///{base}"
    assert check(url) == []
    assert [line.split(":")[0] for line in check(url, expect_idle=True)] == [
        f"run {ids['running']} (running)"
    ]


CORRUPTIONS = [
    # status against timestamps and messages
    (
        "completed_no_completed_at",
        "UPDATE analysis_runs SET completed_at = NULL WHERE id = {completed}",
        "run {completed} (completed): completed_at is not set",
    ),
    (
        "completed_no_started_at",
        "UPDATE analysis_runs SET started_at = NULL WHERE id = {completed}",
        "run {completed} (completed): started_at is not set",
    ),
    (
        "completed_progress_short",
        "UPDATE analysis_runs SET progress_current = 1 WHERE id = {completed}",
        "run {completed} (completed): completed with progress 1/2",
    ),
    (
        "failed_no_error",
        "UPDATE analysis_runs SET error_message = NULL WHERE id = {failed}",
        "run {failed} (failed): error_message is not set",
    ),
    (
        "failed_no_completed_at",
        "UPDATE analysis_runs SET completed_at = NULL WHERE id = {failed}",
        "run {failed} (failed): completed_at is not set",
    ),
    (
        "cancelled_no_completed_at",
        "UPDATE analysis_runs SET completed_at = NULL WHERE id = {cancelled}",
        "run {cancelled} (cancelled): completed_at is not set",
    ),
    (
        "cancelled_without_request",
        "UPDATE analysis_runs SET cancel_requested_at = NULL WHERE id = {cancelled}",
        "run {cancelled} (cancelled): cancelled without a cancel request",
    ),
    (
        "queued_with_completed_at",
        "UPDATE analysis_runs SET completed_at = created_at WHERE id = {queued}",
        "run {queued} (queued): completed_at is set although",
    ),
    (
        "queued_with_cancel_request",
        "UPDATE analysis_runs SET cancel_requested_at = created_at WHERE id = {queued}",
        "run {queued} (queued): queued with a pending cancel request",
    ),
    (
        "completed_with_error",
        "UPDATE analysis_runs SET error_message = 'x' WHERE id = {completed}",
        "run {completed} (completed): error_message is set although",
    ),
    (
        "running_no_started_at",
        "UPDATE analysis_runs SET started_at = NULL WHERE id = {running}",
        "run {running} (running): started_at is not set",
    ),
    (
        "running_with_completed_at",
        "UPDATE analysis_runs SET completed_at = started_at WHERE id = {running}",
        "run {running} (running): completed_at is set although",
    ),
    (
        "running_phase_zero",
        "UPDATE analysis_runs SET current_phase = 0 WHERE id = {running}",
        "run {running} (running): current_phase 0 is not between 1 and progress_total 3",
    ),
    (
        "running_phase_beyond",
        "UPDATE analysis_runs SET current_phase = 4 WHERE id = {running}",
        "run {running} (running): current_phase 4 is not between 1 and progress_total 3",
    ),
    (
        "running_no_owner",
        "UPDATE analysis_runs SET owner = NULL WHERE id = {running}",
        "run {running} (running): running without an owner",
    ),
    (
        "running_no_heartbeat",
        "UPDATE analysis_runs SET heartbeat_at = NULL WHERE id = {running}",
        "run {running} (running): running without a heartbeat",
    ),
    (
        "unknown_status",
        "UPDATE analysis_runs SET status = 'paused' WHERE id = {queued}",
        "run {queued} (paused): unknown status 'paused'",
    ),
    # progress
    (
        "progress_beyond_total",
        "UPDATE analysis_runs SET progress_current = 4 WHERE id = {failed}",
        "run {failed} (failed): progress_current 4 is beyond progress_total 3",
    ),
    (
        "progress_negative",
        "UPDATE analysis_runs SET progress_current = -1 WHERE id = {queued}",
        "run {queued} (queued): progress_current is -1",
    ),
    (
        "sub_progress_on_ended_run",
        "UPDATE analysis_runs SET phase_progress_current = 1, phase_progress_total = 2 "
        "WHERE id = {failed}",
        "run {failed} (failed): sub-progress 1/2 left on a run that is not running",
    ),
    (
        "sub_progress_beyond",
        "UPDATE analysis_runs SET phase_progress_current = 5, phase_progress_total = 2 "
        "WHERE id = {running}",
        "run {running} (running): sub-progress 5/2 is out of range",
    ),
    # timestamps in order
    (
        "completed_before_started",
        "UPDATE analysis_runs SET completed_at = datetime(started_at, '-1 day') "
        "WHERE id = {completed}",
        "run {completed} (completed): completed_at … is before started_at",
    ),
    (
        "started_before_created",
        "UPDATE analysis_runs SET created_at = datetime(started_at, '+1 hour') "
        "WHERE id = {running}",
        "run {running} (running): started_at … is before created_at",
    ),
    (
        "cancelled_before_created",
        "UPDATE analysis_runs SET completed_at = datetime(created_at, '-1 hour') "
        "WHERE id = {cancelled}",
        "run {cancelled} (cancelled): completed_at … is before created_at",
    ),
    # phase rows against their run
    (
        "phase_row_missing",
        "DELETE FROM run_phases WHERE run_id = {completed} AND phase_num = 2",
        "run {completed} (completed): phase rows are numbered [1], expected 1..2",
    ),
    (
        "phase_numbering_gap",
        "UPDATE run_phases SET phase_num = 3 WHERE run_id = {completed} AND phase_num = 2",
        "run {completed} (completed): phase rows are numbered [1, 3], expected 1..2",
    ),
    (
        "phase_rows_before_start",
        "INSERT INTO run_phases (run_id, phase_num, label, status, attempts) "
        "VALUES ({queued}, 1, 'One', 'pending', 0)",
        "run {queued} (queued): 1 phase row(s) although the run never started",
    ),
    (
        "progress_total_before_start",
        "UPDATE analysis_runs SET progress_total = 3 WHERE id = {queued}",
        "run {queued} (queued): never started, yet",
    ),
    (
        "completed_run_pending_phase",
        "UPDATE run_phases SET status = 'pending', finished_at = NULL "
        "WHERE run_id = {completed} AND phase_num = 2",
        "run {completed} (completed): progress_current is 2 but 1 phase row(s) are completed",
    ),
    (
        "progress_not_completed_count",
        "UPDATE analysis_runs SET progress_current = 0 WHERE id = {failed}",
        "run {failed} (failed): progress_current is 0 but 1 phase row(s) are completed",
    ),
    (
        "completed_phases_not_a_prefix",
        "UPDATE run_phases SET status = 'pending', finished_at = NULL "
        "WHERE run_id = {completed} AND phase_num = 1",
        "run {completed} (completed): the completed phases [2] are not the first ones",
    ),
    (
        "two_running_phases",
        "UPDATE run_phases SET status = 'running', started_at = "
        "(SELECT started_at FROM analysis_runs WHERE id = {running}), attempts = 1 "
        "WHERE run_id = {running} AND phase_num = 2",
        "run {running} (running): 2 phase rows are running: [1, 2]",
    ),
    (
        "running_phase_in_failed_run",
        "UPDATE run_phases SET status = 'running', finished_at = NULL "
        "WHERE run_id = {failed} AND phase_num = 2",
        "run {failed} (failed): phase 2 (the one after the completed ones) is 'running'",
    ),
    (
        "running_run_without_running_phase",
        "UPDATE run_phases SET status = 'pending' WHERE run_id = {running} AND phase_num = 1",
        "run {running} (running): phase 1 (the one after the completed ones) is 'pending'",
    ),
    (
        "current_phase_not_the_running_one",
        "UPDATE analysis_runs SET current_phase = 2 WHERE id = {running}",
        "run {running} (running): current_phase is 2, expected 1",
    ),
    (
        "phase_label_mismatch",
        "UPDATE analysis_runs SET phase_label = 'Other' WHERE id = {running}",
        "run {running} (running): phase_label 'Other' is not the label of phase 1",
    ),
    (
        "failed_run_without_failed_phase",
        "UPDATE run_phases SET status = 'pending', finished_at = NULL "
        "WHERE run_id = {failed} AND phase_num = 2",
        "run {failed} (failed): phase 2 (the one after the completed ones) is 'pending'",
    ),
    (
        "later_phase_not_pending",
        "UPDATE run_phases SET status = 'failed', finished_at = "
        "(SELECT completed_at FROM analysis_runs WHERE id = {failed}), attempts = 1, started_at = "
        "(SELECT started_at FROM analysis_runs WHERE id = {failed}) "
        "WHERE run_id = {failed} AND phase_num = 3",
        "run {failed} (failed): phase 3 is 'failed' after phase 2, expected 'pending'",
    ),
    (
        "completed_phase_not_finished",
        "UPDATE run_phases SET finished_at = NULL WHERE run_id = {completed} AND phase_num = 1",
        "run {completed} (completed): phase 1 (completed): finished_at is not set",
    ),
    (
        "completed_phase_never_attempted",
        "UPDATE run_phases SET attempts = 0 WHERE run_id = {completed} AND phase_num = 1",
        "run {completed} (completed): phase 1 (completed): attempts is 0",
    ),
    (
        "phase_finished_before_started",
        "UPDATE run_phases SET finished_at = datetime(started_at, '-1 hour') "
        "WHERE run_id = {completed} AND phase_num = 2",
        "run {completed} (completed): phase 2 (completed): finished_at … is before started_at",
    ),
    (
        "phase_finished_after_run",
        "UPDATE run_phases SET finished_at = datetime(finished_at, '+1 hour') "
        "WHERE run_id = {completed} AND phase_num = 2",
        "run {completed} (completed): phase 2 (completed): "
        "finished_at … is after the run's completed_at",
    ),
    (
        "phase_started_before_run",
        "UPDATE run_phases SET started_at = datetime(started_at, '-1 hour') "
        "WHERE run_id = {completed} AND phase_num = 1",
        "run {completed} (completed): phase 1 (completed): started_at … is before the run's",
    ),
    (
        "pending_phase_with_finished_at",
        "UPDATE run_phases SET finished_at = (SELECT completed_at FROM analysis_runs WHERE id = "
        "{failed}) WHERE run_id = {failed} AND phase_num = 3",
        "run {failed} (failed): phase 3 (pending): finished_at is set although",
    ),
    (
        "unknown_phase_status",
        "UPDATE run_phases SET status = 'skipped' WHERE run_id = {failed} AND phase_num = 3",
        "run {failed} (failed): phase 3 (skipped): unknown phase status",
    ),
    # across tables
    (
        "warning_of_missing_run",
        "INSERT INTO run_warnings (run_id, phase, message, created_at) "
        "VALUES (999, NULL, 'lost', '2026-01-01 00:00:00.000000')",
        "warning … references no run (run_id 999 does not exist)",
    ),
    (
        "warning_of_missing_phase",
        "INSERT INTO run_warnings (run_id, phase, message, created_at) "
        "VALUES ({completed}, 7, 'which phase?', '2026-01-01 00:00:00.000000')",
        "of run {completed} names phase 7, which the run does not have",
    ),
    (
        "phase_row_of_missing_run",
        "INSERT INTO run_phases (run_id, phase_num, label, status, attempts) "
        "VALUES (999, 1, 'One', 'pending', 0)",
        "phase row 1 references no run (run_id 999 does not exist)",
    ),
    (
        "foreign_key_check",
        "INSERT INTO example_comments (run_id, comment_id, thread_id, author, body, created_utc) "
        "VALUES (999, 'c', 't', 'a', 'b', 0)",
        "foreign_key_check: example_comments row",
    ),
]


@pytest.mark.parametrize(
    ("sql", "expected"), [pytest.param(sql, want, id=name) for name, sql, want in CORRUPTIONS]
)
def test_each_corruption_is_reported(corrupt, corruptible, sql, expected):
    """One corrupted row, one named violation."""
    _, ids = corruptible
    problems = corrupt(sql, ignore_checks=True)
    # "…" in the expected text stands for anything (a timestamp, an id).
    pattern = ".*".join(re.escape(part) for part in expected.format(**ids).split("…"))
    assert any(re.search(pattern, problem) for problem in problems), problems


def test_a_warning_of_a_missing_run_is_named(corrupt):
    """An orphan warning is named by the checker itself, and by SQLite's foreign key check."""
    problems = corrupt(
        "INSERT INTO run_warnings (run_id, phase, message, created_at) "
        "VALUES (999, NULL, 'lost', '2026-01-01 00:00:00.000000')"
    )
    assert any(p.endswith("references no run (run_id 999 does not exist)") for p in problems)
    assert any(p.startswith("foreign_key_check: run_warnings row") for p in problems)


def test_integrity_check_failure_is_reported(corrupt):
    """A broken index (its recorded definition no longer matches its content) is reported."""
    problems = corrupt(
        "PRAGMA writable_schema = ON;"
        "UPDATE sqlite_master SET sql = "
        "'CREATE INDEX ix_analysis_runs_status_id ON analysis_runs (progress_current, id)' "
        "WHERE name = 'ix_analysis_runs_status_id';"
        "PRAGMA writable_schema = OFF;"
    )
    assert any(p.startswith("integrity_check: ") for p in problems), problems


# -- the command line ------------------------------------------------------------------


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.check", *args],
        env={
            **os.environ,
            "PIPELINE_DATABASE_URL": url,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_exits_0_on_a_clean_database_and_1_with_violations(corruptible, tmp_path):
    """`python -m pipeline.check` prints the violations and exits 1 when there are any."""
    base, ids = corruptible
    url = f"sqlite:///{base}"
    clean = cli(url)
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout == ""
    busy = cli(url, "--expect-idle")
    assert busy.returncode == 1
    assert busy.stdout.startswith(f"run {ids['running']} (running): still running")
    assert "1 violation(s)" in busy.stderr


def test_cli_refuses_an_unmigrated_database(tmp_path):
    """An unmigrated database is refused with exit code 2 and the way to fix it."""
    result = cli(f"sqlite:///{tmp_path / 'empty.db'}")
    assert result.returncode == 2
    assert "pipeline migrate" in result.stderr


def test_a_corruption_is_reported_on_every_backend(db_url, engine):
    """The same rule holds on PostgreSQL as on SQLite: completed means completed_at is set."""
    run_id = run_to_end(db_url, COMPLETES)
    assert check(db_url) == []
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE analysis_runs SET completed_at = NULL WHERE id = :id"), {"id": run_id}
        )
    assert check(db_url) == [
        f"run {run_id} (completed): completed_at is not set although the run ended"
    ]
