"""SQLite's single writer: long phases and foreign locks never become errors for users."""

from __future__ import annotations

import sqlite3
import threading
import time

from fastapi.testclient import TestClient

from pipeline import db
from pipeline.api import create_app
from pipeline.config import Settings
from pipeline.orchestrator import Executor
from pipeline.runs import RunStatus

from .conftest import read_run, wait_for


def test_a_phase_meeting_a_foreign_lock_is_retried_not_failed(sqlite_url):
    """Another process holds the write lock past the busy timeout: the phase tries again."""
    db_url = sqlite_url
    engine = db.create_engine(db_url)
    path = db_url.removeprefix("sqlite:///")
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    in_phase = threading.Event()
    lock_taken = threading.Event()
    attempts = []

    def writes(conn, ctx):
        attempts.append(time.monotonic())
        in_phase.set()
        assert lock_taken.wait(10)
        conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS t (x INTEGER)")

    executor = Executor(db_url, [(1, "Writes", writes)], busy_timeout_ms=200)
    run_id, thread = executor.start_reserved({})
    try:
        assert in_phase.wait(10)
        holder.execute("BEGIN IMMEDIATE")  # the run is claimed; now its phase meets the lock
        lock_taken.set()
        release = threading.Timer(0.6, holder.rollback)
        release.start()
        thread.join(30)
        release.join()
    finally:
        lock_taken.set()
        holder.close()
    run = read_run(engine, run_id)
    assert run.status is RunStatus.COMPLETED, run.error_message
    assert run.phases[0].attempts >= 2
    assert len(attempts) == run.phases[0].attempts


def test_api_writes_during_a_long_phase_succeed_or_get_503(sqlite_url):
    """While a phase holds the write lock for seconds, POST/cancel/resume never 500.

    Each answer is a success after a bounded wait or a 503 with Retry-After, no
    body says "locked", and the phase's sub-progress stays visible meanwhile.
    """
    db_url = sqlite_url
    engine = db.create_engine(db_url)
    holding = threading.Event()
    release = threading.Event()

    def long_writer(conn, ctx):
        if ctx.params.get("hold"):
            conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS held (x INTEGER)")
            holding.set()
            for i in range(1, 31):
                ctx.progress(i, 30)
                if release.wait(0.1):
                    break

    def fails(conn, ctx):
        if ctx.params.get("fail"):
            raise RuntimeError("to be resumed")

    settings = Settings(database_url=db_url, busy_timeout_ms=500, max_concurrent_runs=2)
    app = create_app(settings, registry=[(1, "Hold", long_writer), (2, "Maybe fail", fails)])
    with TestClient(app) as client:
        failed = client.post("/runs", json={"params": {"fail": True}}).json()["id"]
        wait_for(lambda: read_run(engine, failed).status is RunStatus.FAILED)
        holder = client.post("/runs", json={"params": {"hold": True}}).json()["id"]
        assert holding.wait(10)
        answers = []
        started = time.monotonic()
        percents = []
        for _ in range(3):
            answers.append(client.post("/runs", json={}))
            answers.append(client.post(f"/runs/{failed}/resume"))
            answers.append(client.post(f"/runs/{holder}/cancel"))
            percents.append(client.get(f"/runs/{holder}").json()["percent"])
        elapsed = time.monotonic() - started
        release.set()
        for answer in answers:
            assert answer.status_code in (201, 202, 409, 503), answer.text
            assert "locked" not in answer.text.lower()
            if answer.status_code == 503:
                assert answer.headers["Retry-After"] == "1"
                assert answer.json()["detail"]
        assert any(a.status_code == 503 for a in answers), "the lock was never contended"
        assert elapsed < 9 * 0.5 * 2 + 5  # every request waited at most about its busy timeout
        assert percents == sorted(percents)
        assert percents[-1] > 0
        wait_for(lambda: read_run(engine, holder).status.terminal, timeout=20)
        retried = client.post("/runs", json={})
        assert retried.status_code == 201


def test_heartbeat_gives_up_at_once_when_the_lock_is_busy(sqlite_url):
    """The throttled writer never waits for the lock a phase holds (no self-deadlock)."""
    db_url = sqlite_url
    release = threading.Event()
    beats_seen = []

    def holds(conn, ctx):
        conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS held (x INTEGER)")
        for i in range(10):
            ctx.progress(i, 10)
            beats_seen.append(i)
            if release.wait(0.05):
                break

    executor = Executor(db_url, [(1, "Holds", holds)], heartbeat_seconds=0.02)
    started = time.monotonic()
    run_id, thread = executor.start_reserved({})
    thread.join(10)
    assert not thread.is_alive()
    # ten steps of 50 ms: the phase was never slowed down by its own heartbeat
    assert time.monotonic() - started < 5
    engine = db.create_engine(sqlite_url)
    try:
        assert read_run(engine, run_id).status is RunStatus.COMPLETED
    finally:
        engine.dispose()


def test_an_interrupted_wait_for_the_write_gate_leaves_the_queue(monkeypatch):
    """A signal raised while a thread queues for the gate must not leave the gate stuck."""
    gate = db._WriteGate()
    assert gate.acquire(1)  # held by "someone else"

    class Interrupted(threading.Event):
        def wait(self, timeout=None):
            raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.db.threading.Event", Interrupted)
    try:
        gate.acquire(5)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the interrupt was swallowed")
    monkeypatch.undo()
    gate.release()
    assert gate.acquire(0.5), "the gate was handed to a waiter that had left"


def test_a_lock_retry_spends_none_of_the_phases_declared_retries(sqlite_url):
    """A phase allowed one retry still gets it after an attempt lost to a foreign lock."""
    from pipeline import phase

    class Flaky(Exception):
        pass

    engine = db.create_engine(sqlite_url)
    path = sqlite_url.removeprefix("sqlite:///")
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    in_phase, lock_taken = threading.Event(), threading.Event()
    attempts = []

    @phase(retries=1, backoff=0.01, retry_on=(Flaky,))
    def busy_then_flaky(conn, ctx):
        attempts.append(1)
        in_phase.set()
        assert lock_taken.wait(10)
        conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS t (x INTEGER)")  # 1st: busy
        if len(attempts) == 2:
            raise Flaky("once")  # 2nd: a declared failure; 3rd: success

    executor = Executor(sqlite_url, [(1, "Busy then flaky", busy_then_flaky)], busy_timeout_ms=200)
    run_id, thread = executor.start_reserved({})
    try:
        assert in_phase.wait(10)
        holder.execute("BEGIN IMMEDIATE")
        lock_taken.set()
        release = threading.Timer(0.3, holder.rollback)
        release.start()
        thread.join(30)
        release.join()
    finally:
        lock_taken.set()
        holder.close()
    run = read_run(engine, run_id)
    engine.dispose()
    assert run.status is RunStatus.COMPLETED, run.error_message
    assert len(attempts) >= 3
