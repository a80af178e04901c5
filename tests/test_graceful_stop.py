"""Graceful stop: SIGTERM and SIGINT sent to a real `pipeline serve` while a run executes.

The HELD registry's first phase tells the test it started (file `held-{id}`),
then waits for the file `release`, so the test decides when the run may end.
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import httpx2
import pytest
from sqlalchemy.engine import Engine

from pipeline.runs import RunStatus

from .conftest import read_run, wait_for
from .server import ServerProcess

HELD_LABEL = "Held until released"


def _env(signals: Path, **extra: str) -> dict[str, str]:
    return {
        "PIPELINE_PHASES": "tests.registries:HELD",
        "PIPELINE_TEST_DIR": str(signals),
        **extra,
    }


@pytest.fixture
def signals(tmp_path: Path) -> Path:
    path = tmp_path / "signals"
    path.mkdir()
    return path


def _refused(server: ServerProcess) -> bool:
    """True once a new connection is refused; any answer (or a slow one) means not yet."""
    try:
        httpx2.get(f"{server.url}/healthz", timeout=0.5)
    except httpx2.ConnectError:
        return True
    except httpx2.TransportError:
        return False
    return False


def _start_held_runs(server: ServerProcess, signals: Path, count: int = 1) -> list[int]:
    """Queue `count` runs and wait until the first one is inside its held phase."""
    with server.client() as client:
        ids = []
        for _ in range(count):
            response = client.post("/runs", json={"params": {}})
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
    wait_for(lambda: (signals / f"held-{ids[0]}").exists(), timeout=30)
    return ids


SIGNALS = [
    pytest.param(signal.SIGTERM, id="SIGTERM"),
    pytest.param(signal.SIGINT, id="SIGINT"),
]


@pytest.mark.parametrize("sig", SIGNALS)
def test_first_signal_refuses_connections_lets_the_run_finish_and_exits_0(
    sig: signal.Signals, db_url: str, engine: Engine, tmp_path: Path, signals: Path
) -> None:
    """One SIGTERM or SIGINT: connections refused while the run goes on; it completes; exit 0."""
    with ServerProcess(db_url, tmp_path / "server.log", **_env(signals)) as server:
        (run_id,) = _start_held_runs(server, signals)
        server.signal(sig)
        wait_for(lambda: _refused(server), timeout=10)
        assert server.process is not None
        assert server.process.poll() is None, "the server left before its run finished"
        assert read_run(engine, run_id).status is RunStatus.RUNNING
        (signals / "release").touch()
        assert server.wait(30) == 0, server.log()
    run = read_run(engine, run_id)
    assert run.status is RunStatus.COMPLETED, run
    assert run.progress_current == run.progress_total == 2


def test_graceful_stop_leaves_queued_runs_for_the_next_server(
    db_url: str, engine: Engine, tmp_path: Path, signals: Path
) -> None:
    """A stopping server starts no queued run; it stays queued and the next server completes it."""
    env = _env(signals, PIPELINE_MAX_CONCURRENT_RUNS="1")
    log = tmp_path / "server.log"
    with ServerProcess(db_url, log, **env) as server:
        first, second = _start_held_runs(server, signals, count=2)
        server.signal(signal.SIGTERM)
        wait_for(lambda: "waiting for 1 running run(s) to finish" in server.log(), timeout=10)
        (signals / "release").touch()
        assert server.wait(30) == 0, server.log()
    assert read_run(engine, first).status is RunStatus.COMPLETED
    waiting = read_run(engine, second)
    assert (waiting.status, waiting.started_at) == (RunStatus.QUEUED, None)
    with ServerProcess(db_url, log, **env):
        wait_for(lambda: read_run(engine, second).status is RunStatus.COMPLETED, timeout=30)


def test_no_queued_run_starts_after_the_signal_while_a_request_is_in_flight(
    db_url: str, engine: Engine, tmp_path: Path, signals: Path
) -> None:
    """No queued run starts after the first signal, even while a request is still in flight."""
    env = _env(signals, PIPELINE_MAX_CONCURRENT_RUNS="1")
    with ServerProcess(db_url, tmp_path / "server.log", **env) as server:
        first, second = _start_held_runs(server, signals, count=2)
        # A request accepted before the signal whose body never finishes arriving:
        # uvicorn waits for it before it runs the application's shutdown.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
            slow.sendall(
                b"POST /runs HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{"
            )
            assert httpx2.get(f"{server.url}/healthz", timeout=10).status_code == 200
            server.signal(signal.SIGTERM)
            wait_for(lambda: _refused(server), timeout=10)
            (signals / "release").touch()
            wait_for(lambda: read_run(engine, first).status is RunStatus.COMPLETED, timeout=30)
        assert server.wait(30) == 0, server.log()
    waiting = read_run(engine, second)
    assert (waiting.status, waiting.started_at) == (RunStatus.QUEUED, None), server.log()


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(signal.SIGTERM, signal.SIGTERM, id="SIGTERM-SIGTERM"),
        pytest.param(signal.SIGINT, signal.SIGINT, id="SIGINT-SIGINT"),
        pytest.param(signal.SIGTERM, signal.SIGINT, id="SIGTERM-SIGINT"),
    ],
)
def test_second_signal_exits_at_once_and_the_run_is_swept_then_resumable(
    first: signal.Signals,
    second: signal.Signals,
    db_url: str,
    engine: Engine,
    tmp_path: Path,
    signals: Path,
) -> None:
    """A second signal exits at once (128+signal); the next server fails the run; it resumes."""
    log = tmp_path / "server.log"
    with ServerProcess(db_url, log, **_env(signals)) as server:
        (run_id,) = _start_held_runs(server, signals)
        server.signal(first)
        wait_for(lambda: _refused(server), timeout=10)
        sent = time.monotonic()
        server.signal(second)
        code = server.wait(10)
        took = time.monotonic() - sent
    assert code == 128 + second, log.read_text()
    assert took < 5, f"the second signal took {took:.1f}s to end the process"
    left = read_run(engine, run_id)
    assert (left.status, left.current_phase, left.phase_label) == (
        RunStatus.RUNNING,
        1,
        HELD_LABEL,
    )

    (signals / "release").touch()
    with ServerProcess(db_url, log, **_env(signals)) as server, server.client() as client:
        swept = client.get(f"/runs/{run_id}").json()
        assert swept["status"] == "failed", swept
        assert swept["error_message"] == f"interrupted during phase 1 ({HELD_LABEL})"
        response = client.post(f"/runs/{run_id}/resume")
        assert response.status_code == 202, response.text
        wait_for(lambda: read_run(engine, run_id).status is RunStatus.COMPLETED, timeout=30)
    run = read_run(engine, run_id)
    assert (run.progress_current, run.error_message) == (2, None)
