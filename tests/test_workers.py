"""Many `pipeline worker` processes on one database: each run claimed once, none lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipeline import db, runs
from pipeline.runs import RunStatus

from .conftest import insert_running, scalar, wait_for
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
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
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


def enqueue(engine, count, params=None, pipeline="phases"):
    with db.write(engine) as conn:
        return [
            runs.create_run(conn, params=params or {}, pipeline=pipeline).id for _ in range(count)
        ]


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


def test_each_run_is_executed_by_a_worker_that_knows_its_pipeline(db_url, engine, tmp_path):
    """Two workers knowing different pipelines: each run is executed by the one that knows it."""
    create_ledger(engine)
    left = Workers(db_url, tmp_path / "left", PIPELINE_PHASES="tests.ledger:LEFT")
    right = Workers(db_url, tmp_path / "right", PIPELINE_PHASES="tests.ledger:RIGHT")
    (tmp_path / "left").mkdir()
    (tmp_path / "right").mkdir()
    try:
        stranger = enqueue(engine, 1, pipeline="nobody")[0]
        ids = {name: enqueue(engine, 10, {"sleep": 0}, pipeline=name) for name in ("left", "right")}
        left.start(1, concurrency=2)
        right.start(1, concurrency=2)
        wait_for(lambda: statuses(engine)[RunStatus.COMPLETED] == 20, timeout=120, interval=0.1)
        assert left.stop() == [0], left.logs()
        assert right.stop() == [0], right.logs()
    finally:
        left.kill_all()
        right.kill_all()
    assert duplicates(engine) == []
    for name, pool, phases in (("left", left, 3), ("right", right, 2)):
        with db.read(engine) as conn:
            rows = conn.execute(
                sa.text("SELECT run_id, phase, pid FROM ledger WHERE run_id IN :ids").bindparams(
                    sa.bindparam("ids", expanding=True)
                ),
                {"ids": ids[name]},
            ).all()
        assert {pid for _, _, pid in rows} == {pool.processes[0].pid}
        assert len(rows) == 10 * phases
    assert scalar(engine, f"SELECT status FROM analysis_runs WHERE id = {stranger}") == "queued"


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


def test_api_in_worker_mode_only_queues_and_workers_execute(db_url, engine, workers, tmp_path):
    """PIPELINE_EXECUTOR=worker: the API queues; a worker runs, cancels and resumes the same."""
    from fastapi.testclient import TestClient

    from pipeline.api import create_app
    from pipeline.config import Settings

    create_ledger(engine)
    settings = Settings(database_url=db_url, executor="worker", poll_seconds=0.05)
    with TestClient(create_app(settings, registry=PHASES)) as client:
        queued = client.post("/runs", json={"params": {"sleep": 0}}).json()["id"]
        # no worker yet: the API process never starts it
        with db.read(engine) as conn:
            assert runs.get_status(conn, run_id=queued) is RunStatus.QUEUED
        workers.start(1, concurrency=2)
        wait_for(lambda: client.get(f"/runs/{queued}").json()["status"] == "completed", timeout=60)

        slow = client.post("/runs", json={"params": {"sleep": 2.0}}).json()["id"]
        wait_for(lambda: client.get(f"/runs/{slow}").json()["status"] == "running", timeout=30)
        assert client.post(f"/runs/{slow}/cancel").status_code == 202
        wait_for(lambda: client.get(f"/runs/{slow}").json()["status"] == "cancelled", timeout=30)
        assert client.post(f"/runs/{slow}/resume").status_code == 202
        wait_for(lambda: client.get(f"/runs/{slow}").json()["status"] == "completed", timeout=60)
    assert workers.stop() == [0], workers.logs()
    assert duplicates(engine) == []


@pytest.mark.parametrize("auto_resume", [False, True], ids=["fail", "requeue"])
def test_run_of_a_silent_worker_on_another_host_is_taken_after_the_lease(
    db_url, engine, auto_resume
):
    """Heartbeat older than the lease on another host: failed 'worker lost', or re-queued."""
    from pipeline.config import Settings
    from pipeline.service import Service

    labels = [(num, label) for num, label, _ in PHASES]
    stale = insert_running(
        engine, owner="elsewhere:4242:1:runner-1", labels=labels, heartbeat_age=120
    )
    fresh = insert_running(
        engine, owner="elsewhere:4243:1:runner-1", labels=labels, heartbeat_age=1
    )
    settings = Settings(database_url=db_url, lease_seconds=60, auto_resume=auto_resume)
    service = Service(settings, registry=PHASES, execute=False)
    try:
        assert service.sweep() == [stale]
        runners = service.executor._runners
    finally:
        service.stop()
    with db.read(engine) as conn:
        lost = runs.get_run(conn, run_id=stale)
        alive = runs.get_run(conn, run_id=fresh)
    assert lost is not None
    assert alive is not None
    assert alive.status is RunStatus.RUNNING
    assert runners == 0  # a process that only queues never executes the re-queued run
    if auto_resume:
        assert lost.status is RunStatus.QUEUED
        assert [p.status for p in lost.phases] == ["completed", "pending", "pending"]
        assert lost.warnings[-1].message.startswith("worker lost during phase 2 (Analyze)")
    else:
        assert lost.status is RunStatus.FAILED
        assert lost.error_message == "worker lost during phase 2 (Analyze)"
        assert [p.status for p in lost.phases] == ["completed", "failed", "pending"]


def test_a_slow_worker_never_loses_its_run(db_url, engine, monkeypatch):
    """A phase far longer than the lease keeps its run: the heartbeat thread never waits on it."""
    from pipeline import liveness
    from pipeline.config import Settings
    from pipeline.orchestrator import Executor
    from pipeline.service import Service

    in_phase = threading.Event()
    release = threading.Event()

    def slow(conn, ctx):
        in_phase.set()
        assert release.wait(30)

    executor = Executor(db_url, [(1, "Slow", slow)], heartbeat_seconds=0.05)
    run_id, thread = executor.start_reserved({})
    try:
        assert in_phase.wait(10)
        # Sweep as if from another machine, with a lease far shorter than the phase.
        monkeypatch.setattr(liveness, "HOST", "another-machine")
        sweeper = Service(
            Settings(database_url=db_url, lease_seconds=0.5), registry=PHASES, execute=False
        )
        try:
            deadline = time.monotonic() + 2.0  # four leases long
            while time.monotonic() < deadline:
                assert sweeper.sweep() == []
                time.sleep(0.1)
        finally:
            sweeper.stop()
        with db.read(engine) as conn:
            assert runs.get_status(conn, run_id=run_id) is RunStatus.RUNNING
    finally:
        release.set()
        thread.join(30)
    with db.read(engine) as conn:
        assert runs.get_status(conn, run_id=run_id) is RunStatus.COMPLETED
