"""Process death: a `pipeline serve` killed with SIGKILL at many points, then restarted.

Each case starts a real server on a fresh SQLite file with the KILLABLE
registry (four phases that write a ledger row and a few items, then hold their
write transaction for a while), queues three runs (two execute at once, the
third waits), kills the server at a chosen point, and checks what the next
server makes of the file: the interrupted runs are failed with the phase they
were in, none of that phase's writes survived, the earlier phases' writes did,
the file is sound, and resuming finishes every run with each phase executed
exactly once. Run with `-s` to see where each kill landed.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline import db

from .conftest import wait_for
from .registries import KILLABLE, KILLABLE_ITEMS, KILLABLE_STEP_SECONDS, KILLABLE_STEPS
from .server import ServerProcess

RUNS = 3
PHASES = len(KILLABLE)
LABELS = {num: label for num, label, _ in KILLABLE}
HOLD = KILLABLE_STEPS * KILLABLE_STEP_SECONDS  # how long a phase holds its transaction


@dataclass(frozen=True)
class KillPoint:
    """Kill `delay` s after run number `run` (1-based) is seen at `current_phase >= phase`."""

    run: int
    phase: int
    delay: float

    def __str__(self) -> str:
        return f"run {self.run} phase {self.phase} +{self.delay:.3f}s"


def _kill_points() -> list[Any]:
    points = []
    for phase in range(1, PHASES + 1):
        for name, delay in (("start", 0.0), ("mid", HOLD / 2), ("end", HOLD - 0.01)):
            points.append(pytest.param(KillPoint(1, phase, delay), id=f"run1-p{phase}-{name}"))
    # The third run starts only when one of the first two completed (not its last
    # phase: alone, it could finish before the kill and leave nothing interrupted).
    points.append(pytest.param(KillPoint(3, 3, HOLD - 0.01), id="run3-p3-end"))
    return points


def _sql(path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """A plain sqlite3 query on its own connection: nothing of the server's machinery."""
    with closing(sqlite3.connect(path, timeout=10)) as conn:
        return conn.execute(sql, params).fetchall()


def _create_tables(url: str) -> None:
    engine = db.create_engine(url)
    try:
        with db.write(engine) as conn:
            conn.exec_driver_sql(
                "CREATE TABLE ledger (id INTEGER PRIMARY KEY,"
                " run_id INTEGER NOT NULL REFERENCES analysis_runs (id), phase INTEGER NOT NULL)"
            )
            conn.exec_driver_sql(
                "CREATE TABLE items (id INTEGER PRIMARY KEY,"
                " run_id INTEGER NOT NULL REFERENCES analysis_runs (id),"
                " phase INTEGER NOT NULL, n INTEGER NOT NULL)"
            )
    finally:
        engine.dispose()


def _assert_sound(path: Path) -> None:
    assert _sql(path, "PRAGMA integrity_check") == [("ok",)]
    assert _sql(path, "PRAGMA foreign_key_check") == []


def _writes(path: Path, run_id: int) -> tuple[Counter[int], Counter[tuple[int, int]]]:
    """How often each phase wrote its ledger row, and each (phase, n) item, for one run."""
    ledger = Counter(p for (p,) in _sql(path, "SELECT phase FROM ledger WHERE run_id = ?", run_id))
    items = Counter(
        (p, n) for p, n in _sql(path, "SELECT phase, n FROM items WHERE run_id = ?", run_id)
    )
    return ledger, items


def _expected_writes(phases: range) -> tuple[Counter[int], Counter[tuple[int, int]]]:
    return Counter(phases), Counter((p, n) for p in phases for n in range(KILLABLE_ITEMS))


def _landing(path: Path, run_ids: list[int]) -> dict[int, tuple[Any, ...]]:
    """Each run's (status, current_phase, phase_label, owner) as the dead server left them."""
    rows = _sql(
        path,
        "SELECT id, status, current_phase, phase_label, owner FROM analysis_runs ORDER BY id",
    )
    state = {row[0]: row[1:] for row in rows}
    assert sorted(state) == run_ids
    return state


def _describe(state: dict[int, tuple[Any, ...]], signals: Path) -> str:
    parts = []
    for run_id, (status, phase, _label, _owner) in state.items():
        marker = signals / f"pos-{run_id}"
        where = marker.read_text() if marker.exists() else "not entered"
        if status == "running":
            parts.append(f"run {run_id} running phase {phase} [phase fn at: {where}]")
        else:
            parts.append(f"run {run_id} {status}")
    return "; ".join(parts)


