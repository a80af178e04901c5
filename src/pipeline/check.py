"""An invariant checker over a pipeline database: what the rows promise, verified.

``check_database(engine)`` reads every run, its phase rows and its warnings in
one read transaction (a consistent snapshot) and returns the contradictions it
finds as human-readable lines, or an empty list when all is well. It is what
DESIGN.md's "One run's life" and "Invariants" mean, spelled out as rules over
the rows the orchestrator (``pipeline.runs``) writes:

* Status, progress and timestamps agree: ``completed`` has ``started_at`` and
  ``completed_at`` and ``progress_current == progress_total``; ``failed`` has
  an error message and ``completed_at``; ``cancelled`` has ``completed_at``
  (and the cancel request that caused it); ``queued`` and ``running`` have no
  ``completed_at``; ``running`` has ``started_at``, an owner, a heartbeat and a
  ``current_phase`` in 1..``progress_total``; ``created_at <= started_at <=
  completed_at``.
* Phase rows agree with their run: none before the run first started; after
  it, rows 1..n with ``n == progress_total``; the completed ones are exactly
  phases 1..``progress_current`` (phases complete in order, in the same
  transaction that moves ``progress_current``); the phase after them is the
  one named by ``current_phase``, and it is ``running`` for a running run,
  ``failed`` for a failed one, ``cancelled`` or ``pending`` for a cancelled one
  (cancelled inside the phase, or at the boundary before it) and ``pending``
  for a queued one; every later phase is ``pending``. So at most one phase row
  is ``running``, only in a running run, and it is its ``current_phase``.
* Warnings and phase rows belong to existing runs (and a warning's phase to an
  existing phase row of its run).
* On SQLite: ``PRAGMA integrity_check`` answers ``ok`` and ``PRAGMA
  foreign_key_check`` finds nothing.

With ``expect_idle=True`` (after a server stopped, at the end of a soak test)
a run still ``running`` is a violation too.

Run it against the configured database with ``python -m pipeline.check``
(``PIPELINE_DATABASE_URL``); it prints the violations and exits 1 if any.

Timestamps are compared as written: the orchestrator writes them all on the
database's clock (``schema.db_now``), so the ordering rules hold across
machines whose clocks disagree.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, RowMapping

from pipeline import db
from pipeline.schema import PHASE_STATUSES, RUN_STATUSES
from pipeline.schema import analysis_runs as runs_t
from pipeline.schema import run_phases as phases_t
from pipeline.schema import run_warnings as warnings_t

# Runs are read in batches of this many (by id), with their phase rows, so that
# a large database is checked in bounded memory.
BATCH = 500
# At most this many violations are reported per rule family for orphans and
# SQLite's own checks (one broken page can produce thousands of lines).
MAX_REPORTED = 100

TERMINAL = ("completed", "failed", "cancelled")


def check_database(engine: Engine, *, expect_idle: bool = False) -> list[str]:
    """Every contradiction found in the database; an empty list when all is well.

    Use an engine from :func:`pipeline.db.create_engine`, so that the reads
    share one snapshot on SQLite (on PostgreSQL the transaction is REPEATABLE
    READ).
    """
    problems: list[str] = []
    with _snapshot(engine) as conn:
        for batch in _run_batches(conn):
            phases = _phases_of(conn, batch[0]["id"], batch[-1]["id"])
            for run in batch:
                problems += _check_run(run, phases.get(run["id"], []), expect_idle=expect_idle)
        problems += _check_orphans(conn)
        problems += _check_warning_phases(conn)
        if conn.dialect.name == "sqlite":
            problems += _check_sqlite(conn)
    return problems


@contextmanager
def _snapshot(engine: Engine) -> Iterator[Connection]:
    with db.translate_errors(), engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn = conn.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
        with conn.begin():
            db.read_only(conn)
            yield conn


def _run_batches(conn: Connection) -> Iterator[list[RowMapping]]:
    last = None
    while True:
        query = sa.select(runs_t).order_by(runs_t.c.id).limit(BATCH)
        if last is not None:
            query = query.where(runs_t.c.id > last)
        batch = list(conn.execute(query).mappings())
        if not batch:
            return
        yield batch
        last = batch[-1]["id"]


def _phases_of(conn: Connection, first: int, last: int) -> dict[int, list[RowMapping]]:
    query = (
        sa.select(phases_t)
        .where(phases_t.c.run_id.between(first, last))
        .order_by(phases_t.c.run_id, phases_t.c.phase_num)
    )
    grouped: dict[int, list[RowMapping]] = {}
    for row in conn.execute(query).mappings():
        grouped.setdefault(row["run_id"], []).append(row)
    return grouped


# -- one run ----------------------------------------------------------------------


def _check_run(run: RowMapping, phases: Sequence[RowMapping], *, expect_idle: bool) -> list[str]:
    status = run["status"]
    where = f"run {run['id']} ({status})"
    found = [f"{where}: {problem}" for problem in _run_problems(run, expect_idle=expect_idle)]
    if status in RUN_STATUSES:
        found += [f"{where}: {problem}" for problem in _phase_problems(run, phases)]
    return found


def _run_problems(run: RowMapping, *, expect_idle: bool) -> Iterator[str]:
    status = run["status"]
    if status not in RUN_STATUSES:
        yield f"unknown status {status!r}"
        return
    created, started, completed = run["created_at"], run["started_at"], run["completed_at"]
    current, total, phase = run["progress_current"], run["progress_total"], run["current_phase"]
    sub_current, sub_total = run["phase_progress_current"], run["phase_progress_total"]

    if expect_idle and status == "running":
        yield "still running, but the database should be idle (no runner is alive)"

    # Status against timestamps and messages.
    if status in TERMINAL and completed is None:
        yield "completed_at is not set although the run ended"
    if status in ("queued", "running") and completed is not None:
        yield "completed_at is set although the run has not ended"
    if status in ("running", "completed") and started is None:
        yield "started_at is not set"
    if status == "failed" and not run["error_message"]:
        yield "error_message is not set for a failed run"
    if status != "failed" and run["error_message"] is not None:
        yield "error_message is set although the run did not fail"
    if status == "cancelled" and run["cancel_requested_at"] is None:
        yield "cancelled without a cancel request (cancel_requested_at is not set)"
    if status == "queued" and run["cancel_requested_at"] is not None:
        yield "queued with a pending cancel request (a queued run is cancelled at once)"
    if status == "running":
        if run["owner"] is None:
            yield "running without an owner"
        if run["heartbeat_at"] is None:
            yield "running without a heartbeat"

    # Progress.
    if current is None or current < 0:
        yield f"progress_current is {current!r}"
    elif total is not None and current > total:
        yield f"progress_current {current} is beyond progress_total {total}"
    if status == "completed" and (total is None or current != total):
        yield f"completed with progress {current}/{total}"
    if status == "running" and (phase is None or total is None or not 1 <= phase <= total):
        yield f"current_phase {phase!r} is not between 1 and progress_total {total!r}"
    if status != "running" and (sub_current is not None or sub_total is not None):
        yield f"sub-progress {sub_current}/{sub_total} left on a run that is not running"
    if sub_current is not None and (
        sub_current < 0 or (sub_total is not None and sub_current > sub_total)
    ):
        yield f"sub-progress {sub_current}/{sub_total} is out of range"

    # Timestamps in order.
    if started is not None and started < created:
        yield f"started_at {_iso(started)} is before created_at {_iso(created)}"
    if completed is not None and completed < (started or created):
        which = "started_at" if started is not None else "created_at"
        yield f"completed_at {_iso(completed)} is before {which} {_iso(started or created)}"
    if run["cancel_requested_at"] is not None and run["cancel_requested_at"] < created:
        yield "cancel_requested_at is before created_at"


def _phase_problems(run: RowMapping, phases: Sequence[RowMapping]) -> Iterator[str]:
    status = run["status"]
    current, total, phase = run["progress_current"], run["progress_total"], run["current_phase"]

    if run["started_at"] is None:
        # Never claimed: queued, cancelled while queued, or swept before it started.
        if phases:
            yield f"{len(phases)} phase row(s) although the run never started"
        if phase is not None or total is not None or current != 0:
            yield (
                f"never started, yet current_phase={phase!r}, "
                f"progress {current!r}/{total!r} (expected None, 0/None)"
            )
        return

    numbers = [p["phase_num"] for p in phases]
    if total is None or numbers != list(range(1, total + 1)):
        yield f"phase rows are numbered {numbers}, expected 1..{total} (progress_total)"
        return

    for p in phases:
        yield from _phase_row_problems(run, p)

    completed = [p["phase_num"] for p in phases if p["status"] == "completed"]
    if len(completed) != current:
        yield f"progress_current is {current} but {len(completed)} phase row(s) are completed"
    if completed != list(range(1, len(completed) + 1)):
        yield f"the completed phases {completed} are not the first ones in order"
        return

    following = len(completed) + 1  # the phase after the completed ones
    expected_current = total if status == "completed" else following
    if phase != expected_current:
        yield f"current_phase is {phase!r}, expected {expected_current} (after the completed ones)"
    elif run["phase_label"] != phases[phase - 1]["label"]:
        yield (
            f"phase_label {run['phase_label']!r} is not the label of phase {phase} "
            f"({phases[phase - 1]['label']!r})"
        )
    if status == "completed":
        if len(completed) != total:
            yield f"completed, but only phases {completed} of {total} are completed"
        return
    if following > total:
        yield f"every phase is completed, but the run is {status}"
        return

    allowed = {
        "running": ("running",),
        "failed": ("failed",),
        "cancelled": ("cancelled", "pending"),
        "queued": ("pending",),
    }[status]
    actual = phases[following - 1]["status"]
    if actual not in allowed:
        yield (
            f"phase {following} (the one after the completed ones) is {actual!r}, "
            f"expected {' or '.join(map(repr, allowed))}"
        )
    for p in phases[following:]:
        if p["status"] != "pending":
            yield (
                f"phase {p['phase_num']} is {p['status']!r} after phase {following}, "
                "expected 'pending'"
            )

    running = [p["phase_num"] for p in phases if p["status"] == "running"]
    if len(running) > 1:
        yield f"{len(running)} phase rows are running: {running}"


def _phase_row_problems(run: RowMapping, p: RowMapping) -> Iterator[str]:
    where = f"phase {p['phase_num']} ({p['status']})"
    status, started, finished = p["status"], p["started_at"], p["finished_at"]
    if status not in PHASE_STATUSES:
        yield f"{where}: unknown phase status"
        return
    if not (p["label"] or "").strip():
        yield f"{where}: empty label"
    if status != "pending":
        if started is None:
            yield f"{where}: started_at is not set"
        if p["attempts"] < 1:
            yield f"{where}: attempts is {p['attempts']}, expected at least 1"
    elif p["attempts"] < 0:
        yield f"{where}: attempts is {p['attempts']}"
    if status in ("completed", "failed", "cancelled") and finished is None:
        yield f"{where}: finished_at is not set"
    if status in ("pending", "running") and finished is not None:
        yield f"{where}: finished_at is set although the phase is not finished"
    if started is not None and finished is not None and finished < started:
        yield f"{where}: finished_at {_iso(finished)} is before started_at {_iso(started)}"
    if started is not None and run["started_at"] is not None and started < run["started_at"]:
        yield f"{where}: started_at {_iso(started)} is before the run's {_iso(run['started_at'])}"
    if finished is not None and run["completed_at"] is not None and finished > run["completed_at"]:
        yield (
            f"{where}: finished_at {_iso(finished)} is after the run's completed_at "
            f"{_iso(run['completed_at'])}"
        )


# -- across tables ----------------------------------------------------------------


def _check_orphans(conn: Connection) -> list[str]:
    found = []
    for table, what in ((phases_t, "phase row"), (warnings_t, "warning")):
        key = table.c.phase_num if table is phases_t else table.c.id
        query = (
            sa.select(table.c.run_id, key)
            .select_from(table.outerjoin(runs_t, runs_t.c.id == table.c.run_id))
            .where(runs_t.c.id.is_(None))
            .order_by(table.c.run_id, key)
            .limit(MAX_REPORTED)
        )
        for run_id, ident in conn.execute(query):
            found.append(f"{what} {ident} references no run (run_id {run_id} does not exist)")
    return found


def _check_warning_phases(conn: Connection) -> list[str]:
    """A warning's phase is a phase of its run (the runner records the phase in flight)."""
    joined = warnings_t.outerjoin(
        phases_t,
        sa.and_(
            phases_t.c.run_id == warnings_t.c.run_id,
            phases_t.c.phase_num == warnings_t.c.phase,
        ),
    )
    query = (
        sa.select(warnings_t.c.id, warnings_t.c.run_id, warnings_t.c.phase)
        .select_from(joined)
        .where(warnings_t.c.phase.is_not(None), phases_t.c.run_id.is_(None))
        .order_by(warnings_t.c.id)
        .limit(MAX_REPORTED)
    )
    return [
        f"warning {ident} of run {run_id} names phase {phase}, which the run does not have"
        for ident, run_id, phase in conn.execute(query)
    ]


