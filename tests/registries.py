"""Registries for tests that run the `pipeline` command in a subprocess.

Selected with PIPELINE_PHASES=tests.registries:NAME (the repository root on
PYTHONPATH). Phases coordinate with the test through files in PIPELINE_TEST_DIR.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from sqlalchemy import text
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
        if not (_signal_dir() / "ignore-cancel").exists():
            ctx.raise_if_cancelled()
        time.sleep(0.02)
    raise TimeoutError("never cancelled")


OK = [(1, "Quick one", quick), (2, "Quick two", quick)]
FAILS = [(1, "Quick", quick), (2, "Fails", fails)]
CANCELLABLE = [(1, "Waits", waits_for_cancel), (2, "Never", quick)]
BROKEN = [(1, "One", quick), (3, "Three", quick)]


# -- process death (tests/test_process_death.py) ---------------------------------

# Each KILLABLE phase holds its write transaction for KILLABLE_STEPS sleeps of
# KILLABLE_STEP_SECONDS, so that a SIGKILL lands inside phases as well as at
# their boundaries. Phases start once the file `go` exists, so that the test
# can queue all its runs first. The test creates the ledger and items tables.
KILLABLE_STEPS = 5
KILLABLE_STEP_SECONDS = 0.02
KILLABLE_ITEMS = 3


def _mark(ctx: RunContext, where: str) -> None:
    """Where the phase is, for the test's report of where a kill landed (atomic replace)."""
    path = _signal_dir() / f"pos-{ctx.run_id}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{ctx.phase_num} {where}")
    os.replace(tmp, path)


def killable(conn: Connection, ctx: RunContext) -> None:
    """Writes a ledger row and a few items, then holds its open write transaction a while."""
    deadline = time.monotonic() + 60
    while not (_signal_dir() / "go").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("never told to go")
        time.sleep(0.005)
    _mark(ctx, "waiting-for-lock")
    key = {"r": ctx.run_id, "p": ctx.phase_num}
    conn.execute(text("INSERT INTO ledger (run_id, phase) VALUES (:r, :p)"), key)
    conn.execute(
        text("INSERT INTO items (run_id, phase, n) VALUES (:r, :p, :n)"),
        [{**key, "n": n} for n in range(KILLABLE_ITEMS)],
    )
    for step in range(KILLABLE_STEPS):
        _mark(ctx, f"step-{step}/{KILLABLE_STEPS}")
        time.sleep(KILLABLE_STEP_SECONDS)
        ctx.progress(step + 1, KILLABLE_STEPS)
    _mark(ctx, "committing")


KILLABLE = [
    (1, "Killable one", killable),
    (2, "Killable two", killable),
    (3, "Killable three", killable),
    (4, "Killable four", killable),
]


# -- graceful stop (tests/test_graceful_stop.py) ----------------------------------


def held_until_released(conn: Connection, ctx: RunContext) -> None:
    """Tells the test it is running, then waits for the file `release` (any run)."""
    (_signal_dir() / f"held-{ctx.run_id}").touch()
    deadline = time.monotonic() + 60
    while not (_signal_dir() / "release").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("never released")
        time.sleep(0.02)


HELD = [(1, "Held until released", held_until_released), (2, "Quick after", quick)]


# -- results across a kill (tests/test_process_death.py) ---------------------------


def returns_a_result(conn: Connection, ctx: RunContext) -> dict[str, object]:
    """Counts its executions in a file, and returns a value for phase 3."""
    with (_signal_dir() / f"phase2-{ctx.run_id}").open("a") as log:
        log.write("executed\n")
    return {"answer": 42, "from": "phase 2"}


def waits_then_reports(conn: Connection, ctx: RunContext) -> None:
    """Says it is running, waits for `release` (to be killed meanwhile), records ctx.results."""
    (_signal_dir() / f"in-phase3-{ctx.run_id}").touch()
    deadline = time.monotonic() + 60
    while not (_signal_dir() / "release").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("never released")
        time.sleep(0.02)
    import json

    (_signal_dir() / f"seen-{ctx.run_id}").write_text(json.dumps(ctx.results[2]))


RESULTS = [
    (1, "Quick", quick),
    (2, "Returns a result", returns_a_result),
    (3, "Reads it", waits_then_reports),
]