@pytest.mark.parametrize("point", _kill_points())
def test_sigkill_leaves_no_half_phase_and_every_run_resumes(
    point: KillPoint, sqlite_url: str, tmp_path: Path
) -> None:
    """A SIGKILL anywhere leaves no half phase, and resuming completes every phase exactly once."""
    db_url = sqlite_url  # SQLite's own durability is under test: WAL recovery, integrity
    path = Path(db_url.removeprefix("sqlite:///"))
    signals = tmp_path / "signals"
    signals.mkdir()
    _create_tables(db_url)
    env = {
        "PIPELINE_PHASES": "tests.registries:KILLABLE",
        "PIPELINE_TEST_DIR": str(signals),
        "PIPELINE_MAX_CONCURRENT_RUNS": "2",
    }
    log = tmp_path / "server.log"

    with ServerProcess(db_url, log, **env) as server, server.client() as client:
        run_ids = []
        for i in range(RUNS):
            response = client.post("/runs", json={"params": {"i": i}})
            assert response.status_code == 201, response.text
            run_ids.append(response.json()["id"])
        (signals / "go").touch()
        target = run_ids[point.run - 1]
        wait_for(
            lambda: _sql(
                path,
                "SELECT 1 FROM analysis_runs WHERE id = ? AND"
                " (current_phase >= ? OR status != 'queued' AND status != 'running')",
                target,
                point.phase,
            ),
            timeout=30,
            interval=0.002,
        )
        time.sleep(point.delay)  # the kill point itself, not a wait for some state
        server.kill()

    # Right after the kill, before any server touches the file again.
    state = _landing(path, run_ids)
    print(f"\n[{point}] landed: {_describe(state, signals)}")
    _assert_sound(path)
    interrupted = {}
    for run_id, (status, phase, label, _owner) in state.items():
        assert status in ("queued", "running", "completed"), (run_id, status)
        done = {"queued": 0, "running": (phase or 1) - 1, "completed": PHASES}[status]
        assert _writes(path, run_id) == _expected_writes(range(1, done + 1)), run_id
        if status == "running":
            assert label == LABELS[phase]
            interrupted[run_id] = (phase, label)
    assert interrupted, "the kill should interrupt at least one run"

    with ServerProcess(db_url, log, **env) as server, server.client() as client:
        # The startup sweep has run once /healthz answers (ServerProcess.start waits for it).
        for run_id, (phase, label) in interrupted.items():
            run = client.get(f"/runs/{run_id}").json()
            assert run["status"] == "failed", run
            assert run["error_message"] == f"interrupted during phase {phase} ({label})"
            assert _writes(path, run_id) == _expected_writes(range(1, phase))
            statuses = [p["status"] for p in run["phases"]]
            assert statuses == ["completed"] * (phase - 1) + ["failed"] + ["pending"] * (
                PHASES - phase
            ), run
        dead_owner = {owner for (_s, _p, _l, owner) in state.values() if owner}
        still_running = _sql(path, "SELECT id, owner FROM analysis_runs WHERE status = 'running'")
        assert not [row for row in still_running if row[1] in dead_owner], still_running
        _assert_sound(path)

        for run_id in interrupted:
            response = client.post(f"/runs/{run_id}/resume")
            assert response.status_code == 202, response.text
        wait_for(
            lambda: (
                _sql(path, "SELECT count(*) FROM analysis_runs WHERE status = 'completed'")
                == [(RUNS,)]
            ),
            timeout=30,
        )
        for run_id in run_ids:
            run = client.get(f"/runs/{run_id}").json()
            assert (run["status"], run["percent"], run["error_message"]) == (
                "completed",
                100.0,
                None,
            )
            assert _writes(path, run_id) == _expected_writes(range(1, PHASES + 1)), run_id
    _assert_sound(path)


def test_a_result_survives_a_sigkill_and_reaches_the_next_phase_after_a_resume(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Phase 2's result, committed before a SIGKILL in phase 3, reaches phase 3 in a new process."""
    signals = tmp_path / "signals"
    signals.mkdir()
    env = {"PIPELINE_PHASES": "tests.registries:RESULTS", "PIPELINE_TEST_DIR": str(signals)}
    log = tmp_path / "server.log"
    with ServerProcess(sqlite_url, log, **env) as server, server.client() as client:
        run_id = client.post("/runs", json={}).json()["id"]
        wait_for(lambda: (signals / f"in-phase3-{run_id}").exists(), timeout=30)
        server.kill()
    (signals / "release").touch()
    with ServerProcess(sqlite_url, log, **env) as server, server.client() as client:
        assert client.get(f"/runs/{run_id}").json()["status"] == "failed"
        assert client.post(f"/runs/{run_id}/resume").status_code == 202
        wait_for(lambda: client.get(f"/runs/{run_id}").json()["status"] == "completed", timeout=30)
        run = client.get(f"/runs/{run_id}").json()
        assert [p["has_result"] for p in run["phases"]] == [False, True, False]
        assert client.get(f"/runs/{run_id}/phases/2/result").json()["result"] == {
            "answer": 42,
            "from": "phase 2",
        }
    assert json.loads((signals / f"seen-{run_id}").read_text()) == {"answer": 42, "from": "phase 2"}
    assert (signals / f"phase2-{run_id}").read_text() == "executed\n"  # not executed again
