"""A pool runner claims its next run in the transaction that completes the previous one.

One commit fewer per run (issue 14). The claim shares the last phase's
transaction, so it commits with it or not at all: a claim that did not commit
leaves its run queued, held by nobody, for the next claim.
"""

from __future__ import annotations

import sqlite3
import threading

import sqlalchemy as sa

from pipeline import db, liveness, runs
from pipeline.orchestrator import Executor
from pipeline.runs import RunStatus

from .conftest import wait_for


def _noop(conn, ctx):
    return None


REGISTRY = [(1, "One", _noop), (2, "Two", _noop), (3, "Three", _noop)]


def _queue(engine: sa.Engine, n: int) -> list[int]:
    with db.write(engine) as conn:
        return [runs.create_run(conn, params={}).id for _ in range(n)]


def _all_done(engine: sa.Engine, ids: list[int]) -> bool:
    with db.read(engine) as conn:
        found = [runs.get_run_row(conn, run_id=i) for i in ids]
    return all(r is not None and r.status.terminal for r in found)


class _RunnerCommits:
    """Counts the commits made by runner threads of every engine."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, conn: sa.Connection) -> None:
        if threading.current_thread().name.startswith(("pipeline-run", "pipeline-runner")):
            self.count += 1


def test_a_runner_needs_one_commit_per_phase_and_one_to_start(db_url, engine):
    """10 queued runs of 3 phases, 1 runner: 1 claim, 30 phase commits, 1 empty claim."""
    ids = _queue(engine, 10)
    commits = _RunnerCommits()
    sa.event.listen(sa.engine.Engine, "commit", commits)
    executor = Executor(db_url, REGISTRY, max_concurrent=1)
    try:
        executor.wake()
        wait_for(lambda: _all_done(engine, ids), timeout=30)
        assert executor.shutdown(timeout=30)
    finally:
        sa.event.remove(sa.engine.Engine, "commit", commits)
        executor.shutdown(timeout=30)
    with db.read(engine) as conn:
        done = [runs.get_run(conn, run_id=i) for i in ids]
    assert [r.status for r in done if r] == [RunStatus.COMPLETED] * 10
    assert all(p.attempts == 1 for r in done if r for p in r.phases)
    # Without chaining it would be 10 claims + 30 phases + 1 empty claim = 41.
    assert commits.count == 1 + 30 + 1
    assert all((db_url, i) not in liveness.EXECUTING for i in ids)


def test_a_chained_claim_that_does_not_commit_leaves_its_run_queued(sqlite_url):
    """The last phase's transaction fails after the next run was claimed in it.

    The failed run says so; the run claimed in the rolled-back transaction is
    queued again as it was (no hold, no phase rows), and then runs once.
    """
    engine = db.create_engine(sqlite_url)
    ids = _queue(engine, 2)
    failed_once = threading.Event()

    def break_the_commit(conn, cursor, statement, params, context, executemany):
        # The chained claim's phase rows for the second run: fail that statement.
        if (
            statement.startswith("INSERT INTO run_phases")
            and not failed_once.is_set()
            and threading.current_thread().name == f"pipeline-run-{ids[0]}"
        ):
            failed_once.set()
            raise sqlite3.OperationalError("disk I/O error (injected)")

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", break_the_commit)
    executor = Executor(sqlite_url, REGISTRY, max_concurrent=1)
    try:
        executor.wake()
        wait_for(lambda: _all_done(engine, ids), timeout=30)
        assert executor.shutdown(timeout=30)
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", break_the_commit)
        executor.shutdown(timeout=30)
    assert failed_once.is_set()
    with db.read(engine) as conn:
        first, second = (runs.get_run(conn, run_id=i) for i in ids)
    assert first is not None
    assert second is not None
    assert first.status is RunStatus.FAILED
    assert "disk I/O error" in (first.error_message or "")
    assert [p.status for p in first.phases] == ["completed", "completed", "failed"]
    assert second.status is RunStatus.COMPLETED
    assert [p.attempts for p in second.phases] == [1, 1, 1]
    assert all((sqlite_url, i) not in liveness.EXECUTING for i in ids)
    engine.dispose()


def test_a_reserved_run_chains_nothing(db_url, engine):
    """``run --wait``'s runner executes its own run only; queued runs stay for the pool."""
    queued = _queue(engine, 1)
    executor = Executor(db_url, REGISTRY, max_concurrent=1)
    try:
        run_id, thread = executor.start_reserved({})
        thread.join(30)
        assert not thread.is_alive()
        with db.read(engine) as conn:
            mine = runs.get_run_row(conn, run_id=run_id)
            other = runs.get_run_row(conn, run_id=queued[0])
        assert mine is not None
        assert mine.status is RunStatus.COMPLETED
        assert other is not None
        assert other.status is RunStatus.QUEUED
    finally:
        executor.shutdown(timeout=30)
