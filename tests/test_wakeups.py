"""An idle worker starts queued runs at once, up to its concurrency.

Queued runs found at start or at a poll get a runner each (not one per poll);
on PostgreSQL a worker hears of a new run through ``LISTEN/NOTIFY`` and starts
it without waiting for its poll (set to 30 s here, so only the notification
can explain a start within seconds), also after its listening connection was
killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline import db, runs
from pipeline.notify import APPLICATION_NAME, CHANNEL

from .conftest import is_sqlite_url, wait_for

ROOT = Path(__file__).resolve().parents[1]


class Worker:
    """One `pipeline worker` process executing tests.registries:HELD."""

    def __init__(self, db_url: str, tmp_path: Path, *, poll: float, concurrency: int = 4) -> None:
        self.signals = tmp_path / "signals"
        self.signals.mkdir(exist_ok=True)
        self.log = tmp_path / "worker.log"
        env = {
            **os.environ,
            "PIPELINE_DATABASE_URL": db_url,
            "PIPELINE_PHASES": "tests.registries:HELD",
            "PIPELINE_POLL_SECONDS": str(poll),
            "PIPELINE_TEST_DIR": str(self.signals),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        }
        argv = [sys.executable, "-m", "pipeline.cli", "worker", "--concurrency", str(concurrency)]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: "ready" in self.log.read_text(errors="replace"), timeout=30)

    def held(self) -> int:
        """How many runs have entered their held phase so far."""
        return len(list(self.signals.glob("held-*")))

    def release(self) -> None:
        (self.signals / "release").touch()

    def stop(self) -> None:
        self.release()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def start_worker(db_url: str, tmp_path: Path) -> Iterator[type[Worker]]:
    started: list[Worker] = []

    def start(poll: float) -> Worker:
        worker = Worker(db_url, tmp_path, poll=poll)
        started.append(worker)
        return worker

    yield start  # type: ignore[misc]
    for worker in started:
        worker.stop()


def enqueue(engine: Engine, count: int) -> list[int]:
    with db.write(engine) as conn:
        return [runs.create_run(conn, params={}, pipeline="held").id for _ in range(count)]


def running(engine: Engine) -> int:
    with db.read(engine) as conn:
        return runs.count_by_status(conn).get(runs.RunStatus.RUNNING, 0)


def test_runs_queued_before_start_get_a_runner_each_at_once(db_url, engine, start_worker):
    enqueue(engine, 6)
    worker = start_worker(poll=30)
    # All four runners start now, not one per 30 s poll.
    wait_for(lambda: worker.held() == 4, timeout=15)
    assert running(engine) == 4
    worker.release()
    wait_for(lambda: running(engine) == 0 and worker.held() == 6, timeout=30)


def test_runs_queued_by_another_process_reach_the_concurrency_at_the_next_poll(
    db_url, engine, start_worker
):
    """SQLite: found by the poll (5 s), all four at once; PostgreSQL: notified at once."""
    worker = start_worker(poll=5 if is_sqlite_url(db_url) else 30)
    enqueue(engine, 4)
    # One poll (or one notification) starts all four; one per poll would take 20 s.
    wait_for(lambda: worker.held() == 4, timeout=8)


def listener_backends(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT pid FROM pg_stat_activity WHERE application_name = :name "
                "AND query = :listen"
            ),
            {"name": APPLICATION_NAME, "listen": f"LISTEN {CHANNEL}"},
        )
        return [row[0] for row in rows]


def test_a_worker_hears_of_a_new_run_after_its_listener_was_killed(db_url, engine, start_worker):
    if is_sqlite_url(db_url):
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    worker = start_worker(poll=30)
    (first,) = wait_for(lambda: listener_backends(engine), timeout=15)
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
    # It listens again on a new connection, and a new run starts at once.
    (again,) = wait_for(lambda: [p for p in listener_backends(engine) if p != first], timeout=15)
    assert again != first
    enqueue(engine, 1)
    wait_for(lambda: worker.held() == 1, timeout=5)
