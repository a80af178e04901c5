"""Exactly once per tick, with several real processes firing the same schedule.

Each process is a real server (uvicorn) or worker whose schedules fire by a
clock the test walks (``tests/clocked.py``: the instant written in a file, so
all of them see the same "now" at once). Every process polls every 20 ms, so
all of them race for every tick. And once in real time, unaided: two
``pipeline serve`` processes and a ``* * * * *`` schedule across a real minute
boundary.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from bench.common import free_port, spawn_until_healthy, tail_of_log
from sqlalchemy.engine import Engine

from pipeline import db

from .clocked import set_clock
from .conftest import POSTGRES_URL, is_sqlite_url, wait_for
from .server import ServerProcess
from .test_schedules import fired_ticks as ticks_of
from .test_schedules import runs_of as scheduled_runs

ROOT = Path(__file__).resolve().parents[1]
START = dt.datetime(2030, 1, 1, 0, 0, 30, tzinfo=dt.UTC)
TICKS = 60


def environment(db_url: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PIPELINE_DATABASE_URL": db_url,
        "PIPELINE_PHASES": "tests.registries:OK",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        **extra,
    }


class Firers:
    """Servers and workers on one database, reading one clock file."""

    def __init__(self, db_url: str, tmp_path: Path) -> None:
        self.db_url = db_url
        self.tmp_path = tmp_path
        self.clock = tmp_path / "clock"
        set_clock(self.clock, START)
        self.env = environment(db_url, PIPELINE_POLL_SECONDS="0.02")
        self.processes: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.urls: list[str] = []

    def server(self) -> str:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = self.tmp_path / f"server-{port}.log"
        argv = [sys.executable, "-m", "tests.clocked", "serve", str(port), str(self.clock)]
        process = spawn_until_healthy(argv, env=self.env, log_path=log, url=url, timeout=30)
        self.processes.append((process, log))
        self.urls.append(url)
        return url

    def worker(self) -> None:
        log = self.tmp_path / f"worker-{len(self.processes)}.log"
        with log.open("ab") as out:
            argv = [sys.executable, "-m", "tests.clocked", "worker", str(self.clock)]
            process = subprocess.Popen(argv, env=self.env, cwd=ROOT, stdout=out, stderr=out)
        self.processes.append((process, log))
        wait_for(lambda: "worker ready" in log.read_text(), timeout=30)

    def stop(self) -> list[str]:
        """Stop every process (SIGTERM, runs finish); return their logs."""
        for process, _ in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        logs = []
        for process, log in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
            logs.append(log.read_text(errors="replace"))
        return logs


@pytest.fixture
def firers(db_url: str, tmp_path: Path) -> Iterator[Firers]:
    group = Firers(db_url, tmp_path)
    try:
        yield group
    finally:
        group.stop()


def has_ticks(engine: Engine, schedule_id: int, count: int) -> bool:
    return len(ticks_of(engine, schedule_id)) >= count


def test_every_tick_fires_exactly_once_across_processes(db_url, firers):
    """PostgreSQL: two servers and a worker; SQLite: a server and a worker."""
    first = firers.server()
    if is_sqlite_url(db_url):
        firers.worker()
    else:
        firers.server()
        firers.worker()
    body = {"name": "every-minute", "cron": "* * * * *", "overlap": "allow"}
    created = httpx2.post(f"{first}/schedules", json=body, timeout=10)
    assert created.status_code == 201, created.text
    schedule_id = created.json()["id"]
    engine = db.create_engine(db_url)
    try:
        expected = []
        for n in range(1, TICKS + 1):
            tick = START.replace(second=0) + dt.timedelta(minutes=n)
            expected.append(tick)
            # One second past the tick: every process sees it due at the same moment.
            set_clock(firers.clock, tick + dt.timedelta(seconds=1))
            wait_for(functools.partial(has_ticks, engine, schedule_id, n), timeout=15)
        ticks = ticks_of(engine, schedule_id)
        assert [t for t, _, _ in ticks] == expected  # none missed, none twice
        assert {o for _, o, _ in ticks} == {"fired"}
        run_ids = [r for _, _, r in ticks if r is not None]
        assert len(set(run_ids)) == TICKS
        # Exactly one run per tick, and no run without its tick.
        assert sorted(run_ids) == [r for r, _ in scheduled_runs(engine, schedule_id)]
        # They are ordinary runs: the servers and the worker execute them.
        wait_for(
            lambda: all(s == "completed" for _, s in scheduled_runs(engine, schedule_id)),
            timeout=60,
        )
        fired_by_servers = [
            float(line.split()[-1])
            for url in firers.urls
            for line in httpx2.get(f"{url}/metrics", timeout=10).text.splitlines()
            if line.startswith("pipeline_schedule_ticks_fired_total")
        ]
        # Everyone raced: the ticks were fired by more than one process (each
        # polls every 20 ms, so one winning all 60 would mean the others never tried).
        fired_by = [*fired_by_servers, TICKS - sum(fired_by_servers)]
        assert sum(count > 0 for count in fired_by) >= 2, fired_by
    finally:
        engine.dispose()
    for log in firers.stop():
        assert "Traceback" not in log, log[-3000:]


def test_two_real_servers_fire_a_minutely_schedule_once_at_the_minute(db_url, tmp_path):
    """No injected clock: the database's clock and a real minute boundary."""
    if POSTGRES_URL and is_sqlite_url(db_url):
        pytest.skip("runs once, on PostgreSQL when it is configured (it waits for a minute)")
    env = {"PIPELINE_PHASES": "tests.registries:OK"}
    with (
        ServerProcess(db_url, tmp_path / "a.log", **env) as a,
        ServerProcess(db_url, tmp_path / "b.log", **env) as b,
    ):
        with a.client() as client:
            body = {"name": "minutely", "cron": "* * * * *", "overlap": "allow"}
            made = client.post("/schedules", json=body)
            assert made.status_code == 201, made.text
        schedule = made.json()
        next_fire = dt.datetime.fromisoformat(schedule["next_fire_at"].replace("Z", "+00:00"))
        engine = db.create_engine(db_url)
        try:
            # Fired within a couple of seconds of the minute (both servers poll every second).
            wait_for(lambda: ticks_of(engine, schedule["id"]), timeout=75, interval=0.2)
            fired_at = dt.datetime.now(dt.UTC)
            assert fired_at - next_fire < dt.timedelta(seconds=5), (fired_at, next_fire)
            # Both servers have looked several times since: still exactly one run.
            watch_until = time.monotonic() + 3
            while time.monotonic() < watch_until:
                assert len(scheduled_runs(engine, schedule["id"])) <= 1
                time.sleep(0.1)
            ticks = ticks_of(engine, schedule["id"])
            assert [t for t, _, _ in ticks] == [next_fire]
            assert [r for r, _ in scheduled_runs(engine, schedule["id"])] == [ticks[0][2]]
        finally:
            engine.dispose()
        for server in (a, b):
            assert "Traceback" not in server.log(), tail_of_log(server.log_path)
