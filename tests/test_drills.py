"""Fault drills: real processes, real faults, then the invariant checker.

* PostgreSQL restarted under two `pipeline worker` processes and a `pipeline
  serve` while runs are in flight: every run ends truthfully (completed, or
  failed with a reason), nothing committed is lost or executed twice, and the
  API answers 503 with Retry-After (never 500) while the database is away.
* A worker SIGKILLed and left unreaped (a zombie, as under a container's PID 1
  that reaps nothing) counts as dead: its runs are recovered by the next sweep.

Each drill ends with `python -m pipeline.check --expect-idle` on the database.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline import Pipeline, db
from pipeline.config import Settings
from pipeline.service import Service

from .conftest import scalar, wait_for
from .ledger import FOUR, create_ledger
from .server import ServerProcess
from .test_workers import Workers, duplicates, enqueue

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_CONFIG = Path("/etc/postgresql")

# Short intervals keep the drills fast; the lease only matters for owners on
# other hosts (all of these are on this one), so it is left long enough that no
# slow moment could ever look like a lost worker.
DRILL_ENV = {
    "PIPELINE_PHASES": "tests.ledger:FOUR",
    "PIPELINE_SWEEP_SECONDS": "0.5",
    "PIPELINE_POLL_SECONDS": "0.05",
    "PIPELINE_HEARTBEAT_SECONDS": "0.2",
    "PIPELINE_LEASE_SECONDS": "10",
    "PIPELINE_MAX_CONCURRENT_RUNS": "2",
}


# -- helpers --------------------------------------------------------------------------


def assert_invariants(db_url: str) -> None:
    """`python -m pipeline.check --expect-idle` finds nothing (its output shown otherwise)."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.check", "--expect-idle"],
        env={
            **os.environ,
            "PIPELINE_DATABASE_URL": db_url,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, (
        f"invariant check exited {result.returncode}:\n{result.stdout}{result.stderr}"
    )


def rows(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with db.read(engine) as conn:
        return list(conn.execute(sa.text(sql), params).all())


def status_counts(engine: Engine) -> Counter[str] | None:
    """Runs by status, or None while the database cannot be reached (its pool is renewed)."""
    try:
        return Counter(
            dict(rows(engine, "SELECT status, count(*) FROM analysis_runs GROUP BY status"))
        )
    except db.DatabaseUnavailable:
        engine.dispose()
        return None


def settled(engine: Engine) -> bool:
    counts = status_counts(engine)
    return counts is not None and counts["queued"] == counts["running"] == 0


def ledger_matches_phases(engine: Engine) -> list[Any]:
    """(run, phase) pairs where the ledger and the phase records disagree.

    A ledger row commits with its phase, so it exists exactly when the phase
    row says completed: a committed phase recorded as failed shows up here.
    """
    return rows(
        engine,
        "SELECT p.run_id, p.phase_num, p.status, count(l.phase) FROM run_phases p "
        "LEFT JOIN ledger l ON l.run_id = p.run_id AND l.phase = p.phase_num "
        "GROUP BY p.run_id, p.phase_num, p.status "
        "HAVING (p.status = 'completed') <> (count(l.phase) = 1) "
        "ORDER BY p.run_id, p.phase_num",
    )


class ApiProbe:
    """Polls `GET /runs` throughout a drill; records every status code (and Retry-After)."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.answers: Counter[int] = Counter()
        self.without_retry_after = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="api-probe", daemon=True)

    def __enter__(self) -> ApiProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _loop(self) -> None:
        with self.server.client() as client:
            while not self._stop.wait(0.05):
                try:
                    response = client.get("/runs", params={"limit": 5})
                except Exception as exc:  # the server is alive throughout: none expected
                    self.errors.append(repr(exc))
                    continue
                self.answers[response.status_code] += 1
                if response.status_code == 503 and "retry-after" not in response.headers:
                    self.without_retry_after += 1


@dataclass(frozen=True)
class Cluster:
    """The local PostgreSQL cluster the test database lives on (Debian's tools drive it)."""

    version: str
    ctl: str
    isready: str

    def restart(self) -> None:
        done = subprocess.run(
            [self.ctl, "--skip-systemctl-redirect", self.version, "main", "restart", "-m", "fast"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr

    def ready(self) -> bool:
        answer = subprocess.run([self.isready, "-h", "127.0.0.1", "-t", "1"], capture_output=True)
        return answer.returncode == 0


def local_cluster(db_url: str) -> Cluster:
    """The cluster behind ``db_url`` (the one entry of /etc/postgresql), or skip the test."""
    url = sa.make_url(db_url)
    if url.get_backend_name() != "postgresql" or url.host != "127.0.0.1":
        pytest.skip("needs PostgreSQL on 127.0.0.1")
    ctl, isready = shutil.which("pg_ctlcluster"), shutil.which("pg_isready")
    if ctl is None or isready is None:
        pytest.skip("needs pg_ctlcluster and pg_isready")
    versions = sorted(p.name for p in POSTGRES_CONFIG.iterdir()) if POSTGRES_CONFIG.is_dir() else []
    if len(versions) != 1:
        pytest.skip(f"needs exactly one cluster version in {POSTGRES_CONFIG}, found {versions}")
    return Cluster(versions[0], ctl, isready)


def proc_state(pid: int) -> str | None:
    """The kernel's one-letter state of a process (R, S, Z...), None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


# -- PostgreSQL restarted mid-run ------------------------------------------------------

RUNS = 20
SLEEP = 0.05  # per phase: 20 runs x 4 phases over 6 runner slots, about a second and a half


@pytest.mark.parametrize("auto_resume", [False, True], ids=["resume-over-api", "auto-resume"])
def test_postgres_restart_mid_run_loses_nothing(db_url, engine, tmp_path, auto_resume):
    """PostgreSQL restarted under 2 workers and a server mid-run: every run ends truthfully and
    completes exactly once (after a resume over the API, or by itself with auto-resume)."""
    cluster = local_cluster(db_url)
    create_ledger(engine)
    env = {**DRILL_ENV, "PIPELINE_AUTO_RESUME": "true" if auto_resume else "false"}
    pool = Workers(db_url, tmp_path, **env)
    server = ServerProcess(db_url, tmp_path / "server.out", PIPELINE_EXECUTOR="thread", **env)
    try:
        pool.start(2, concurrency=2)
        server.start()
        wait_for(lambda: pool.logs().count(" ready: ") == 2, timeout=60)
        with ApiProbe(server) as probe:
            started = time.monotonic()
            ids = enqueue(engine, RUNS, {"sleep": SLEEP}, pipeline="four")

            def in_flight() -> tuple[int, int] | None:
                ledger = scalar(engine, "SELECT count(*) FROM ledger")
                running = scalar(
                    engine, "SELECT count(*) FROM analysis_runs WHERE status = 'running'"
                )
                return (ledger, running) if ledger >= RUNS and running >= 2 else None

            ledger_before, running_before = wait_for(in_flight, timeout=30, interval=0.005)
            restart_started = time.monotonic()
            cluster.restart()
            wait_for(cluster.ready, timeout=30, interval=0.1)
            restart_seconds = time.monotonic() - restart_started
            engine.dispose()  # its pooled connections died with the old server

            wait_for(lambda: settled(engine), timeout=60, interval=0.05)
            first_settled = time.monotonic() - started
            ended = rows(engine, "SELECT id, status, error_message FROM analysis_runs ORDER BY id")
            assert [r.id for r in ended] == ids
            assert {r.status for r in ended} <= {"completed", "failed"}, ended
            failed = [r for r in ended if r.status == "failed"]
            assert all(r.error_message for r in failed), failed
            # Before any resume: a phase is recorded completed exactly when it committed.
            assert ledger_matches_phases(engine) == []
            assert duplicates(engine) == []

            if auto_resume:
                assert failed == [], f"auto-resume left failed runs: {failed}\n{pool.logs()}"
            else:
                with server.client() as client:

                    def resume(run_id: int) -> httpx2.Response | None:
                        response = client.post(f"/runs/{run_id}/resume")
                        return None if response.status_code == 503 else response  # retry later

                    for run in failed:
                        answer = wait_for(functools.partial(resume, run.id), timeout=30)
                        assert answer.status_code == 202, answer.text
                wait_for(lambda: settled(engine), timeout=60, interval=0.05)
            elapsed = time.monotonic() - started
        counts = status_counts(engine)
        assert counts == Counter(completed=RUNS), counts
        assert duplicates(engine) == []
        assert scalar(engine, "SELECT count(*) FROM ledger") == RUNS * len(FOUR)
        assert ledger_matches_phases(engine) == []
        retried = scalar(
            engine, "SELECT count(*) FROM run_warnings WHERE message LIKE :m", m="attempt % failed%"
        )
        requeued = scalar(
            engine, "SELECT count(*) FROM run_warnings WHERE message LIKE :m", m="%queued again%"
        )
        # The API never failed while the database was away: 200, or 503 with Retry-After.
        assert set(probe.answers) <= {200, 503}, probe.answers
        assert probe.without_retry_after == 0
        assert probe.errors == []

        server.signal(signal.SIGTERM)
        assert server.wait(60) == 0, server.log()
        assert pool.stop() == [0, 0], pool.logs()
    finally:
        pool.kill_all()
        server.__exit__(None, None, None)
    print(
        f"\nrestart at {ledger_before} ledger rows, {running_before} running; "
        f"pg down/up {restart_seconds:.2f}s; all ended {first_settled:.2f}s after enqueue; "
        f"{len(failed)} failed {[r.error_message for r in failed]}; "
        f"{retried} phase retries, {requeued} re-queued; all complete after {elapsed:.2f}s; "
        f"API answers {dict(probe.answers)}"
    )
    assert_invariants(db_url)


# -- a zombie worker ---------------------------------------------------------------------

ZOMBIE_RUNS = 12
SWEEP_SECONDS = 0.2
RECOVERY_BOUND = 3.0  # seconds from the zombie to its runs taken back: many sweep intervals


def test_zombie_worker_counts_as_dead(db_url, engine, tmp_path):
    """A SIGKILLed, unreaped (zombie) worker's runs are re-queued by the next sweep and
    every run completes with each phase executed exactly once."""
    create_ledger(engine)
    enqueue(engine, ZOMBIE_RUNS, {"sleep": 0.1}, pipeline="four")
    pool = Workers(db_url, tmp_path, PIPELINE_PHASES="tests.ledger:FOUR")
    pool.start(1, concurrency=4)
    victim = pool.processes[0]
    service: Service | None = None

    def victims_running() -> int:
        return int(
            scalar(
                engine,
                "SELECT count(*) FROM analysis_runs WHERE status = 'running' AND owner LIKE :o",
                o=f"%:{victim.pid}:%",
            )
        )

    try:
        wait_for(
            lambda: victims_running() >= 3 and scalar(engine, "SELECT count(*) FROM ledger") >= 1,
            timeout=60,
            interval=0.01,
        )
        settings = Settings(
            database_url=db_url, sweep_seconds=SWEEP_SECONDS, poll_seconds=0.05, auto_resume=True
        )
        service = Service(settings, registry=Pipeline("four", FOUR), execute=True)
        service.start()  # its first sweep spares the live worker's runs
        assert victims_running() >= 1
        os.kill(victim.pid, signal.SIGKILL)  # and never wait(): it stays a zombie
        wait_for(lambda: proc_state(victim.pid) == "Z", timeout=10, interval=0.005)
        killed = time.monotonic()
        wait_for(lambda: victims_running() == 0, timeout=30, interval=0.01)
        recovery = time.monotonic() - killed
        wait_for(
            lambda: (
                scalar(engine, "SELECT count(*) FROM analysis_runs WHERE status = 'completed'")
                == ZOMBIE_RUNS
            ),
            timeout=60,
            interval=0.05,
        )
        assert proc_state(victim.pid) == "Z"  # recovered while it was still a zombie
        assert recovery < RECOVERY_BOUND, f"recovery took {recovery:.2f}s"
        assert duplicates(engine) == []
        assert scalar(engine, "SELECT count(*) FROM ledger") == ZOMBIE_RUNS * len(FOUR)
        requeued = scalar(
            engine,
            "SELECT count(DISTINCT run_id) FROM run_warnings WHERE message LIKE :m",
            m="interrupted during phase %; queued again to continue",
        )
        assert requeued >= 1
        service.stop()
        service = None
        print(f"\nzombie's {requeued} run(s) re-queued {recovery:.2f}s after the kill")
        assert_invariants(db_url)
    finally:
        if service is not None:
            service.stop()
        if victim.poll() is None:  # reaps the zombie; kills it first if it was never killed
            victim.kill()
            victim.wait(30)