def _check_sqlite(conn: Connection) -> list[str]:
    found = []
    integrity = [row[0] for row in conn.exec_driver_sql("PRAGMA integrity_check")]
    if integrity != ["ok"]:
        found += [f"integrity_check: {line}" for line in integrity[:MAX_REPORTED]]
    for row in conn.exec_driver_sql("PRAGMA foreign_key_check").fetchmany(MAX_REPORTED):
        table, rowid, parent, _fk = row
        found.append(f"foreign_key_check: {table} row {rowid} references a missing row of {parent}")
    return found


def _iso(value: dt.datetime) -> str:
    return value.isoformat()


# -- command line ---------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.config import get_settings

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.check",
        description="Check the invariants of the database named by PIPELINE_DATABASE_URL.",
    )
    parser.add_argument(
        "--expect-idle",
        action="store_true",
        help="also report runs still running (use when no server or worker is alive)",
    )
    args = parser.parse_args(argv)
    settings = get_settings()
    engine = db.create_engine(settings.database_url, busy_timeout_ms=settings.busy_timeout_ms)
    try:
        try:
            db.check_schema(engine)
        except db.SchemaNotCurrent as exc:
            print(f"cannot check: {exc}", file=sys.stderr)
            return 2
        problems = check_database(engine, expect_idle=args.expect_idle)
    finally:
        engine.dispose()
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} violation(s)", file=sys.stderr)
        return 1
    print("no violations", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
