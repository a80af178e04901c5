"""Workers in other pid namespaces and with skewed clocks: judged by heartbeat, on one clock.

A worker in its own pid namespace is, to a process outside it, on another host
even when the hostname is the same (containers sharing one): its pid means
nothing here, so only its heartbeat may tell that it is gone, and that
heartbeat is written and judged on the database's clock (DESIGN.md, "One
run's life", step 7). The workers here are real ``pipeline worker`` processes
started under ``unshare --pid --fork --mount-proc`` (and libfaketime), while
a sweeper in this, the root, namespace sweeps with a lease of a few seconds.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pipeline import db, runs
from pipeline.config import Settings
from pipeline.orchestrator import RunContext
from pipeline.runs import RunStatus
from pipeline.schema import analysis_runs as runs_t
from pipeline.service import Service

from .conftest import is_sqlite_url, scalar, wait_for
from .ledger import create_ledger

ROOT = Path(__file__).resolve().parents[1]
LEASE = 2.0  # seconds; ten heartbeats (PIPELINE_HEARTBEAT_SECONDS=0.2)
HEARTBEAT = 0.2
SKEW_SECONDS = 600
UNSHARE = shutil.which("unshare")
# libfaketime itself, preloaded: the ``faketime`` wrapper names a semaphore in
# /dev/shm after its own pid, which in a new pid namespace is always 1, so one
# wrapper killed there (its leftover never removed) breaks every later one.
LIBFAKETIME = next(
    (
        found
        for pattern in (
            "/usr/lib/*/faketime/libfaketime.so.1",
            "/usr/lib*/faketime/libfaketime.so.1",
            "/usr/local/lib/faketime/libfaketime.so.1",
        )
        for found in sorted(glob.glob(pattern))
    ),
    None,
)


# -- the pipeline the workers execute ------------------------------------------------


def _record_slowly(conn: Connection, ctx: RunContext) -> None:
    """tests.ledger's phase, but waiting with an Event rather than ``time.sleep``.

    Under libfaketime 0.9.10 with FAKETIME_DONT_FAKE_MONOTONIC=1, Python's
    ``time.sleep`` fails with EINVAL (its clock_nanosleep on the monotonic
    clock is mangled) while Event waits are fine.
    """
    threading.Event().wait(float(ctx.params.get("sleep", 0)))
    ctx.progress(1, 1)
    conn.execute(
        sa.text("INSERT INTO ledger (run_id, phase, pid) VALUES (:r, :p, :pid)"),
        {"r": ctx.run_id, "p": ctx.phase_num, "pid": os.getpid()},
    )


PHASES = [
    (1, "Fetch", _record_slowly),
    (2, "Analyze", _record_slowly),
    (3, "Report", _record_slowly),
]


# -- processes ------------------------------------------------------------------------


def _python_path() -> str:
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


def _namespaced() -> list[str]:
    """The command prefix that starts a program in a new pid namespace."""
    assert UNSHARE is not None
    return [UNSHARE, "--pid", "--fork", "--mount-proc"]


def _skewed(skew: str) -> dict[str, str]:
    """The environment that sets a program's clock off by ``skew`` (libfaketime's "-10m")."""
    assert LIBFAKETIME is not None
    preload = os.pathsep.join(p for p in (LIBFAKETIME, os.environ.get("LD_PRELOAD")) if p)
    return {"LD_PRELOAD": preload, "FAKETIME": skew, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


class Worker:
    """One ``pipeline worker`` subprocess in its own session (so its whole tree can be killed)."""

    def __init__(
        self,
        db_url: str,
        log_path: Path,
        *,
        prefix: Sequence[str] = (),
        concurrency: int = 2,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.log_path = log_path
        environment = {
            **os.environ,
            "PIPELINE_DATABASE_URL": db_url,
            "PIPELINE_PHASES": "tests.test_hosts:PHASES",
            "PYTHONPATH": _python_path(),
            "PIPELINE_POLL_SECONDS": "0.05",
            "PIPELINE_HEARTBEAT_SECONDS": str(HEARTBEAT),
            "PIPELINE_SWEEP_SECONDS": "0.5",
            "PIPELINE_LEASE_SECONDS": str(LEASE),
            "PIPELINE_AUTO_RESUME": "false",
            **(env or {}),
        }
        command = [
            *prefix,
            sys.executable,
            "-m",
            "pipeline.cli",
            "worker",
            "--concurrency",
            str(concurrency),
        ]
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> str:
        """Wait for the worker's "ready" line; its identity ``host:pid:start``."""

        def identity() -> str | None:
            assert self.process.poll() is None, f"worker exited early:\n{self.log()}"
            found = re.search(r"worker (\S+) ready: ", self.log())
            return found.group(1) if found else None

        return wait_for(identity, timeout=60, interval=0.05)

    def terminate(self) -> None:
        """SIGTERM to the whole tree: the worker claims nothing more and finishes its runs."""
        self._signal(signal.SIGTERM)

    def stop(self) -> int:
        """Terminate, and wait for the exit code."""
        self.terminate()
        return self.process.wait(60)

    def kill(self) -> None:
        """SIGKILL the whole tree: unshare, the namespace's init and the worker."""
        self._signal(signal.SIGKILL)
        self.process.wait(30)

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # the whole group is gone already
            os.killpg(self.process.pid, sig)


