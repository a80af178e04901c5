"""A phase boundary's statements: how many, and what they leave when they must not cross.

On PostgreSQL the run row's update and the phase rows' update of a claim, a
boundary and a run's last phase are one statement (``runs._Boundary``): each
statement is a round trip the runner waits for. On SQLite they stay two.
Either way the rows must say the same thing, and a boundary that must not
cross (a cancel request waiting there, a run that is no longer ours) must
leave the phase rows as they were.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pipeline import db, runs
from pipeline.runs import RunStatus
from pipeline.schema import analysis_runs, run_phases

from .conftest import read_run

PHASES = [(1, "One"), (2, "Two"), (3, "Three")]
OWNER = "test-runner"


@contextmanager
def counted(engine: Engine) -> Iterator[list[str]]:
    """The statements sent to the database meanwhile (the compiled path tells listeners too)."""
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def claimed_run(engine: Engine) -> int:
    with db.write(engine) as conn:
        run_id = runs.create_run(conn, params={}).id
    with db.write(engine) as conn:
        claimed = runs.claim(conn, owner=OWNER, phases=PHASES)
    assert claimed is not None
    assert claimed.run_id == run_id
    return run_id


def row_of(engine: Engine, run_id: int) -> Any:
    """The run's row as stored, with what the API does not show (owner, heartbeat)."""
    with db.read(engine) as conn:
        return conn.execute(sa.select(analysis_runs).where(analysis_runs.c.id == run_id)).one()


def statuses(conn: Connection, run_id: int) -> list[str]:
    rows = conn.execute(
        sa.select(run_phases.c.status)
        .where(run_phases.c.run_id == run_id)
        .order_by(run_phases.c.phase_num)
    )
    return [status for (status,) in rows]


def test_a_boundary_is_one_statement_on_postgresql_and_two_on_sqlite(engine):
    """Cross and finish: on PostgreSQL one statement fewer each, and the same rows.

    A fresh run's claim is three statements on both.
    """
    pg = not db.is_sqlite(engine)
    with db.write(engine) as conn:
        run_id = runs.create_run(conn, params={}).id
    with counted(engine) as claim, db.write(engine) as conn:
        assert runs.claim(conn, owner=OWNER, phases=PHASES) is not None
    # the next queued run, its phase rows with the first one started, and the run row
    # from that instant: taken once the rows are in, so that the first phase's time
    # does not hold the insertion of a long registry's rows
    assert len(claim) == 3, claim
    assert [sql.split()[0:3] for sql in claim[1:]] == [
        ["INSERT", "INTO", "run_phases"],
        ["UPDATE", "analysis_runs", "SET"],
    ]
    run = read_run(engine, run_id)
    assert [(p.status, p.attempts) for p in run.phases] == [
        ("running", 1),
        ("pending", 0),
        ("pending", 0),
    ]
    assert run.phases[0].started_at == row_of(engine, run_id).heartbeat_at == run.started_at
    assert run.phases[1].started_at is None
    with counted(engine) as boundary, db.write(engine) as conn:
        status = runs.finish_phase(
            conn, run_id=run_id, owner=OWNER, phase_num=1, next_phase=(2, "Two"), warnings=[]
        )
    assert status is RunStatus.RUNNING
    assert len(boundary) == (1 if pg else 2), boundary
    run = read_run(engine, run_id)
    assert (run.current_phase, run.phase_label, run.progress_current) == (2, "Two", 1)
    assert [p.status for p in run.phases] == ["completed", "running", "pending"]
    assert (
        run.phases[0].finished_at == run.phases[1].started_at == row_of(engine, run_id).heartbeat_at
    )
    assert run.phases[1].attempts == 1
    with db.write(engine) as conn:
        runs.finish_phase(
            conn, run_id=run_id, owner=OWNER, phase_num=2, next_phase=(3, "Three"), warnings=[]
        )
    with counted(engine) as last, db.write(engine) as conn:
        status = runs.finish_phase(
            conn, run_id=run_id, owner=OWNER, phase_num=3, next_phase=None, warnings=[]
        )
    assert status is RunStatus.COMPLETED
    assert len(last) == (1 if pg else 2), last
    run = read_run(engine, run_id)
    assert run.status is RunStatus.COMPLETED
    assert [p.status for p in run.phases] == ["completed"] * 3
    assert run.phases[2].finished_at == run.completed_at


def test_a_cancel_request_in_the_row_stops_the_run_at_the_boundary(engine):
    """The one-statement boundary reads the request inside the statement: no next phase runs."""
    run_id = claimed_run(engine)
    with db.write(engine) as conn:
        assert runs.request_cancel(conn, run_id=run_id) is not None
    with db.write(engine) as conn:
        status = runs.finish_phase(
            conn, run_id=run_id, owner=OWNER, phase_num=1, next_phase=(2, "Two"), warnings=[]
        )
    assert status is RunStatus.CANCELLED
    run = read_run(engine, run_id)
    assert run.status is RunStatus.CANCELLED
    assert [p.status for p in run.phases] == ["completed", "pending", "pending"]
    assert run.phases[1].attempts == 0
    assert run.phases[1].started_at is None
    assert run.completed_at == run.phases[0].finished_at


def test_a_cancel_known_only_in_this_process_stops_the_run_at_the_boundary(engine):
    """Not yet in the row (``cancel=True``): the phase rows do not cross either."""
    run_id = claimed_run(engine)
    with db.write(engine) as conn:
        status = runs.finish_phase(
            conn,
            run_id=run_id,
            owner=OWNER,
            phase_num=1,
            next_phase=(2, "Two"),
            warnings=[],
            cancel=True,
        )
    assert status is RunStatus.CANCELLED
    run = read_run(engine, run_id)
    assert run.status is RunStatus.CANCELLED
    assert run.cancel_requested_at is not None
    assert [p.status for p in run.phases] == ["completed", "pending", "pending"]


@pytest.mark.parametrize("next_phase", [(2, "Two"), None], ids=["cross", "last"])
def test_a_boundary_of_a_run_no_longer_ours_writes_no_phase_row(engine, next_phase):
    """Another owner: RunLost, and inside the transaction the phase rows are untouched."""
    run_id = claimed_run(engine)
    with db.write(engine) as conn:
        before = statuses(conn, run_id)
        with pytest.raises(runs.RunLost):
            runs.finish_phase(
                conn,
                run_id=run_id,
                owner="someone-else",
                phase_num=1,
                next_phase=next_phase,
                warnings=[],
            )
        assert statuses(conn, run_id) == before == ["running", "pending", "pending"]
    row = row_of(engine, run_id)
    assert (row.status, row.current_phase, row.owner) == ("running", 1, OWNER)


def test_many_phase_rows_go_in_as_a_few_statements(engine, monkeypatch):
    """Past PHASE_ROWS_PER_INSERT the rows are split, and every one is there, in order."""
    monkeypatch.setattr(runs, "PHASE_ROWS_PER_INSERT", 2)
    phases = [(n, f"Phase {n}") for n in range(1, 6)]
    with db.write(engine) as conn:
        run_id = runs.create_run(conn, params={}).id
    with counted(engine) as seen, db.write(engine) as conn:
        assert runs.claim(conn, owner=OWNER, phases=phases) is not None
    inserts = [s for s in seen if s.startswith("INSERT INTO run_phases")]
    assert len(inserts) == 3
    run = read_run(engine, run_id)
    assert [(p.num, p.label) for p in run.phases] == phases
    assert [p.status for p in run.phases] == ["running"] + ["pending"] * 4
