"""A real `pipeline serve` subprocess on 127.0.0.1, for tests that need real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType

import httpx2
from bench.common import free_port, spawn_until_healthy

ROOT = Path(__file__).resolve().parents[1]


class ServerProcess:
    """`pipeline serve` in a subprocess; the output goes to a log file for post-mortems."""

    def __init__(self, db_url: str, log_path: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {
            **os.environ,
            "PIPELINE_DATABASE_URL": db_url,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> ServerProcess:
        self.process = spawn_until_healthy(
            [sys.executable, "-m", "pipeline.cli", "serve", "--port", str(self.port)],
            env=self.env,
            log_path=self.log_path,
            url=self.url,
            timeout=timeout,
        )
        return self

    def client(self) -> httpx2.Client:
        return httpx2.Client(base_url=self.url, timeout=30)

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(30)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