@contextmanager
def running(*workers: Worker) -> Iterator[None]:
    """Kill every worker's tree on the way out, whatever happened."""
    try:
        yield
    finally:
        for worker in workers:
            worker.kill()


@contextmanager
def sweeper(db_url: str, *, auto_resume: bool = False) -> Iterator[Service]:
    """A service in this (the root) pid namespace that only sweeps, with a short lease."""
    settings = Settings(database_url=db_url, lease_seconds=LEASE, auto_resume=auto_resume)
    service = Service(settings, registry=PHASES, execute=False)
    try:
        yield service
    finally:
        service.stop()


# -- checks -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pid_namespaces() -> None:
    """Skip unless this system lets us start a process in a new pid namespace."""
    if UNSHARE is None:
        pytest.skip("unshare (util-linux) is not installed")
    try:
        ok = subprocess.run([*_namespaced(), "true"], capture_output=True, timeout=30).returncode
    except (OSError, subprocess.TimeoutExpired):
        ok = -1
    if ok != 0:
        pytest.skip("unshare --pid --fork --mount-proc does not work here (needs root)")


def assert_invariants(db_url: str) -> None:
    """The invariant checker, as a separate process, finds nothing (and no run still running)."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.check", "--expect-idle"],
        env={**os.environ, "PIPELINE_DATABASE_URL": db_url, "PYTHONPATH": _python_path()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr


def enqueue(engine: Engine, count: int, params: dict[str, Any]) -> list[int]:
    with db.write(engine) as conn:
        return [runs.create_run(conn, params=params).id for _ in range(count)]


def rows(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with db.read(engine) as conn:
        return list(conn.execute(sa.text(sql), params).all())


def duplicates(engine: Engine) -> list[Any]:
    return rows(
        engine,
        "SELECT run_id, phase, count(*) FROM ledger GROUP BY run_id, phase HAVING count(*) > 1",
    )


def pid_of(owner: str) -> int:
    """The pid in an owner ``host:pid:start:thread`` (the host may hold no ``:``)."""
    return int(owner.split(":")[1])


def sweep_until_done(
    service: Service, engine: Engine, ids: list[int], *, logs: Any, timeout: float = 90
) -> tuple[float, set[int]]:
    """Sweep every 0.1 s until all runs completed; no sweep may take any.

    Returns how long it swept and the pids seen owning running runs.
    """
    started = time.monotonic()
    owners: set[int] = set()
    while True:
        assert service.sweep() == [], f"the sweeper took a live run\n{logs()}"
        current = rows(engine, "SELECT status, owner FROM analysis_runs")
        owners |= {pid_of(r.owner) for r in current if r.status == "running"}
        done = [r for r in current if r.status == "completed"]
        unexpected = [r for r in current if r.status not in ("queued", "running", "completed")]
        assert unexpected == [], f"{unexpected}\n{logs()}"
        if len(done) == len(ids):
            return time.monotonic() - started, owners
        assert time.monotonic() - started < timeout, f"runs not done in {timeout}s\n{logs()}"
        time.sleep(0.1)


def share_the_work(
    db_url: str, engine: Engine, tmp_path: Path, *, skew: dict[str, str] | None = None
) -> None:
    """A worker in its own pid namespace (with ``skew``) and one here execute slow runs together.

    Both sweep every 0.5 s with a 2 s lease, and so does a sweeper here; none
    may take a run of the other, and every run completes once.
    """
    create_ledger(engine)
    other = Worker(db_url, tmp_path / "other.log", prefix=_namespaced(), env=skew)
    here = Worker(db_url, tmp_path / "here.log")

    def logs() -> str:
        return f"--- other:\n{other.log()}\n--- here:\n{here.log()}"

    with running(other, here):
        other_identity = other.wait_ready()
        here_identity = here.wait_ready()
        # The premise: the other worker is pid 1 (or 2) of its own namespace.
        other_pid, here_pid = pid_of(other_identity), pid_of(here_identity)
        assert other_pid in (1, 2)
        assert here_pid == here.process.pid

        ids = enqueue(engine, 8, {"sleep": 1.2})  # 3.6 s a run, 2 waves of 2 + 2
        with sweeper(db_url) as service:
            swept_for, owners = sweep_until_done(service, engine, ids, logs=logs)
        assert owners == {other_pid, here_pid}, logs()
        assert swept_for > 2 * LEASE
        other.terminate()
        here.terminate()
        assert [other.process.wait(60), here.process.wait(60)] == [0, 0], logs()

    assert duplicates(engine) == []
    assert scalar(engine, "SELECT count(*) FROM ledger") == len(ids) * len(PHASES)
    pids = {r.pid for r in rows(engine, "SELECT DISTINCT pid FROM ledger")}
    assert pids == {other_pid, here_pid}
    lost = rows(
        engine,
        "SELECT run_id, message FROM run_warnings WHERE message LIKE '%lost%' "
        "OR message LIKE '%interrupted%'",
    )
    assert lost == []
    assert "lost its runner" not in logs()
    # Every timestamp is the database's: none of them ten minutes away from another.
    stamps = sa.select(runs_t.c.created_at, runs_t.c.started_at, runs_t.c.completed_at)
    with db.read(engine) as conn:
        for created, started, completed in conn.execute(stamps).all():
            assert created <= started <= completed
            assert completed - created < dt.timedelta(seconds=60)
    # How: one hostname, two hosts (the host also names the boot and the pid namespace).
    other_host, here_host = other_identity.split(":")[0], here_identity.split(":")[0]
    assert other_host != here_host
    assert other_host.split("/")[0] == here_host.split("/")[0] == socket.gethostname()
    assert_invariants(db_url)


# -- the tests ------------------------------------------------------------------------


@pytest.mark.usefixtures("pid_namespaces")
def test_containers_sharing_a_hostname_keep_each_others_live_runs(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    """A worker in its own pid namespace and one here keep each other's slow runs; all complete."""
    share_the_work(db_url, engine, tmp_path)


