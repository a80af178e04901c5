"""The HTTP server bounds what one client can hold, and never floods its log."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import httpx2
import pytest
from bench.common import free_port, spawn_until_healthy

from pipeline.serving import RepeatFilter

ROOT = Path(__file__).resolve().parents[1]


def test_idle_and_half_sent_connections_cannot_starve_the_server(sqlite_url, tmp_path):
    """300 idle or half-sent connections, 256 descriptors: healthz answers, the log stays small."""
    if shutil.which("prlimit") is None:
        pytest.skip("needs prlimit (util-linux) to lower the descriptor limit")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    env = {
        **os.environ,
        "PIPELINE_DATABASE_URL": sqlite_url,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "PIPELINE_HTTP_HEADER_TIMEOUT_SECONDS": "1",
        "PIPELINE_HTTP_MAX_CONNECTIONS": "200",
    }
    argv = ["prlimit", "--nofile=256:256", sys.executable, "-m", "pipeline.cli", "serve"]
    server = spawn_until_healthy(
        [*argv, "--port", str(port)], env=env, log_path=log_path, url=url, timeout=30
    )
    held: list[socket.socket] = []
    try:
        for index in range(300):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            except OSError:
                break  # the backlog is full: the server is refusing, which is fine
            if index % 2:  # a request head that never ends (slowloris)
                sock.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            held.append(sock)
        assert len(held) > 256  # more than the server has descriptors for
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx2.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            assert time.monotonic() < deadline, "healthz never answered while connections were held"
            time.sleep(0.1)
        # The held connections were closed by the server (their heads never came).
        closed = 0
        for sock in held:
            sock.settimeout(5)
            try:
                closed += sock.recv(1) == b""
            except OSError:
                closed += 1
        assert closed == len(held)
    finally:
        for sock in held:
            sock.close()
        server.kill()
        server.wait(30)
    lines = log_path.read_text(errors="replace").splitlines()
    assert len(lines) < 200, f"{len(lines)} log lines, e.g. {lines[-5:]}"


def test_a_repeated_message_is_logged_once_per_interval_with_a_count():
    """The same error a thousand times: written once, then once more with the count."""
    repeat = RepeatFilter(interval=0.2)
    record = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "accept failed", (), None)
    passed = [repeat.filter(record) for _ in range(1000)]
    assert passed.count(True) == 1
    time.sleep(0.25)  # one interval later
    again = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "accept failed", (), None)
    assert repeat.filter(again)
    assert again.getMessage() == "accept failed (and 999 more like it in 0.2s)"
    other = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "something else", (), None)
    assert repeat.filter(other)
