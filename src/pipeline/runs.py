"""Every query about runs, their phases and warnings.

Nothing else in the project writes SQL about runs. Each function does one
thing inside the connection (and transaction) its caller gives it, so the
runner can put a phase's writes, its completion record and the next phase's
boundary in one transaction, while the API uses one short transaction per
request.
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline import artifacts
from pipeline.artifacts import Artifact
from pipeline.compiled import Compiled, JsonRows
from pipeline.params import validate_params
from pipeline.pipelines import DEFAULT_NAME as DEFAULT_PIPELINE
from pipeline.schema import analysis_runs as runs_t
from pipeline.schema import db_now
from pipeline.schema import run_idempotency as idempotency_t
from pipeline.schema import run_phases as phases_t
from pipeline.schema import run_warnings as warnings_t


class RunStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED)


def utcnow() -> dt.datetime:
    """This machine's clock; what is written to the database uses the database's (``db_now``)."""
    return dt.datetime.now(dt.UTC)


def rfc3339(value: dt.datetime | None) -> str | None:
    """UTC, with a ``Z``, as the HTTP contract says."""
    if value is None:
        return None
    return _utc_text(value)


@functools.lru_cache(maxsize=8192)
def _utc_text(value: dt.datetime) -> str:
    """Remembered, because watchers ask for the same runs again and again.

    A Run JSON holds a dozen instants, and formatting them was half the cost
    of encoding a run. Equal instants are equal keys whatever their offset,
    and they give the same text.
    """
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class PhaseRecord:
    num: int
    label: str
    status: str
    attempts: int
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    has_result: bool = False

    @property
    def duration_ms(self) -> int | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return round((self.finished_at - self.started_at).total_seconds() * 1000)


@dataclass(frozen=True, slots=True)
class RunWarning:
    phase: int | None
    message: str


@dataclass(frozen=True, slots=True)
class Run:
    """One row of ``analysis_runs`` with its phases and warnings, as clients see it."""

    id: int
    status: RunStatus
    params: Mapping[str, Any]
    current_phase: int | None
    phase_label: str | None
    progress_current: int
    progress_total: int | None
    phase_progress_current: int | None
    phase_progress_total: int | None
    error_message: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    completed_at: dt.datetime | None
    cancel_requested_at: dt.datetime | None
    warnings: tuple[RunWarning, ...] = ()
    phases: tuple[PhaseRecord, ...] = ()
    artifacts: tuple[Artifact, ...] = ()
    pipeline: str = DEFAULT_PIPELINE
    schedule_id: int | None = None

    @classmethod
    def from_row(
        cls,
        row: Any,
        *,
        warnings: Iterable[RunWarning] = (),
        phases: Iterable[PhaseRecord] = (),
        published: Iterable[Artifact] = (),
    ) -> Run:
        """From a row of ``_RUN_COLUMNS`` (a SQLAlchemy row or a compiled statement's)."""
        return cls(
            id=row.id,
            pipeline=row.pipeline,
            schedule_id=row.schedule_id,
            status=RunStatus(row.status),
            params=row.params,
            current_phase=row.current_phase,
            phase_label=row.phase_label,
            progress_current=row.progress_current,
            progress_total=row.progress_total,
            phase_progress_current=row.phase_progress_current,
            phase_progress_total=row.phase_progress_total,
            error_message=row.error_message,
            created_at=row.created_at,
            started_at=row.started_at,
            completed_at=row.completed_at,
            cancel_requested_at=row.cancel_requested_at,
            warnings=tuple(warnings),
            phases=tuple(phases),
            artifacts=tuple(published),
        )

    def to_dict(self) -> dict[str, Any]:
        """The Run JSON of DESIGN.md's HTTP contract: exactly these fields."""
        return {
            "id": self.id,
            "pipeline": self.pipeline,
            "schedule_id": self.schedule_id,
            "status": self.status.value,
            "params": dict(self.params),
            "current_phase": self.current_phase,
            "phase_label": self.phase_label,
            "progress_current": self.progress_current,
            "progress_total": self.progress_total,
            "phase_progress_current": self.phase_progress_current,
            "phase_progress_total": self.phase_progress_total,
            "percent": self.percent,
            "warnings": [{"phase": w.phase, "message": w.message} for w in self.warnings],
            "error_message": self.error_message,
            "created_at": rfc3339(self.created_at),
            "started_at": rfc3339(self.started_at),
            "completed_at": rfc3339(self.completed_at),
            "cancel_requested_at": rfc3339(self.cancel_requested_at),
            "phases": [
                {
                    "num": p.num,
                    "label": p.label,
                    "status": p.status,
                    "attempts": p.attempts,
                    "started_at": rfc3339(p.started_at),
                    "finished_at": rfc3339(p.finished_at),
                    "duration_ms": p.duration_ms,
                    "has_result": p.has_result,
                }
                for p in self.phases
            ],
            "artifacts": [a.summary() for a in self.artifacts],
        }

    def with_live_progress(self, live: tuple[int, int | None, int | None] | None) -> Run:
        """This run with the sub-progress its runner holds in memory, when it is fresher."""
        if live is None or self.status is not RunStatus.RUNNING or live[0] != self.current_phase:
            return self
        return replace(self, phase_progress_current=live[1], phase_progress_total=live[2])

    @property
    def percent(self) -> float:
        """Completed phases plus the current phase's fraction; 100 only when completed."""
        if self.status is RunStatus.COMPLETED:
            return 100.0
        if not self.progress_total:
            return 0.0
        fraction = 0.0
        if (
            self.status is RunStatus.RUNNING
            and self.phase_progress_total
            and self.phase_progress_current is not None
        ):
            fraction = min(max(self.phase_progress_current / self.phase_progress_total, 0.0), 1.0)
        value = round(100 * (self.progress_current + fraction) / self.progress_total, 1)
        return min(value, 99.9)


# -- reading -----------------------------------------------------------------

_RUN_COLUMNS = [c for c in runs_t.c if c.name not in ("owner", "heartbeat_at")]
# "queued" is written into the text of the queries that look for queued runs,
# not bound: a prepared statement's generic plan (psycopg prepares a statement
# at its 5th execution) cannot know a bound status, guesses that half the runs
# are queued, and walks the primary key through every finished run (a claim
# 100x slower at 1,000,000 runs; bench pg_scale prints the plans).
_QUEUED_LITERAL = sa.literal_column(f"'{RunStatus.QUEUED.value}'", sa.String)


# Reads a request makes, built once (building them cost as much as running them).
_GET_RUN = Compiled(sa.select(*_RUN_COLUMNS).where(runs_t.c.id == sa.bindparam("b_run")))
_WARNINGS_OF_RUN = Compiled(
    sa.select(warnings_t.c.run_id, warnings_t.c.phase, warnings_t.c.message)
    .where(warnings_t.c.run_id == sa.bindparam("b_run"))
    .order_by(warnings_t.c.id)
)
_PHASES_OF_RUN = Compiled(
    sa.select(phases_t)
    .where(phases_t.c.run_id == sa.bindparam("b_run"))
    .order_by(phases_t.c.phase_num)
)
# A run with its phases, warnings and artifacts as one row (SQLite): one
# statement, read in one step of the driver and needing no transaction. A
# GET /runs/{id} reads on the event loop, and each statement (and each row
# of one) gave the GIL away to the runners: seven statements and a
# transaction for a run of 5 phases, and its p99 while runs wrote was
# 1.6x the idle one.
_PHASE_JSON = JsonRows(
    [
        phases_t.c.phase_num,
        phases_t.c.label,
        phases_t.c.status,
        phases_t.c.attempts,
        phases_t.c.started_at,
        phases_t.c.finished_at,
    ],
    phases_t.c.run_id == sa.bindparam("b_run"),
)
_WARNING_JSON = JsonRows(
    [warnings_t.c.id, warnings_t.c.phase, warnings_t.c.message],
    warnings_t.c.run_id == sa.bindparam("b_run"),
)
_GET_RUN_AT_ONCE = Compiled(
    sa.select(
        *_RUN_COLUMNS,
        _PHASE_JSON.subquery.label("phases_json"),
        _WARNING_JSON.subquery.label("warnings_json"),
        artifacts.RESULT_PHASES_JSON.subquery.label("results_json"),
        artifacts.SUMMARIES_JSON.subquery.label("artifacts_json"),
    ).where(runs_t.c.id == sa.bindparam("b_run"))
)
_WARNINGS_OF = (
    sa.select(warnings_t.c.run_id, warnings_t.c.phase, warnings_t.c.message)
    .where(warnings_t.c.run_id.in_(sa.bindparam("b_ids", expanding=True)))
    .order_by(warnings_t.c.run_id, warnings_t.c.id)
)
_PHASES_OF = (
    sa.select(phases_t)
    .where(phases_t.c.run_id.in_(sa.bindparam("b_ids", expanding=True)))
    .order_by(phases_t.c.run_id, phases_t.c.phase_num)
)


def get_run(conn: Connection, *, run_id: int) -> Run | None:
    """The run with its phases, warnings and artifacts; on SQLite in one statement."""
    if conn.dialect.name == "sqlite":
        found = _GET_RUN_AT_ONCE.execute(conn, {"b_run": run_id}).first()
        return None if found is None else _run_at_once(found, conn.dialect)
    row = _GET_RUN.execute(conn, {"b_run": run_id}).first()
    if row is None:
        return None
    return _with_details(conn, [row])[0]


def _run_at_once(row: Any, dialect: sa.Dialect) -> Run:
    """A row of ``_GET_RUN_AT_ONCE`` as the Run that :func:`_with_details` makes of the same."""
    with_result = {num for (num,) in artifacts.RESULT_PHASES_JSON.read(row.results_json, dialect)}
    phases = [
        PhaseRecord(num, label, status, attempts, started, finished, num in with_result)
        for num, label, status, attempts, started, finished in sorted(
            _PHASE_JSON.read(row.phases_json, dialect)
        )
    ]
    warnings = [
        RunWarning(phase=phase, message=message)
        for _, phase, message in sorted(_WARNING_JSON.read(row.warnings_json, dialect))
    ]
    published = artifacts.summaries_from(artifacts.SUMMARIES_JSON.read(row.artifacts_json, dialect))
    return Run.from_row(row, warnings=warnings, phases=phases, published=published)


def get_run_row(conn: Connection, *, run_id: int) -> Run | None:
    """The run's own row, without its phases, warnings or artifacts: O(1) whatever its size.

    What a progress display needs (status, phase, counters, percent); a
    watcher reads this often and the whole run once, at the end.
    """
    row = _GET_RUN.execute(conn, {"b_run": run_id}).first()
    return None if row is None else Run.from_row(row)


def list_runs(
    conn: Connection,
    *,
    status: RunStatus | None = None,
    limit: int = 50,
    before: int | None = None,
    pipeline: str | None = None,
) -> tuple[list[Run], int | None]:
    """Newest first; returns the page and the cursor for the next one (or None)."""
    query = sa.select(*_RUN_COLUMNS).order_by(runs_t.c.id.desc()).limit(limit + 1)
    if pipeline is not None:
        query = query.where(runs_t.c.pipeline == pipeline)
    if status is not None:
        query = query.where(runs_t.c.status == status.value)
    if before is not None:
        query = query.where(runs_t.c.id < before)
    rows = list(conn.execute(query))
    more = len(rows) > limit
    page = _with_details(conn, rows[:limit])
    return page, (page[-1].id if more and page else None)


_LIVE = (RunStatus.QUEUED.value, RunStatus.RUNNING.value)
_WATCHED = sa.select(*_RUN_COLUMNS).where(
    sa.or_(
        runs_t.c.status.in_(_LIVE),
        runs_t.c.id > sa.bindparam("b_after"),
        runs_t.c.id.in_(sa.bindparam("b_was_live", expanding=True)),
    )
)
_NEWEST_ID = sa.select(sa.func.max(runs_t.c.id))


def watched_runs(
    conn: Connection, *, after_id: int | None, was_live: Sequence[int]
) -> tuple[list[Run], int]:
    """What a watcher of every run reads at each look, and the newest id there is.

    A run can change only while it is queued or running, when it is created
    (an id above ``after_id``) or when it leaves those states (one of
    ``was_live``): those runs, whatever their number of viewers. With
    ``after_id`` None, only the runs that can change now.
    """
    newest = conn.execute(_NEWEST_ID).scalar_one() or 0
    after = newest if after_id is None else after_id
    rows = list(conn.execute(_WATCHED, {"b_after": after, "b_was_live": list(was_live)}))
    return _with_details(conn, rows), max(newest, after)


def _with_details(conn: Connection, rows: Sequence[Any]) -> list[Run]:
    ids = [row.id for row in rows]
    if not ids:
        return []
    one = {"b_run": ids[0]}
    warnings: dict[int, list[RunWarning]] = {i: [] for i in ids}
    found = (
        _WARNINGS_OF_RUN.execute(conn, one).rows
        if len(ids) == 1
        else conn.execute(_WARNINGS_OF, {"b_ids": ids})
    )
    for w in found:
        warnings[w.run_id].append(RunWarning(phase=w.phase, message=w.message))
    phases: dict[int, list[PhaseRecord]] = {i: [] for i in ids}
    with_result = artifacts.result_phases(conn, run_ids=ids)
    published = artifacts.summaries(conn, run_ids=ids)
    found = (
        _PHASES_OF_RUN.execute(conn, one).rows
        if len(ids) == 1
        else conn.execute(_PHASES_OF, {"b_ids": ids})
    )
    for p in found:
        phases[p.run_id].append(
            PhaseRecord(
                num=p.phase_num,
                label=p.label,
                status=p.status,
                attempts=p.attempts,
                started_at=p.started_at,
                finished_at=p.finished_at,
                has_result=p.phase_num in with_result[p.run_id],
            )
        )
    return [
        Run.from_row(
            row,
            warnings=warnings[row.id],
            phases=phases[row.id],
            published=published[row.id],
        )
        for row in rows
    ]


def get_status(conn: Connection, *, run_id: int, for_update: bool = False) -> RunStatus | None:
    """The run's status; ``for_update`` locks the row (PostgreSQL) until the transaction ends.

    The lock is ``FOR NO KEY UPDATE``: a phase that inserted rows referencing
    its run holds ``FOR KEY SHARE`` on it, which ``FOR UPDATE`` would wait
    for until the phase commits (and the cancel would come too late).
    """
    query = sa.select(runs_t.c.status).where(runs_t.c.id == run_id)
    if for_update:
        query = query.with_for_update(key_share=True)
    value = conn.execute(query).scalar()
    return None if value is None else RunStatus(value)


_queued_ids = sa.select(runs_t.c.id).where(runs_t.c.status == _QUEUED_LITERAL).limit(1)
_cap = sa.bindparam("b_cap", type_=sa.Integer)
# Whether ``b_cap`` runs or more are queued. Counting the queue costs as many
# index entries as there are queued runs, and every creation asks (at 5,000
# queued, a creation took twice as long as at none). Run ids are unique, so
# queued ids that span fewer than ``b_cap`` numbers are fewer than ``b_cap``
# runs: two seeks of the status index answer, and the bounded count is
# evaluated only when the span is that wide (AND stops at a false left side).
_QUEUE_FULL = sa.and_(
    sa.func.coalesce(
        _queued_ids.order_by(runs_t.c.id.desc()).scalar_subquery()
        - _queued_ids.order_by(runs_t.c.id).scalar_subquery()
        + 1,
        0,
    )
    >= _cap,
    sa.select(sa.func.count())
    .select_from(
        sa.select(runs_t.c.id).where(runs_t.c.status == _QUEUED_LITERAL).limit(_cap).subquery()
    )
    .scalar_subquery()
    >= _cap,
)
_IS_QUEUE_FULL = Compiled(sa.select(_QUEUE_FULL))


def queue_full(conn: Connection, *, cap: int) -> bool:
    """Whether ``cap`` runs or more are queued; a creation asks the same inside its INSERT."""
    return bool(_IS_QUEUE_FULL.execute(conn, {"b_cap": cap}).scalar())


def count_by_status(conn: Connection) -> dict[RunStatus, int]:
    query = sa.select(runs_t.c.status, sa.func.count()).group_by(runs_t.c.status)
    counts = dict.fromkeys(RunStatus, 0)
    for status, count in conn.execute(query):
        counts[RunStatus(status)] = count
    return counts


# -- what clients do ----------------------------------------------------------


_NEW_RUN = {
    "status": RunStatus.QUEUED.value,
    "pipeline": sa.bindparam("b_pipeline"),
    "params": sa.bindparam("b_params", type_=runs_t.c.params.type),
    "progress_current": 0,
    "owner": sa.bindparam("b_owner", type_=runs_t.c.owner.type),
    "schedule_id": sa.bindparam("b_schedule", type_=runs_t.c.schedule_id.type),
    "created_at": db_now(),
}
# What the database decides of a new run; the rest is what was written
# (_created), so a creation reads back two columns instead of the whole row.
_ASSIGNED = (runs_t.c.id, runs_t.c.created_at)
_CREATE_RUN = Compiled(sa.insert(runs_t).values(_NEW_RUN).returning(*_ASSIGNED))
# A reserved run has a heartbeat from its creation, so that other hosts can tell
# when the process that reserved it died before starting it.
_RESERVE_RUN = Compiled(
    sa.insert(runs_t).values({**_NEW_RUN, "heartbeat_at": db_now()}).returning(*_ASSIGNED)
)


# A creation below the cap: queue_full's test is the INSERT's.
_CREATE_BELOW_CAP = Compiled(
    sa.insert(runs_t)
    .from_select(
        list(_NEW_RUN),
        sa.select(
            *[
                value if isinstance(value, sa.ColumnElement) else sa.literal(value)
                for value in _NEW_RUN.values()
            ]
        ).where(sa.not_(_QUEUE_FULL)),
    )
    .returning(*_ASSIGNED)
)


def create_run_below_cap(
    conn: Connection, *, cap: int, params: Mapping[str, Any], pipeline: str = DEFAULT_PIPELINE
) -> Run | None:
    """:func:`create_run`, unless ``cap`` runs or more are queued (:func:`queue_full`): None.

    One statement: the check, as a statement of its own, was one more trip
    through the driver while the creation held SQLite's write lock, which
    the runners wait for.
    """
    binds = _new_run(params, pipeline=pipeline, owner=None, schedule_id=None)
    row = _CREATE_BELOW_CAP.execute(conn, {**binds, "b_cap": cap}).first()
    return None if row is None else _created(row, binds)


def _created(row: Any, binds: Mapping[str, Any]) -> Run:
    """The run just inserted (``_NEW_RUN`` with ``binds``), as a read of its row would give it.

    Reading the whole row back was about 6% of a creation's instructions
    (callgrind), inside the write lock. The params go through JSON as the
    stored copy does, so the run does not share the caller's dict.
    """
    return Run(
        id=row.id,
        pipeline=binds["b_pipeline"],
        schedule_id=binds["b_schedule"],
        status=RunStatus.QUEUED,
        params=json.loads(json.dumps(binds["b_params"])),
        current_phase=None,
        phase_label=None,
        progress_current=0,
        progress_total=None,
        phase_progress_current=None,
        phase_progress_total=None,
        error_message=None,
        created_at=row.created_at,
        started_at=None,
        completed_at=None,
        cancel_requested_at=None,
    )


def _new_run(
    params: Mapping[str, Any], *, pipeline: str, owner: str | None, schedule_id: int | None
) -> dict[str, Any]:
    """A new run's binds (``_NEW_RUN``), its params checked as every door must."""
    checked = validate_params(dict(params) if isinstance(params, Mapping) else params)
    return {
        "b_pipeline": pipeline,
        "b_params": checked,
        "b_owner": owner,
        "b_schedule": schedule_id,
    }


def create_run(
    conn: Connection,
    *,
    params: Mapping[str, Any],
    owner: str | None = None,
    pipeline: str = DEFAULT_PIPELINE,
    schedule_id: int | None = None,
) -> Run:
    """Insert a queued run and return it; with ``owner`` it is reserved for that process.

    ``schedule_id`` is set by the schedule that fires it (``pipeline.schedules``).

    Raises :class:`pipeline.params.InvalidParams` (nothing written) for params
    that a later read could not handle: every door creates runs here.
    """
    binds = _new_run(params, pipeline=pipeline, owner=owner, schedule_id=schedule_id)
    row = (_CREATE_RUN if owner is None else _RESERVE_RUN).execute(conn, binds)
    return _created(row.one(), binds)


# -- Idempotency-Key: next to the run creation it guards ------------------------

IDEMPOTENCY_WINDOW = dt.timedelta(hours=24)


class IdempotencyMismatch(Exception):
    """The key was used with another body; the message says so."""


_KEY_ROW = sa.select(
    idempotency_t.c.body_hash, idempotency_t.c.run_id, idempotency_t.c.created_at
).where(idempotency_t.c.key == sa.bindparam("b_key"))


def idempotent_run(conn: Connection, *, key: str, body_hash: str) -> Run | None:
    """The run ``key`` created within the window, or None (an expired key is forgotten).

    Raises :class:`IdempotencyMismatch` when the key came with another body.
    """
    row = conn.execute(_KEY_ROW, {"b_key": key}).first()
    if row is None:
        return None
    now = conn.execute(sa.select(db_now())).scalar_one()
    if row.created_at <= now - IDEMPOTENCY_WINDOW:
        conn.execute(sa.delete(idempotency_t).where(idempotency_t.c.key == key))
        return None
    if row.body_hash != body_hash:
        raise IdempotencyMismatch(
            "this Idempotency-Key was already used with a different body; "
            "use a new key for a different request"
        )
    return get_run(conn, run_id=row.run_id)


def remember_key(conn: Connection, *, key: str, body_hash: str, run_id: int) -> None:
    """Record that ``key`` created ``run_id``, in the run's own transaction.

    A concurrent request with the same key fails here with an IntegrityError
    (the primary key): its run is rolled back with it, and it reads this one.
    """
    conn.execute(
        sa.insert(idempotency_t).values(
            key=key, body_hash=body_hash, run_id=run_id, created_at=db_now()
        )
    )


class Outcome(enum.Enum):
    """What a cancel or resume request did."""

    DONE = "done"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"


def request_cancel(conn: Connection, *, run_id: int) -> Outcome:
    """A queued run is cancelled at once; a running one is asked to stop."""
    now = db_now()
    status = get_status(conn, run_id=run_id, for_update=True)
    if status is None:
        return Outcome.NOT_FOUND
    if status is RunStatus.QUEUED:
        conn.execute(
            sa.update(runs_t)
            .where(runs_t.c.id == run_id)
            .values(
                status=RunStatus.CANCELLED.value,
                cancel_requested_at=now,
                completed_at=now,
                owner=None,
            )
        )
    elif status is RunStatus.RUNNING:
        conn.execute(
            sa.update(runs_t)
            .where(runs_t.c.id == run_id, runs_t.c.cancel_requested_at.is_(None))
            .values(cancel_requested_at=now)
        )
    elif status is not RunStatus.CANCELLED:
        return Outcome.CONFLICT
    return Outcome.DONE


class PhasesChanged(Exception):
    """The run was started with other phases than its pipeline has now."""


def describe_phase_changes(
    recorded: Sequence[tuple[int, str]], current: Sequence[tuple[int, str]]
) -> str | None:
    """What differs between the phases a run started with and the pipeline's now, or None."""
    if list(recorded) == list(current):
        return None
    changes = []
    if len(recorded) != len(current):
        changes.append(
            f"it was started with {len(recorded)} phases, the pipeline now has {len(current)}"
        )
    now = dict(current)
    for num, label in recorded:
        if num in now and now[num] != label:
            changes.append(f"phase {num} was {label!r}, now {now[num]!r}")
    return "the pipeline's phases changed since this run started: " + "; ".join(changes)


_RECORDED_PHASES = (
    sa.select(phases_t.c.phase_num, phases_t.c.label)
    .where(phases_t.c.run_id == sa.bindparam("b_run"))
    .order_by(phases_t.c.phase_num)
)


def recorded_phases(conn: Connection, *, run_id: int) -> list[tuple[int, str]]:
    """The (num, label) list a run was started with; empty if it never started."""
    return [(num, label) for num, label in conn.execute(_RECORDED_PHASES, {"b_run": run_id})]


_PIPELINE_OF = sa.select(runs_t.c.pipeline).where(runs_t.c.id == sa.bindparam("b_run"))


def resume(
    conn: Connection,
    *,
    run_id: int,
    phases: Sequence[tuple[int, str]] | Mapping[str, Sequence[tuple[int, str]]],
) -> Outcome:
    """Put a failed or cancelled run back in the queue; completed phases stay done.

    ``phases`` maps pipeline names to their (num, label) lists now (a bare
    list is the default pipeline's). Raises :class:`PhasesChanged` when the
    run started with other phases than its pipeline has now: continuing would
    run them under the wrong numbers or labels. A run of a pipeline not in
    ``phases`` is queued again unchecked: only an executor that has it claims
    it, and the claim compares the phases.
    """
    status = get_status(conn, run_id=run_id, for_update=True)
    if status is None:
        return Outcome.NOT_FOUND
    if status not in (RunStatus.FAILED, RunStatus.CANCELLED):
        return Outcome.CONFLICT
    known = dict(phases) if isinstance(phases, Mapping) else {DEFAULT_PIPELINE: phases}
    current = known.get(conn.execute(_PIPELINE_OF, {"b_run": run_id}).scalar_one())
    recorded = recorded_phases(conn, run_id=run_id)
    change = describe_phase_changes(recorded, current) if recorded and current else None
    if change is not None:
        raise PhasesChanged(change)
    conn.execute(
        sa.update(runs_t)
        .where(runs_t.c.id == run_id)
        .values(
            status=RunStatus.QUEUED.value,
            error_message=None,
            completed_at=None,
            cancel_requested_at=None,
            phase_progress_current=None,
            phase_progress_total=None,
            owner=None,
        )
    )
    conn.execute(
        sa.update(phases_t)
        .where(phases_t.c.run_id == run_id, phases_t.c.status != "completed")
        .values(status="pending", finished_at=None)
    )
    return Outcome.DONE


def _finished_before(cutoff: dt.datetime, statuses: Sequence[RunStatus]) -> sa.ColumnElement[bool]:
    return sa.and_(
        runs_t.c.status.in_([s.value for s in statuses if s.terminal]),
        runs_t.c.completed_at < cutoff,
    )


def count_finished_before(
    conn: Connection, *, cutoff: dt.datetime, statuses: Sequence[RunStatus]
) -> int:
    query = sa.select(sa.func.count()).select_from(runs_t).where(_finished_before(cutoff, statuses))
    return int(conn.execute(query).scalar_one())


def delete_finished_before(
    conn: Connection, *, cutoff: dt.datetime, statuses: Sequence[RunStatus], limit: int
) -> int:
    """Delete up to ``limit`` finished runs (oldest ids first); their rows cascade."""
    ids = (
        conn.execute(
            sa.select(runs_t.c.id)
            .where(_finished_before(cutoff, statuses))
            .order_by(runs_t.c.id)
            .limit(limit)
        )
        .scalars()
        .all()
    )
    if not ids:
        return 0
    result = conn.execute(
        sa.delete(runs_t).where(runs_t.c.id.in_(ids), _finished_before(cutoff, statuses))
    )
    return int(result.rowcount)


# -- what the runner does -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claimed:
    """A run this process now owns, and where to start it."""

    run_id: int
    params: Mapping[str, Any]
    first_phase: int
    cancel_requested: bool
    pipeline: str = DEFAULT_PIPELINE
    # What its committed phases produced: results as JSON text, artifact keys.
    results: Mapping[int, str] = field(default_factory=dict)
    artifact_keys: Mapping[str, int] = field(default_factory=dict)


_b = sa.bindparam
_claimable = sa.select(runs_t.c.id, runs_t.c.params, runs_t.c.started_at, runs_t.c.pipeline).where(
    runs_t.c.status == _QUEUED_LITERAL
)


@functools.lru_cache(maxsize=64)
def _next_queued(names: tuple[str, ...]) -> Compiled:
    """The claim query for the pipelines an executor loaded: one per set of names.

    An ``IN`` list of binds would be expanded at each execution; one
    equality per name compiles once.
    """
    return Compiled(
        _claimable.where(
            runs_t.c.owner.is_(None),
            runs_t.c.id > _b("b_after"),
            sa.or_(*[runs_t.c.pipeline == name for name in names]),
        )
        .order_by(runs_t.c.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )


_RESERVED = Compiled(
    _claimable.where(runs_t.c.id == _b("b_run"), runs_t.c.owner == _b("b_owner")).with_for_update(
        skip_locked=True
    )
)
_PHASE_STATUSES = sa.select(phases_t.c.phase_num, phases_t.c.label, phases_t.c.status).where(
    phases_t.c.run_id == _b("b_run")
)
# A claimed run's phase rows go in as one statement per this many: psycopg's
# executemany of 5 rows cost twice one statement's CPU (its pipeline mode), and
# binds stay well under SQLite's and PostgreSQL's limits (32,766 and 65,535).
PHASE_ROWS_PER_INSERT = 1000


@functools.lru_cache(maxsize=64)
def _insert_phases(count: int, *, first_running: bool = False) -> Compiled:
    """``count`` pending phase rows of run ``b_run``, from ``b_num_i`` and ``b_label_i``.

    With ``first_running``, the first row goes in already started, now: a
    fresh run's claim then marks the run running at that instant
    (``_START_FRESH_RUN``), and needs no statement of its own to start the
    first phase. The instant is taken after the rows are in, so the first
    phase's time does not hold the insertion of a long registry's rows.
    """
    rows: list[dict[str, Any]] = [
        {
            "run_id": _b("b_run"),
            "phase_num": _b(f"b_num_{i}"),
            "label": _b(f"b_label_{i}"),
            "status": "pending",
            "attempts": 0,
            "started_at": sa.null(),
        }
        for i in range(count)
    ]
    if first_running:
        rows[0].update(status="running", attempts=1, started_at=db_now())
    else:
        for row in rows:
            del row["started_at"]
    return Compiled(sa.insert(phases_t).values(rows))


_PHASE_KEYS = [(f"b_num_{i}", f"b_label_{i}") for i in range(PHASE_ROWS_PER_INSERT)]


def _add_phase_rows(
    conn: Connection, run_id: int, phases: Sequence[tuple[int, str]], *, started: bool = False
) -> None:
    """The run's phase rows, the first one already running when ``started`` (a claim's)."""
    for start in range(0, len(phases), PHASE_ROWS_PER_INSERT):
        chunk = phases[start : start + PHASE_ROWS_PER_INSERT]
        params: dict[str, Any] = {"b_run": run_id}
        for (num_key, label_key), (num, label) in zip(_PHASE_KEYS, chunk, strict=False):
            params[num_key] = num
            params[label_key] = label
        _insert_phases(len(chunk), first_running=started and start == 0).execute(conn, params)


def claim(
    conn: Connection,
    *,
    owner: str,
    phases: Sequence[tuple[int, str]] | Mapping[str, Sequence[tuple[int, str]]],
    run_id: int | None = None,
) -> Claimed | None:
    """Take the oldest unreserved queued run (or ``run_id``, reserved for us) and mark it running.

    ``phases`` maps the names of the pipelines the caller has loaded to their
    (num, label) lists (a bare list is the default pipeline's): only runs of
    those pipelines are claimed, and a run of another one stays queued.

    Call it in a write transaction: ``BEGIN IMMEDIATE`` on SQLite, and
    ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, make it safe for many claimers.
    A resumed run whose recorded phases differ from ``phases`` is never
    executed under the wrong labels: it is left queued for an executor that
    has its phases (one not yet upgraded, say).
    """
    known = dict(phases) if isinstance(phases, Mapping) else {DEFAULT_PIPELINE: phases}
    next_queued = _next_queued(tuple(sorted(known)))
    after = 0
    while True:
        if run_id is None:
            row = next_queued.execute(conn, {"b_after": after}).first()
        else:
            row = _RESERVED.execute(conn, {"b_run": run_id, "b_owner": owner}).first()
        if row is None or row.pipeline not in known:
            return None
        claimed = _claim_row(conn, row, owner=owner, phases=known[row.pipeline])
        if claimed is not None or run_id is not None:
            return claimed
        after = row.id


def _claim_row(
    conn: Connection, row: Any, *, owner: str, phases: Sequence[tuple[int, str]]
) -> Claimed | None:
    known: dict[int, str] = {}
    resumed = row.started_at is not None
    if resumed:  # its phase rows say where it stands
        rows = conn.execute(_PHASE_STATUSES, {"b_run": row.id}).all()
        if describe_phase_changes(sorted((r.phase_num, r.label) for r in rows), phases):
            return None
        known = {r.phase_num: r.status for r in rows}
    first = next(n for n, _ in phases if known.get(n) != "completed")
    params = {
        "b_run": row.id,
        "b_phase": first,
        "b_label": dict(phases)[first],
        "b_done": first - 1,
        "b_total": len(phases),
        "b_owner": owner,
    }
    if resumed:
        result, started = _CLAIM.execute(conn, params)
        if not started:
            _CLAIM.phase_rows.execute(conn, params)
    else:  # its first start: the phase rows it will keep, the first one running, then the run
        _add_phase_rows(conn, row.id, phases, started=True)
        result = _START_FRESH_RUN.execute(conn, params).first()
    assert result is not None  # the row is locked by this transaction's claim
    return Claimed(
        row.id,
        row.params,
        first,
        result.cancel_requested_at is not None,
        pipeline=row.pipeline,
        results=artifacts.load_results(conn, run_id=row.id) if resumed else {},
        artifact_keys=artifacts.published_keys(conn, run_id=row.id) if resumed else {},
    )


# -- the runner's hot path: statements built once --------------------------------
# Building a Core statement per call cost more than executing it: 250 of the
# 600 µs of a phase boundary (bench "boundary cost"). These are built at import
# and executed with bound parameters. Timestamps are the database's clock: the
# first statement of a boundary writes it (``db_now``) into the run row, and
# the phase rows take it from there in the same transaction, so that a phase
# never finishes after its run. It never travels through Python: parsed on the
# way out and formatted on the way back, it cost 15 µs of a boundary.

_OWNED = sa.and_(
    runs_t.c.id == _b("b_run"),
    runs_t.c.owner == _b("b_owner"),
    runs_t.c.status == RunStatus.RUNNING.value,
)
_THIS_PHASE = sa.and_(phases_t.c.run_id == _b("b_run"), phases_t.c.phase_num == _b("b_phase"))


def _of_the_run(column: sa.Column[Any]) -> sa.ScalarSelect[Any]:
    """The run row's ``column``, as this transaction has just written it."""
    return sa.select(column).where(runs_t.c.id == _b("b_run")).scalar_subquery()


_BOUNDARY_AT = _of_the_run(runs_t.c.heartbeat_at)  # a claim, a boundary crossed
_COMPLETED_AT = _of_the_run(runs_t.c.completed_at)  # the run's last boundary
# The instant again, for a phase's artifacts (their created_at).
_READ_BOUNDARY_AT = Compiled(sa.select(_BOUNDARY_AT))
_READ_COMPLETED_AT = Compiled(sa.select(_COMPLETED_AT))
_COMPLETE_PHASE = Compiled(
    sa.update(phases_t).where(_THIS_PHASE).values(status="completed", finished_at=_BOUNDARY_AT)
)


class _RunRow(NamedTuple):
    """What a phase-row statement takes from the run row written just before it."""

    id: sa.ColumnElement[Any]
    heartbeat_at: sa.ColumnElement[Any]
    completed_at: sa.ColumnElement[Any]
    cancel_requested_at: sa.ColumnElement[Any]


# The run row as this transaction has just written it, read back by primary key.
_WRITTEN = _RunRow(
    _b("b_run", type_=runs_t.c.id.type),
    _BOUNDARY_AT,
    _COMPLETED_AT,
    _of_the_run(runs_t.c.cancel_requested_at),
)


def _start_phase(run: _RunRow) -> sa.Update:
    """The claimed run's first phase to run, started at the claim's instant."""
    return (
        sa.update(phases_t)
        .where(phases_t.c.run_id == run.id, phases_t.c.phase_num == _b("b_phase"))
        .values(
            status="running",
            attempts=phases_t.c.attempts + 1,
            started_at=run.heartbeat_at,
            finished_at=None,
        )
    )


def _cross_boundary(run: _RunRow) -> sa.Update:
    """The common boundary in one statement: phase k completed, phase k+1 running."""
    is_done = phases_t.c.phase_num == _b("b_phase")
    return (
        sa.update(phases_t)
        .where(phases_t.c.run_id == run.id, phases_t.c.phase_num.in_([_b("b_phase"), _b("b_next")]))
        .values(
            status=sa.case((is_done, "completed"), else_="running"),
            finished_at=sa.case((is_done, run.heartbeat_at), else_=None),
            started_at=sa.case((is_done, phases_t.c.started_at), else_=run.heartbeat_at),
            attempts=sa.case((is_done, phases_t.c.attempts), else_=phases_t.c.attempts + 1),
        )
    )


def _complete_last_phase(run: _RunRow) -> sa.Update:
    return (
        sa.update(phases_t)
        .where(phases_t.c.run_id == run.id, phases_t.c.phase_num == _b("b_phase"))
        .values(status="completed", finished_at=run.completed_at)
    )


_MARK_RUNNING_ROW = (
    sa.update(runs_t)
    .where(runs_t.c.id == _b("b_run"))
    .values(
        status=RunStatus.RUNNING.value,
        started_at=sa.func.coalesce(runs_t.c.started_at, db_now()),
        current_phase=_b("b_phase"),
        phase_label=_b("b_label"),
        progress_current=_b("b_done"),
        progress_total=_b("b_total"),
        phase_progress_current=None,
        phase_progress_total=None,
        owner=_b("b_owner"),
        heartbeat_at=db_now(),
    )
)
# A fresh run's claim: running from the instant its first phase row started.
_FIRST_STARTED = (
    sa.select(phases_t.c.started_at)
    .where(phases_t.c.run_id == _b("b_run"), phases_t.c.phase_num == _b("b_phase"))
    .scalar_subquery()
)
_START_FRESH_RUN = Compiled(
    _MARK_RUNNING_ROW.values(started_at=_FIRST_STARTED, heartbeat_at=_FIRST_STARTED).returning(
        runs_t.c.cancel_requested_at
    )
)
_ADVANCE_RUN_ROW = (
    sa.update(runs_t)
    .where(_OWNED)
    .values(
        current_phase=_b("b_next"),
        phase_label=_b("b_label"),
        progress_current=_b("b_phase"),
        phase_progress_current=None,
        phase_progress_total=None,
        heartbeat_at=db_now(),
    )
)
_COMPLETE_RUN_ROW = (
    sa.update(runs_t)
    .where(_OWNED)
    .values(
        status=RunStatus.COMPLETED.value,
        progress_current=_b("b_phase"),
        completed_at=db_now(),
        phase_progress_current=None,
        phase_progress_total=None,
    )
)


class _Boundary:
    """A run-row update and the phase-row update that follows it, in one or two statements.

    On SQLite they are two statements, the second reading the instant back
    from the run row (``_WRITTEN``). On PostgreSQL each statement is a round
    trip that costs both processes CPU, and a run was about 30 of them (bench
    "postgres"); there the two are one statement: the run row's update is a
    data-modifying CTE, and the phase rows read the row it returned. Both
    forms are composed from the same Core definitions. ``guard`` must hold
    for the phase rows to change in the one-statement form, where Python
    cannot look at the run row before they do.
    """

    def __init__(
        self,
        run_row: sa.Update,
        phase_rows: Callable[[_RunRow], sa.Update],
        guard: Callable[[_RunRow], sa.ColumnElement[bool]] | None = None,
    ) -> None:
        self.run_row = Compiled(run_row.returning(runs_t.c.cancel_requested_at))
        self.phase_rows = Compiled(phase_rows(_WRITTEN))
        written = run_row.returning(*(runs_t.c[name] for name in _RunRow._fields)).cte("run_row")
        fields = _RunRow(*(written.c[name] for name in _RunRow._fields))
        fused_rows = phase_rows(fields)
        if guard is not None:
            fused_rows = fused_rows.where(guard(fields))
        changed = fused_rows.returning(phases_t.c.phase_num).cte("phase_rows")
        self.fused = Compiled(
            sa.select(
                written.c.cancel_requested_at,
                sa.select(sa.func.count()).select_from(changed).scalar_subquery().label("changed"),
            ).select_from(written)
        )

    def execute(self, conn: Connection, params: Mapping[str, Any]) -> tuple[Any | None, bool]:
        """The run row (None if none matched), and whether the phase rows were written too.

        When they were not (SQLite, or a ``guard`` that did not hold), the
        caller decides from the run row what the phase rows become.
        """
        if conn.dialect.name == "postgresql":
            row = self.fused.execute(conn, params).first()
            return row, row is not None and row.changed > 0
        row = self.run_row.execute(conn, params).first()
        return row, False


# What a phase row takes: the claim's first phase, the common boundary (unless
# cancelled there: by the row, or in this process), the last phase.
_is_cancel = _b("b_cancel", type_=sa.Boolean)
_CLAIM = _Boundary(_MARK_RUNNING_ROW, _start_phase)
_CROSS = _Boundary(
    _ADVANCE_RUN_ROW,
    _cross_boundary,
    guard=lambda run: sa.and_(run.cancel_requested_at.is_(None), sa.not_(_is_cancel)),
)
_FINISH = _Boundary(_COMPLETE_RUN_ROW, _complete_last_phase)
_TOUCH_RUN = Compiled(sa.update(runs_t).where(_OWNED).values(heartbeat_at=db_now()))
_COUNT_ATTEMPT = Compiled(
    sa.update(phases_t).where(_THIS_PHASE).values(attempts=phases_t.c.attempts + 1)
)
_END_RUN = Compiled(
    sa.update(runs_t)
    .where(_OWNED)
    .values(
        status=_b("b_status"),
        error_message=_b("b_error"),
        completed_at=db_now(),
        # A cancel honoured in this process may not have reached the row yet.
        cancel_requested_at=sa.case(
            (_is_cancel, sa.func.coalesce(runs_t.c.cancel_requested_at, db_now())),
            else_=runs_t.c.cancel_requested_at,
        ),
        phase_progress_current=None,
        phase_progress_total=None,
    )
    .returning(runs_t.c.completed_at)
)
_END_PHASE = Compiled(
    sa.update(phases_t).where(_THIS_PHASE).values(status=_b("b_status"), finished_at=_b("b_now"))
)
_CANCEL_AT_BOUNDARY = Compiled(
    sa.update(runs_t)
    .where(runs_t.c.id == _b("b_run"))
    .values(
        status=RunStatus.CANCELLED.value,
        completed_at=runs_t.c.heartbeat_at,  # the boundary's instant, written just before
        cancel_requested_at=sa.func.coalesce(runs_t.c.cancel_requested_at, runs_t.c.heartbeat_at),
    )
)
# What a runner reads after its connection was lost mid-phase: did the phase
# commit? The row lock waits for the old transaction, should it still be alive.
_PHASE_TRUTH = (
    sa.select(phases_t.c.status.label("phase_status"), runs_t.c.status, runs_t.c.owner)
    .select_from(phases_t.join(runs_t, runs_t.c.id == phases_t.c.run_id))
    .where(_THIS_PHASE)
    .with_for_update(of=runs_t, key_share=True)
)


def retry_phase(conn: Connection, *, run_id: int, owner: str, phase_num: int) -> bool:
    """Count one more attempt of the phase in flight; False if the run is not ours any more."""
    params = {"b_run": run_id, "b_owner": owner, "b_phase": phase_num}
    if _TOUCH_RUN.execute(conn, params).rowcount == 0:
        return False
    _COUNT_ATTEMPT.execute(conn, params)
    return True


class RunLost(Exception):
    """The run is no longer ours (swept as interrupted, or otherwise taken)."""


def finish_phase(
    conn: Connection,
    *,
    run_id: int,
    owner: str,
    phase_num: int,
    next_phase: tuple[int, str] | None,
    warnings: Sequence[str],
    cancel: bool = False,
    result: str | None = None,
    published: Sequence[artifacts.Staged] = (),
) -> RunStatus:
    """Record phase ``phase_num`` complete and cross the boundary to the next one.

    Runs inside the phase's own transaction, so the phase's writes, its
    result and artifacts (``pipeline.artifacts``) and this record commit
    together. Returns the run's status after the boundary:
    running, completed, or cancelled (a cancel request waiting at this
    boundary: recorded in the row, or ``cancel`` known in this process).
    """
    params: dict[str, Any] = {"b_run": run_id, "b_owner": owner, "b_phase": phase_num}
    if next_phase is None:
        row, phases_written = _FINISH.execute(conn, params)
    else:
        params.update(b_next=next_phase[0], b_label=next_phase[1], b_cancel=cancel)
        row, phases_written = _CROSS.execute(conn, params)
    if row is None:
        raise RunLost(f"run {run_id} is no longer owned by this runner")
    if warnings:
        add_warnings(conn, run_id=run_id, phase=phase_num, messages=warnings)
    if published or result is not None:
        now = None
        if published:  # artifacts carry the boundary's instant
            instant = _READ_COMPLETED_AT if next_phase is None else _READ_BOUNDARY_AT
            now = instant.execute(conn, {"b_run": run_id}).one()[0]
        artifacts.save(
            conn, run_id=run_id, phase_num=phase_num, result=result, artifacts=published, now=now
        )
    if next_phase is None:
        if not phases_written:
            _FINISH.phase_rows.execute(conn, params)
        return RunStatus.COMPLETED
    if cancel or row.cancel_requested_at is not None:
        _COMPLETE_PHASE.execute(conn, params)
        _CANCEL_AT_BOUNDARY.execute(conn, params)
        return RunStatus.CANCELLED
    if not phases_written:
        _CROSS.phase_rows.execute(conn, params)
    return RunStatus.RUNNING


def end_run(
    conn: Connection,
    *,
    run_id: int,
    owner: str,
    phase_num: int,
    status: RunStatus,
    error_message: str | None,
    warnings: Sequence[str],
) -> bool:
    """Mark the run failed or cancelled, after the phase in flight rolled back.

    Keeps the warnings that phase recorded. False if the run was not ours any more.
    """
    params: dict[str, Any] = {
        "b_run": run_id,
        "b_owner": owner,
        "b_phase": phase_num,
        "b_status": status.value,
        "b_error": error_message,
        "b_cancel": status is RunStatus.CANCELLED,
    }
    row = _END_RUN.execute(conn, params).first()
    if row is None:
        return False
    params["b_now"] = row.completed_at
    add_warnings(conn, run_id=run_id, phase=phase_num, messages=warnings)
    _END_PHASE.execute(conn, params)
    return True


def phase_committed(
    conn: Connection, *, run_id: int, owner: str, phase_num: int
) -> RunStatus | None:
    """After a lost connection: the run's status if phase ``phase_num`` committed, else None.

    Raises :class:`RunLost` when the phase did not commit and the run is no
    longer this runner's to continue.
    """
    row = conn.execute(_PHASE_TRUTH, {"b_run": run_id, "b_phase": phase_num}).first()
    ours = row is not None and row.owner == owner
    if row is None or (row.status == RunStatus.RUNNING.value and not ours):
        raise RunLost(f"run {run_id} is no longer owned by this runner")
    if row.phase_status == "completed":
        return RunStatus(row.status)  # committed: running (on to the next phase) or ended
    if row.status != RunStatus.RUNNING.value:
        raise RunLost(f"run {run_id} was ended by someone else")
    return None


_ADD_WARNING = sa.insert(warnings_t).values(created_at=db_now())


def add_warnings(
    conn: Connection, *, run_id: int, phase: int | None, messages: Sequence[str]
) -> None:
    if messages:
        conn.execute(
            _ADD_WARNING,
            [{"run_id": run_id, "phase": phase, "message": m} for m in messages],
        )