@pytest.mark.usefixtures("pid_namespaces")
@pytest.mark.parametrize("auto_resume", [False, True], ids=["fail-lost", "auto-resume"])
def test_a_killed_namespaced_worker_loses_its_runs_after_the_lease(
    db_url: str, engine: Engine, tmp_path: Path, auto_resume: bool
) -> None:
    """SIGKILLed in its namespace, a worker's runs are taken by heartbeat, only after the lease."""
    create_ledger(engine)
    victim = Worker(db_url, tmp_path / "victim.log", prefix=_namespaced())
    with running(victim):
        victim.wait_ready()
        ids = enqueue(engine, 2, {"sleep": 1.0})

        def both_running() -> bool:
            query = "SELECT count(*) FROM analysis_runs WHERE status = 'running'"
            return bool(scalar(engine, query) == len(ids))

        wait_for(both_running, timeout=30)
        victim.kill()
        killed_at = time.monotonic()
    in_flight = {
        r.id: (r.current_phase, r.phase_label)
        for r in rows(
            engine,
            "SELECT id, current_phase, phase_label FROM analysis_runs WHERE status = 'running'",
        )
    }
    assert sorted(in_flight) == ids, victim.log()

    with sweeper(db_url, auto_resume=auto_resume) as service:
        # The heartbeat is fresh: the pid (1 in its namespace) tells nothing here.
        assert service.sweep() == [], victim.log()
        taken: list[int] = []

        def all_taken() -> bool:
            taken.extend(service.sweep())
            return sorted(taken) == ids

        wait_for(all_taken, timeout=30, interval=0.1)
        waited = time.monotonic() - killed_at
    assert waited >= LEASE - 2 * HEARTBEAT, f"taken {waited:.2f}s after the kill"

    with db.read(engine) as conn:
        taken_runs = [runs.get_run(conn, run_id=run_id) for run_id in ids]
    for run in taken_runs:
        assert run is not None
        phase, label = in_flight[run.id]
        message = f"worker lost during phase {phase} ({label})"
        if auto_resume:
            assert run.status is RunStatus.QUEUED
            assert run.warnings[-1].message == f"{message}; queued again to continue"
        else:
            assert run.status is RunStatus.FAILED
            assert run.error_message == message
            assert run.phases[phase - 1].status == "failed"

    if auto_resume:  # a worker here finishes them, each phase once
        heir = Worker(db_url, tmp_path / "heir.log")
        with running(heir):
            done = "SELECT count(*) FROM analysis_runs WHERE status = 'completed'"
            wait_for(lambda: scalar(engine, done) == len(ids), timeout=60, interval=0.1)
            assert heir.stop() == 0, heir.log()
        assert scalar(engine, "SELECT count(*) FROM ledger") == len(ids) * len(PHASES)
    assert duplicates(engine) == []
    assert_invariants(db_url)


@pytest.mark.usefixtures("pid_namespaces")
@pytest.mark.parametrize("skew", ["-10m", "+10m"], ids=["behind", "ahead"])
def test_a_worker_with_a_skewed_clock_keeps_its_runs_and_its_neighbours(
    db_url: str, engine: Engine, tmp_path: Path, skew: str
) -> None:
    """A worker ten minutes behind (its beats) or ahead (its sweeps) loses and takes no live run."""
    if is_sqlite_url(db_url):
        pytest.skip("one SQLite file means one machine and one clock")
    if LIBFAKETIME is None:
        pytest.skip("faketime (libfaketime) is not installed")
    # The premise: the worker's clock really is ten minutes off.
    probe = subprocess.run(
        [*_namespaced(), sys.executable, "-c", "import time; print(time.time())"],
        env={**os.environ, **_skewed(skew)},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    offset = float(probe.stdout) - time.time()
    expected = SKEW_SECONDS if skew.startswith("+") else -SKEW_SECONDS
    assert abs(offset - expected) < 30, f"faketime gave an offset of {offset:.0f}s"
    share_the_work(db_url, engine, tmp_path, skew=_skewed(skew))
