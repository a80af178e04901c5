"""Registries for tests that run the `pipeline` command in a subprocess.

Selected with PIPELINE_PHASES=tests.registries:NAME (the repository root on
PYTHONPATH). Phases coordinate with the test through files in PIPELINE_TEST_DIR.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from sqlalchemy.engine import Connection

from pipeline.orchestrator import RunContext


def _signal_dir() -> Path:
    return Path(os.environ["PIPELINE_TEST_DIR"])


def quick(conn: Connection, ctx: RunContext) -> None:
    ctx.progress(1, 2)
    ctx.progress(2, 2)


def fails(conn: Connection, ctx: RunContext) -> None:
    raise RuntimeError("the analysis could not finish")


def waits_for_cancel(conn: Connection, ctx: RunContext) -> None:
    """Tells the test it is running, then checks for cancellation until asked to stop."""
    (_signal_dir() / f"running-{ctx.run_id}").touch()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ctx.raise_if_cancelled()
        time.sleep(0.02)
    raise TimeoutError("never cancelled")


OK = [(1, "Quick one", quick), (2, "Quick two", quick)]
FAILS = [(1, "Quick", quick), (2, "Fails", fails)]
CANCELLABLE = [(1, "Waits", waits_for_cancel), (2, "Never", quick)]
BROKEN = [(1, "One", quick), (3, "Three", quick)]
