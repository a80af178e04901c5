"""The floor: the orchestrator's durable writes, made with plain ``sqlite3``.

The statements are the ones SQLAlchemy sends for ``runs.create_run``,
``runs.claim`` and ``runs.finish_phase`` (traced with a
``before_cursor_execute`` listener; :func:`bench.orchestration.trace_run`
checks that the counts agree), with the same parameters, in the same
transactions: ``BEGIN IMMEDIATE`` ... ``COMMIT``, one commit to create a run,
one to claim it, one per phase. What it leaves out is everything that is not
a durable write: SQLAlchemy, the write gate, logging, metrics, the run
context, threads.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence

NOW = "strftime('%Y-%m-%d %H:%M:%f000', 'now')"  # schema.db_now on SQLite
AT_BOUNDARY = "(SELECT analysis_runs.heartbeat_at FROM analysis_runs WHERE analysis_runs.id = ?)"
AT_COMPLETION = "(SELECT analysis_runs.completed_at FROM analysis_runs WHERE analysis_runs.id = ?)"
INSERT_RUN = (
    "INSERT INTO analysis_runs (status, params, progress_current, created_at, owner) "
    f"VALUES (?, ?, ?, {NOW}, ?) RETURNING id"
)
CLAIM_SELECT_RESERVED = (
    "SELECT analysis_runs.id, analysis_runs.params FROM analysis_runs "
    "WHERE analysis_runs.status = ? AND analysis_runs.id = ? AND analysis_runs.owner = ?"
)
CLAIM_SELECT_NEXT = (
    "SELECT analysis_runs.id, analysis_runs.params FROM analysis_runs "
    "WHERE analysis_runs.status = ? AND analysis_runs.owner IS NULL "
    "ORDER BY analysis_runs.id LIMIT ? OFFSET ?"
)
INSERT_PHASES = (
    "INSERT INTO run_phases (run_id, phase_num, label, status, attempts, started_at) VALUES "
)


def insert_phases(count: int, *, first_running: bool) -> str:
    """``count`` phase rows in one statement, as ``runs._insert_phases`` (1,000 at most).

    With ``first_running`` the first row starts now, and the claim's run row
    takes that instant from it (``START_FRESH_RUN``).
    """
    first = NOW if first_running else "NULL"
    rows = [f"(?, ?, ?, ?, ?, {first})"] + ["(?, ?, ?, ?, ?, NULL)"] * (count - 1)
    return INSERT_PHASES + ", ".join(rows)


FIRST_STARTED = (
    "(SELECT run_phases.started_at FROM run_phases "
    "WHERE run_phases.run_id = ? AND run_phases.phase_num = ?)"
)
START_FRESH_RUN = (
    "UPDATE analysis_runs SET status=?, current_phase=?, phase_label=?, progress_current=?, "
    "progress_total=?, phase_progress_current=?, phase_progress_total=?, "
    f"started_at={FIRST_STARTED}, heartbeat_at={FIRST_STARTED}, owner=? "
    "WHERE analysis_runs.id = ? RETURNING cancel_requested_at"
)
COMPLETE_PHASE = (
    f"UPDATE run_phases SET status=?, finished_at={AT_COMPLETION} "
    "WHERE run_phases.run_id = ? AND run_phases.phase_num = ?"
)
CROSS_BOUNDARY = (
    "UPDATE run_phases SET status=CASE WHEN (run_phases.phase_num = ?) THEN ? ELSE ? END, "
    "attempts=CASE WHEN (run_phases.phase_num = ?) THEN run_phases.attempts "
    "ELSE run_phases.attempts + ? END, "
    "started_at=CASE WHEN (run_phases.phase_num = ?) THEN run_phases.started_at "
    f"ELSE {AT_BOUNDARY} END, "
    f"finished_at=CASE WHEN (run_phases.phase_num = ?) THEN {AT_BOUNDARY} END "
    "WHERE run_phases.run_id = ? AND run_phases.phase_num IN (?, ?)"
)
NEXT_BOUNDARY = (
    "UPDATE analysis_runs SET current_phase=?, phase_label=?, progress_current=?, "
    f"phase_progress_current=?, phase_progress_total=?, heartbeat_at={NOW} "
    "WHERE analysis_runs.id = ? AND analysis_runs.owner = ? AND analysis_runs.status = ? "
    "RETURNING cancel_requested_at"
)
LAST_BOUNDARY = (
    "UPDATE analysis_runs SET status=?, progress_current=?, phase_progress_current=?, "
    f"phase_progress_total=?, completed_at={NOW} "
    "WHERE analysis_runs.id = ? AND analysis_runs.owner = ? AND analysis_runs.status = ? "
    "RETURNING cancel_requested_at"
)

PhaseCall = Callable[[int], None]


def create_run(conn: sqlite3.Connection, owner: str | None) -> int:
    """``runs.create_run`` in its own write transaction: one commit."""
    conn.execute("BEGIN IMMEDIATE")
    run_id = int(conn.execute(INSERT_RUN, ("queued", "{}", 0, owner)).fetchone()[0])
    conn.execute("COMMIT")
    return run_id


def claim(
    conn: sqlite3.Connection, owner: str, labels: Sequence[tuple[int, str]], run_id: int | None
) -> int | None:
    """``runs.claim`` for a fresh run: mark it running, create its phase rows; one commit."""
    conn.execute("BEGIN IMMEDIATE")
    if run_id is None:
        row = conn.execute(CLAIM_SELECT_NEXT, ("queued", 1, 0)).fetchone()
    else:
        row = conn.execute(CLAIM_SELECT_RESERVED, ("queued", run_id, owner)).fetchone()
    if row is None:
        conn.execute("COMMIT")
        return None
    run_id = int(row[0])
    # A fresh run (as every run here is) has no phase rows to read: they are
    # inserted, the first one running from now, and the run row takes its instant.
    for start in range(0, len(labels), 1000):
        chunk = labels[start : start + 1000]
        values: list[object] = [v for n, lb in chunk for v in (run_id, n, lb, "pending", 0)]
        if start == 0:
            values[3:5] = ["running", 1]
        conn.execute(insert_phases(len(chunk), first_running=start == 0), values)
    first, label = labels[0]
    counters = ("running", first, label, 0, len(labels), None, None)
    instant = (run_id, first)  # the first phase row's started_at, for both columns
    conn.execute(START_FRESH_RUN, (*counters, *instant, *instant, owner, run_id)).fetchone()
    conn.execute("COMMIT")
    return run_id


def execute_phases(
    conn: sqlite3.Connection,
    run_id: int,
    owner: str,
    labels: Sequence[tuple[int, str]],
    phase: PhaseCall,
) -> None:
    """Each phase, then ``runs.finish_phase`` in the same transaction; one commit each.

    As in the runner, ``BEGIN IMMEDIATE`` goes out just before the first
    statement: a phase that writes nothing begins it at the boundary.
    """
    last = len(labels)
    for index, (num, _label) in enumerate(labels):
        phase(num)
        conn.execute("BEGIN IMMEDIATE")
        if index + 1 < last:
            nxt, nxt_label = labels[index + 1]
            row = conn.execute(
                NEXT_BOUNDARY, (nxt, nxt_label, num, None, None, run_id, owner, "running")
            ).fetchone()
            if row is None or row[0] is not None:
                raise RuntimeError("reference run lost or cancelled")
            conn.execute(
                CROSS_BOUNDARY,
                (num, "completed", "running", num, 1, num, run_id, num, run_id, run_id, num, nxt),
            )
        else:
            conn.execute(
                LAST_BOUNDARY, ("completed", num, None, None, run_id, owner, "running")
            ).fetchone()
            conn.execute(COMPLETE_PHASE, ("completed", run_id, run_id, num))
        conn.execute("COMMIT")


def whole_run(
    conn: sqlite3.Connection,
    owner: str,
    labels: Sequence[tuple[int, str]],
    phase: PhaseCall,
    run_id: int | None = None,
) -> int:
    """Claim (a given or the next queued run) and execute it to completion."""
    claimed = claim(conn, owner, labels, run_id)
    if claimed is None:
        raise RuntimeError("nothing to claim")
    execute_phases(conn, claimed, owner, labels, phase)
    return claimed
