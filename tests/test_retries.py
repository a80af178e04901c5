"""Per-phase retries: a failed attempt leaves nothing behind, so trying again is safe."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from pipeline import db, phase
from pipeline.orchestrator import Executor, start_run
from pipeline.runs import RunStatus

from .conftest import read_run, scalar, wait_for


class Flaky(Exception):
    pass


@pytest.fixture
def items(engine):
    with db.write(engine) as conn:
        conn.exec_driver_sql("CREATE TABLE items (run_id INTEGER, attempt INTEGER)")
    return engine


def run_to_end(db_url, registry):
    run_id, thread = start_run(db_url, {}, registry)
    thread.join(30)
    assert not thread.is_alive()
    return run_id


def test_declared_error_is_retried_and_writes_apply_once(db_url, items):
    """Two failures with a declared error, then success: completed, 3 attempts, one row."""
    attempts = []

    @phase(retries=3, backoff=0.01, retry_on=(Flaky,))
    def flaky(conn, ctx):
        attempts.append(1)
        conn.execute(
            sa.text("INSERT INTO items VALUES (:r, :a)"), {"r": ctx.run_id, "a": len(attempts)}
        )
        if len(attempts) < 3:
            raise Flaky(f"try {len(attempts)}")

    run_id = run_to_end(db_url, [(1, "Flaky", flaky)])
    run = read_run(items, run_id)
    assert run.status is RunStatus.COMPLETED
    assert run.phases[0].attempts == 3
    assert run.to_dict()["phases"][0]["attempts"] == 3
    assert scalar(items, "SELECT count(*) FROM items") == 1
    assert scalar(items, "SELECT attempt FROM items") == 3
    messages = [w.message for w in run.warnings]
    assert len(messages) == 2
    assert "attempt 1 of phase 1 failed (Flaky: try 1)" in messages[0]


def test_undeclared_error_is_not_retried(db_url, items):
    """An exception outside retry_on fails the run on the first attempt."""
    calls = []

    @phase(retries=3, backoff=0.01, retry_on=(Flaky,))
    def wrong_kind(conn, ctx):
        calls.append(1)
        raise ValueError("not retryable")

    run_id = run_to_end(db_url, [(1, "Wrong", wrong_kind)])
    run = read_run(items, run_id)
    assert calls == [1]
    assert run.status is RunStatus.FAILED
    assert run.error_message == "not retryable"
    assert run.phases[0].attempts == 1


def test_retries_spent_fail_with_the_last_error(db_url, items):
    """When every retry fails, the run fails with the last attempt's message."""

    @phase(retries=2, backoff=0.01, retry_on=(Flaky,))
    def always(conn, ctx):
        conn.execute(sa.text("INSERT INTO items VALUES (:r, 0)"), {"r": ctx.run_id})
        raise Flaky(f"attempt at {ctx.phase_label}")

    run_id = run_to_end(db_url, [(1, "Always", always)])
    run = read_run(items, run_id)
    assert run.status is RunStatus.FAILED
    assert run.phases[0].attempts == 3
    assert run.error_message == "attempt at Always"
    assert scalar(items, "SELECT count(*) FROM items") == 0


def test_undecorated_phase_is_never_retried(db_url, items):
    """No retries unless declared."""
    calls = []

    def plain(conn, ctx):
        calls.append(1)
        raise Flaky("once")

    run_id = run_to_end(db_url, [(1, "Plain", plain)])
    assert calls == [1]
    assert read_run(items, run_id).status is RunStatus.FAILED


def test_cancel_during_backoff_ends_the_run_cancelled_at_once(db_url, items):
    """A cancel request interrupts the wait between attempts; the run ends cancelled."""
    failed_once = threading.Event()

    @phase(retries=5, backoff=60, retry_on=(Flaky,))
    def slow_retry(conn, ctx):
        failed_once.set()
        raise Flaky("wait a minute")

    executor = Executor(db_url, [(1, "Slow retry", slow_retry)], heartbeat_seconds=0.1)
    run_id, thread = executor.start_reserved({})
    assert failed_once.wait(10)
    engine = items
    with db.write(engine) as conn:
        from pipeline import runs

        runs.request_cancel(conn, run_id=run_id)
    # the heartbeat brings the request from the database to the waiting runner
    thread.join(10)
    assert not thread.is_alive()
    wait_for(lambda: read_run(engine, run_id).status.terminal)
    run = read_run(engine, run_id)
    assert run.status is RunStatus.CANCELLED
    assert run.completed_at is not None


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"retries": -1}, id="negative-retries"),
        pytest.param({"retries": 1.5}, id="fractional-retries"),
        pytest.param({"backoff": -1}, id="negative-backoff"),
        pytest.param({"retry_on": ValueError}, id="retry-on-not-a-tuple"),
        pytest.param({"retry_on": ("x",)}, id="retry-on-not-types"),
    ],
)
def test_bad_policies_are_refused_when_declared(kwargs):
    """A nonsensical policy is an error at import time, not at 3 a.m."""
    with pytest.raises(ValueError, match="must"):
        phase(**kwargs)
