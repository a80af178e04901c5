"""Many `pipeline worker` processes on one database: each run claimed once, none lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipeline import db, runs
from pipeline.runs import RunStatus

from .conftest import scalar, wait_for
from .ledger import PHASES, create_ledger

ROOT = Path(__file__).resolve().parents[1]


class Workers:
    """Worker subprocesses with their logs in tmp_path."""

    def __init__(self, db_url: str, tmp_path: Path, **env: str) -> None:
        self.db_url = db_url
        self.tmp_path = tmp_path
        self.env = {
            **os.environ,
            "PIPELINE_DATABASE_URL": db_url,
            "PIPELINE_PHASES": "tests.ledger:PHASES",
            "PYTHONPATH": str(ROOT),
            "PIPELINE_POLL_SECONDS": "0.05",
            "PIPELINE_SWEEP_SECONDS": "0.5",
            **env,
        }
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, count: int, concurrency: int) -> None:
        for index in range(count):
            log = (self.tmp_path / f"worker-{len(self.processes)}-{index}.log").open("ab")
            self.processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "pipeline.cli",
                        "worker",
                        "--concurrency",
                        str(concurrency),
                    ],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.tmp_path.glob("*.log")))

    def stop(self) -> list[int]:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        return [process.wait(60) for process in self.processes]

    def kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(30)


@pytest.fixture
def workers(db_url, tmp_path):
    pool = Workers(db_url, tmp_path)
    yield pool
    pool.kill_all()


def enqueue(engine, count, params=None):
    with db.write(engine) as conn:
        return [runs.create_run(conn, params=params or {}) for _ in range(count)]


def duplicates(engine):
    with db.read(engine) as conn:
        return conn.execute(
            sa.text(
                "SELECT run_id, phase, count(*) FROM ledger GROUP BY run_id, phase "
                "HAVING count(*) > 1"
            )
        ).all()


def statuses(engine):
    with db.read(engine) as conn:
        return runs.count_by_status(conn)


def test_claim_race_each_run_is_claimed_exactly_once(db_url, engine, workers):
    """Workers polling an empty queue, then 100 runs at once: each executed exactly once."""
    create_ledger(engine)
    workers.start(4, concurrency=3)
    wait_for(lambda: workers.logs().count(" ready: ") == 4, timeout=60)
    started = time.monotonic()
    ids = enqueue(engine, 100, {"sleep": 0})
    wait_for(lambda: statuses(engine)[RunStatus.COMPLETED] == 100, timeout=120, interval=0.1)
    elapsed = time.monotonic() - started
    assert workers.stop() == [0, 0, 0, 0], workers.logs()
    assert duplicates(engine) == []
    assert scalar(engine, "SELECT count(*) FROM ledger") == 100 * len(PHASES)
    owners = scalar(engine, "SELECT count(DISTINCT pid) FROM ledger")
    print(f"\n100 runs by 4 workers in {elapsed:.2f}s ({100 / elapsed:.0f} runs/s), {owners} pids")
    assert owners > 1
    assert len(ids) == 100


@pytest.mark.parametrize("auto_resume", [True, False], ids=["auto-resume", "fail-lost"])
def test_killed_worker_loses_nothing(db_url, engine, tmp_path, auto_resume):
    """3 workers, 200 runs, one SIGKILLed mid-run: all end; with auto-resume all complete once."""
    create_ledger(engine)
    pool = Workers(db_url, tmp_path, PIPELINE_AUTO_RESUME="true" if auto_resume else "false")
    try:
        enqueue(engine, 200, {"sleep": 0.01})
        pool.start(3, concurrency=4)
        wait_for(lambda: pool.logs().count(" ready: ") == 3, timeout=60)
        started = time.monotonic()
        victim = pool.processes[0]

        def victim_is_running_runs():
            with db.read(engine) as conn:
                return conn.execute(
                    sa.text(
                        "SELECT count(*) FROM analysis_runs WHERE status = 'running' "
                        "AND owner LIKE :pid"
                    ),
                    {"pid": f"%:{victim.pid}:%"},
                ).scalar()

        wait_for(lambda: scalar(engine, "SELECT count(*) FROM ledger") > 150, timeout=60)
        wait_for(victim_is_running_runs, timeout=60, interval=0.005)
        victim.kill()
        victim.wait(30)

        def all_terminal():
            counts = statuses(engine)
            return counts[RunStatus.QUEUED] == counts[RunStatus.RUNNING] == 0

        wait_for(all_terminal, timeout=180, interval=0.1)
        elapsed = time.monotonic() - started
        assert pool.stop()[1:] == [0, 0], pool.logs()
    finally:
        pool.kill_all()
    counts = statuses(engine)
    print(
        f"\n200 runs, 3 workers (one killed): {elapsed:.2f}s, {200 / elapsed:.0f} runs/s, {counts}"
    )
    assert duplicates(engine) == []
    if auto_resume:
        assert counts[RunStatus.COMPLETED] == 200
        assert scalar(engine, "SELECT count(*) FROM ledger") == 200 * len(PHASES)
        requeued = scalar(
            engine,
            "SELECT count(DISTINCT run_id) FROM run_warnings WHERE message LIKE :m",
            m="interrupted during phase %; queued again to continue",
        )
        assert requeued >= 1
    else:
        assert counts[RunStatus.FAILED] >= 1
        assert counts[RunStatus.COMPLETED] + counts[RunStatus.FAILED] == 200
        with db.read(engine) as conn:
            messages = (
                conn.execute(
                    sa.text("SELECT error_message FROM analysis_runs WHERE status = 'failed'")
                )
                .scalars()
                .all()
            )
        assert all(m.startswith("interrupted during phase ") for m in messages)


def test_worker_stops_gracefully_on_sigterm(db_url, engine, workers):
    """SIGTERM: no new claims, the running run finishes, exit 0; queued runs stay queued."""
    create_ledger(engine)
    enqueue(engine, 1, {"sleep": 1.0})
    workers.start(1, concurrency=1)
    wait_for(lambda: statuses(engine)[RunStatus.RUNNING] == 1, timeout=30)
    enqueue(engine, 3)
    workers.processes[0].send_signal(signal.SIGTERM)
    assert workers.processes[0].wait(60) == 0, workers.logs()
    counts = statuses(engine)
    assert counts[RunStatus.COMPLETED] == 1
    assert counts[RunStatus.QUEUED] == 3
    assert counts[RunStatus.RUNNING] == 0
