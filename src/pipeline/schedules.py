"""Schedules: runs of a pipeline on a cron expression, each tick fired exactly once.

Every server and every worker calls :meth:`Firer.fire_due` from its
housekeeping loop; there is no leader to elect. A tick is fired in one
transaction that locks the schedule's row, inserts the ``(schedule_id,
fire_at)`` row whose primary key makes the tick unique, creates the run and
moves ``next_fire_at`` on: a second firer of the same tick finds the schedule
no longer due (or, racing, breaks the unique constraint and rolls back), so it
creates nothing.

Cron expressions are read by ``cronsim`` (5 fields; ``@daily`` and the other
aliases are spelled out here, as cron's manual defines them), in the
schedule's IANA time zone (``zoneinfo``). Daylight saving time is cronsim's,
which is cron's: a time that a spring-forward skips fires once at the first
instant after the jump; a time that a fall-back repeats fires once, at its
first occurrence. Expressions that fire every hour (``*`` or a step in the
hour field) keep firing on every real hour, both occurrences included, as cron
does.

"Now" is the database's clock unless a clock is given: machines' clocks
disagree, and the database's is the one all firers share. Tests give a clock
(:data:`Clock`) to walk through hours of ticks in seconds.

This module holds all the SQL about schedules and their ticks.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import zoneinfo
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from cronsim import CronSim, CronSimError
from sqlalchemy.engine import Connection, Engine, RowMapping

from pipeline import db, runs
from pipeline.metrics import Metrics
from pipeline.params import InvalidParams, validate_params
from pipeline.pipelines import NAME_PATTERN, Pipeline, UnknownPipeline, choose_pipeline
from pipeline.runs import RunStatus, rfc3339
from pipeline.schema import SCHEDULE_CATCH_UPS, SCHEDULE_OVERLAPS, UTCDateTime, db_now
from pipeline.schema import analysis_runs as runs_t
from pipeline.schema import schedule_ticks as ticks_t
from pipeline.schema import schedules as schedules_t

log = logging.getLogger("pipeline.schedules")

Clock = Callable[[], dt.datetime]

# cron(8)'s aliases, spelled out for cronsim (which reads the 5 fields only).
ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
MAX_CRON_LENGTH = 200
# A tick found later than this is "missed": with catch_up "none" it does not
# fire. Firers look every poll (1 s by default), so an on-time tick is found
# within a couple of seconds, or a few busy timeouts when SQLite is busy.
LATE_LIMIT = dt.timedelta(seconds=30)
# Overlap "queue": at most this many ticks wait for their turn; beyond, a tick is skipped.
MAX_WAITING = 100
# Schedules fired per pass; more due wait for the next pass (a second later).
DUE_BATCH = 100
# Ticks counted one by one after downtime; beyond, the count is a lower bound.
MAX_COUNTED_TICKS = 10_000
# How long fired ticks are kept (what was fired when); waiting ones stay until run.
TICK_HISTORY = dt.timedelta(days=7)

FIELDS = ("name", "pipeline", "params", "cron", "timezone", "enabled", "overlap", "catch_up")
PATCHABLE = ("cron", "timezone", "params", "enabled", "overlap", "catch_up")


class InvalidSchedule(ValueError):
    """A field a schedule cannot have; the message names it and says why."""


class NameTaken(Exception):
    """Another schedule has this name."""


# -- cron and time zones ---------------------------------------------------------------


def _fields(expr: str) -> str:
    return ALIASES.get(expr.strip().lower(), expr.strip())


def check_cron(expr: object) -> str:
    """The expression as given, or :class:`InvalidSchedule` saying what is wrong with it."""
    if not isinstance(expr, str) or not expr.strip():
        raise InvalidSchedule("'cron' must be a cron expression (a string), like '0 6 * * *'")
    if len(expr) > MAX_CRON_LENGTH or not expr.isprintable():
        raise InvalidSchedule(f"'cron' must be printable and at most {MAX_CRON_LENGTH} characters")
    fields = _fields(expr)
    if len(fields.split()) != 5:
        raise InvalidSchedule(
            f"'cron' needs 5 fields (minute hour day-of-month month day-of-week) or one of "
            f"{', '.join(ALIASES)}; got {expr!r}"
        )
    try:
        next(CronSim(fields, dt.datetime(2000, 1, 1, tzinfo=dt.UTC)))
    except (CronSimError, StopIteration, ValueError) as exc:
        raise InvalidSchedule(f"'cron' {expr!r} is not valid: {exc or 'it never fires'}") from None
    return expr.strip()


# Names that are not a zone but this host's setting: they mean something else
# on each machine, and firers on several machines must agree.
_HOST_ZONES = frozenset({"localtime", "posixrules"})


@functools.cache
def _known_zones() -> frozenset[str]:
    return frozenset((zoneinfo.available_timezones() | {"UTC"}) - _HOST_ZONES)


def check_timezone(name: object) -> str:
    """An IANA zone name (``Europe/Berlin``), or :class:`InvalidSchedule`."""
    if not isinstance(name, str) or name not in _known_zones():
        shown = name if isinstance(name, str) and len(name) <= 64 else type(name).__name__
        raise InvalidSchedule(
            f"'timezone' must be an IANA time zone name like 'Europe/Berlin' or 'UTC'; "
            f"unknown: {shown!r}"
        )
    return name


def describe(expr: str) -> str | None:
    """The expression in words (cronsim's), or None where it cannot say."""
    try:
        text: str = CronSim(_fields(expr), dt.datetime(2000, 1, 1, tzinfo=dt.UTC)).explain()
    except Exception:  # explain() does not cover every expression cronsim runs
        return None
    return text


def _ticks_after(expr: str, timezone: str, after: dt.datetime) -> Iterator[dt.datetime]:
    """The ticks strictly after ``after``, in UTC, in order.

    cronsim works on local wall time: inside a fall-back's repeated hour it
    may give the first occurrence of a time that has passed already (02:30
    CEST, asked from 02:10 CET); such a tick fired before, so it is skipped.
    """
    zone = zoneinfo.ZoneInfo(timezone)
    last = after
    for tick in CronSim(_fields(expr), after.astimezone(zone)):
        at = tick.astimezone(dt.UTC)
        if at > last:
            last = at
            yield at


def next_fire(expr: str, timezone: str, after: dt.datetime) -> dt.datetime:
    """The first tick strictly after ``after``, in UTC."""
    return next(_ticks_after(expr, timezone, after))


def latest_tick(
    expr: str, timezone: str, first: dt.datetime, now: dt.datetime
) -> tuple[dt.datetime, int]:
    """The last tick at or before ``now``, from the due tick ``first``, and how many were due.

    After a very long downtime the count stops at ``MAX_COUNTED_TICKS`` (a lower
    bound) and the latest tick is found walking back from ``now``.
    """
    latest, count = first, 1
    for at in _ticks_after(expr, timezone, first):
        if at > now:
            return latest, count
        latest, count = at, count + 1
        if count >= MAX_COUNTED_TICKS:
            break
    start = (now + dt.timedelta(microseconds=1)).astimezone(zoneinfo.ZoneInfo(timezone))
    for tick in CronSim(_fields(expr), start, reverse=True):
        at = tick.astimezone(dt.UTC)
        if at <= now:
            return max(at, latest), count
    return latest, count  # pragma: no cover - cronsim's reverse walk is endless


# -- validation of what a client sends ----------------------------------------------------


def _choice(payload: Mapping[str, Any], key: str, allowed: Sequence[str]) -> str:
    value = payload[key]
    if value not in allowed:
        raise InvalidSchedule(f"'{key}' must be one of {', '.join(allowed)}; got {value!r}")
    return str(value)


def check_fields(
    payload: Mapping[str, Any],
    pipelines: Mapping[str, Pipeline],
    *,
    current: Schedule | None = None,
) -> dict[str, Any]:
    """The column values for a new schedule (``current`` None) or a change to one.

    Raises :class:`InvalidSchedule` for a field it cannot have, and the params
    model's :class:`pydantic.ValidationError`; nothing is written either way.
    """
    allowed = FIELDS if current is None else PATCHABLE
    unknown = sorted(set(payload) - set(allowed))
    if unknown:
        what = "accepted" if current is None else "changeable"
        raise InvalidSchedule(
            f"unknown or unchangeable field(s): {', '.join(unknown)}; {what}: {', '.join(allowed)}"
        )
    values: dict[str, Any] = {}
    if current is None:
        name = payload.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise InvalidSchedule("'name' must be a slug: [a-z0-9][a-z0-9_-]{0,63}")
        values["name"] = name
        try:
            values["pipeline"] = choose_pipeline(pipelines, payload.get("pipeline")).name
        except UnknownPipeline as exc:
            raise InvalidSchedule(str(exc)) from None
        if "cron" not in payload:
            raise InvalidSchedule("'cron' is required, like '0 6 * * *'")
    pipeline = pipelines.get(values["pipeline"] if current is None else current.pipeline)
    if "cron" in payload:
        values["cron"] = check_cron(payload["cron"])
    if "timezone" in payload or current is None:
        values["timezone"] = check_timezone(payload.get("timezone", "UTC"))
    if "enabled" in payload or current is None:
        enabled = payload.get("enabled", True)
        if not isinstance(enabled, bool):
            raise InvalidSchedule("'enabled' must be true or false")
        values["enabled"] = enabled
    if "overlap" in payload or current is None:
        values["overlap"] = _choice({"overlap": "skip", **payload}, "overlap", SCHEDULE_OVERLAPS)
    if "catch_up" in payload or current is None:
        values["catch_up"] = _choice(
            {"catch_up": "latest", **payload}, "catch_up", SCHEDULE_CATCH_UPS
        )
    if "params" in payload or current is None:
        if pipeline is None:  # a change to a schedule whose pipeline this process lacks
            raise InvalidSchedule(
                f"the schedule's pipeline {current.pipeline if current else ''!r} is not "
                "loaded here, so its params cannot be checked"
            )
        try:
            params = validate_params(payload.get("params"))
        except InvalidParams as exc:
            raise InvalidSchedule(str(exc)) from None
        values["params"], _ = pipeline.check_params(params)
    return values


# -- the Schedule JSON -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Schedule:
    id: int
    name: str
    pipeline: str
    params: Mapping[str, Any]
    cron: str
    timezone: str
    enabled: bool
    overlap: str
    catch_up: str
    next_fire_at: dt.datetime | None
    last_fired_at: dt.datetime | None
    created_at: dt.datetime
    last_run_id: int | None
    last_run_status: str | None

    @classmethod
    def from_row(cls, row: RowMapping) -> Schedule:
        return cls(
            id=row["id"],
            name=row["name"],
            pipeline=row["pipeline"],
            params=row["params"],
            cron=row["cron"],
            timezone=row["timezone"],
            enabled=bool(row["enabled"]),
            overlap=row["overlap"],
            catch_up=row["catch_up"],
            next_fire_at=row["next_fire_at"],
            last_fired_at=row["last_fired_at"],
            created_at=row["created_at"],
            last_run_id=row["last_run_id"],
            last_run_status=row["last_run_status"],
        )

    def to_dict(self) -> dict[str, Any]:
        """DESIGN.md's Schedule JSON, with the cron in words and the last run it started."""
        return {
            "id": self.id,
            "name": self.name,
            "pipeline": self.pipeline,
            "params": dict(self.params),
            "cron": self.cron,
            "timezone": self.timezone,
            "enabled": self.enabled,
            "overlap": self.overlap,
            "catch_up": self.catch_up,
            "next_fire_at": rfc3339(self.next_fire_at),
            "last_fired_at": rfc3339(self.last_fired_at),
            "created_at": rfc3339(self.created_at),
            "cron_text": describe(self.cron),
            "last_run": (
                None
                if self.last_run_id is None
                else {"id": self.last_run_id, "status": self.last_run_status}
            ),
        }


# -- reading and writing schedules -----------------------------------------------------

_SCHEDULE_COLUMNS = [*schedules_t.c, runs_t.c.status.label("last_run_status")]
_WITH_LAST_RUN = schedules_t.outerjoin(runs_t, runs_t.c.id == schedules_t.c.last_run_id)
_SELECT = sa.select(*_SCHEDULE_COLUMNS).select_from(_WITH_LAST_RUN)


def database_now(conn: Connection) -> dt.datetime:
    """The database's clock (the one every firer shares)."""
    now: dt.datetime = conn.execute(sa.select(db_now())).scalar_one()
    return now


def list_schedules(conn: Connection) -> list[Schedule]:
    rows = conn.execute(_SELECT.order_by(schedules_t.c.name)).mappings()
    return [Schedule.from_row(row) for row in rows]


def get_schedule(
    conn: Connection,
    *,
    schedule_id: int | None = None,
    name: str | None = None,
    for_update: bool = False,
) -> Schedule | None:
    """By id or name; ``for_update`` locks its row (a change reads what it changes)."""
    where = schedules_t.c.id == schedule_id if name is None else schedules_t.c.name == name
    query = _SELECT.where(where)
    if for_update:
        query = query.with_for_update(of=schedules_t)
    row = conn.execute(query).mappings().first()
    return None if row is None else Schedule.from_row(row)


def _next_fire(values: Mapping[str, Any], now: dt.datetime) -> dt.datetime | None:
    if not values["enabled"]:
        return None
    return next_fire(values["cron"], values["timezone"], now)


def create_schedule(conn: Connection, values: Mapping[str, Any], *, now: dt.datetime) -> Schedule:
    """Insert a schedule checked by :func:`check_fields`; :class:`NameTaken` if the name is."""
    taken = conn.execute(
        sa.select(schedules_t.c.id).where(schedules_t.c.name == values["name"])
    ).first()
    if taken is not None:
        raise NameTaken(f"a schedule named {values['name']!r} exists already")
    inserted = conn.execute(
        sa.insert(schedules_t)
        .values(**values, next_fire_at=_next_fire(values, now), created_at=db_now())
        .returning(schedules_t.c.id)
    ).scalar_one()
    found = get_schedule(conn, schedule_id=inserted)
    assert found is not None
    return found


def update_schedule(
    conn: Connection, current: Schedule, values: Mapping[str, Any], *, now: dt.datetime
) -> Schedule:
    """Apply a change checked by :func:`check_fields`.

    A new cron, time zone or a resume counts from ``now``: ticks of the paused
    time are not missed ones, and nothing fires for them. Pausing, or leaving
    overlap "queue", drops the ticks that were waiting. ``current`` must have
    been read with ``for_update`` in the same transaction.
    """
    changes = dict(values)
    merged = {"cron": current.cron, "timezone": current.timezone, "enabled": current.enabled}
    merged.update({k: v for k, v in changes.items() if k in merged})
    timing = any(merged[k] != getattr(current, k) for k in merged)
    if timing:
        changes["next_fire_at"] = _next_fire(merged, now)
    if changes:
        conn.execute(sa.update(schedules_t).where(schedules_t.c.id == current.id).values(**changes))
    if not merged["enabled"] or changes.get("overlap", current.overlap) != "queue":
        # Paused, or no longer queueing: the ticks that waited will not run.
        conn.execute(
            sa.update(ticks_t)
            .where(ticks_t.c.schedule_id == current.id, ticks_t.c.outcome == "waiting")
            .values(outcome="skipped")
        )
    found = get_schedule(conn, schedule_id=current.id)
    assert found is not None
    return found


def delete_schedule(conn: Connection, *, schedule_id: int) -> bool:
    """Delete it and its ticks; its runs stay, with ``schedule_id`` set to NULL."""
    deleted = conn.execute(sa.delete(schedules_t).where(schedules_t.c.id == schedule_id))
    return deleted.rowcount > 0


def prune_ticks(conn: Connection, *, before: dt.datetime) -> int:
    """Forget ticks fired before ``before`` (the ones still waiting stay)."""
    pruned = conn.execute(
        sa.delete(ticks_t).where(ticks_t.c.fire_at < before, ticks_t.c.outcome != "waiting")
    )
    return pruned.rowcount


# -- firing ------------------------------------------------------------------------------

_ACTIVE = (RunStatus.QUEUED.value, RunStatus.RUNNING.value)


def _due(now: sa.ColumnElement[dt.datetime]) -> sa.Select[Any]:
    """Due schedules of the pipelines loaded here: a range scan of ix_schedules_next_fire_at."""
    return (
        sa.select(schedules_t.c.id)
        .where(
            schedules_t.c.next_fire_at <= now,
            schedules_t.c.enabled == sa.true(),
            schedules_t.c.pipeline.in_(sa.bindparam("b_names", expanding=True)),
        )
        .order_by(schedules_t.c.next_fire_at)
        .limit(DUE_BATCH)
    )


_DUE_BY_CLOCK = _due(sa.bindparam("b_now", type_=UTCDateTime()))
_DUE_BY_DATABASE = _due(db_now())
# The row, locked, if it is still due: a firer that holds it is firing it.
_LOCK_DUE = (
    sa.select(schedules_t)
    .where(
        schedules_t.c.id == sa.bindparam("b_id"),
        schedules_t.c.next_fire_at <= sa.bindparam("b_now"),
        schedules_t.c.enabled == sa.true(),
    )
    .with_for_update(skip_locked=True)
)
_TICK_RECORDED = sa.select(
    sa.exists().where(
        ticks_t.c.schedule_id == sa.bindparam("b_id"), ticks_t.c.fire_at == sa.bindparam("b_at")
    )
)
_LOCK = (
    sa.select(schedules_t)
    .where(schedules_t.c.id == sa.bindparam("b_id"), schedules_t.c.enabled == sa.true())
    .with_for_update(skip_locked=True)
)
_HAS_ACTIVE_RUN = sa.select(
    sa.exists().where(runs_t.c.schedule_id == sa.bindparam("b_id"), runs_t.c.status.in_(_ACTIVE))
)
_WAITING_COUNT = sa.select(sa.func.count()).where(
    ticks_t.c.outcome == "waiting", ticks_t.c.schedule_id == sa.bindparam("b_id")
)
_OLDEST_WAITING = (
    sa.select(ticks_t.c.fire_at)
    .where(ticks_t.c.outcome == "waiting", ticks_t.c.schedule_id == sa.bindparam("b_id"))
    .order_by(ticks_t.c.fire_at)
    .limit(1)
)
_WAITING_SCHEDULES = (
    sa.select(ticks_t.c.schedule_id)
    .select_from(ticks_t.join(schedules_t, schedules_t.c.id == ticks_t.c.schedule_id))
    .where(
        ticks_t.c.outcome == "waiting",
        schedules_t.c.enabled == sa.true(),
        schedules_t.c.pipeline.in_(sa.bindparam("b_names", expanding=True)),
        # Read before any write: a schedule whose run is still active has nothing to do.
        ~sa.exists().where(
            runs_t.c.schedule_id == ticks_t.c.schedule_id, runs_t.c.status.in_(_ACTIVE)
        ),
    )
    .group_by(ticks_t.c.schedule_id)
    .limit(DUE_BATCH)
)
_ORPHANS = (
    sa.select(schedules_t.c.id, schedules_t.c.name, schedules_t.c.pipeline)
    .where(
        schedules_t.c.next_fire_at <= sa.bindparam("b_late"),
        schedules_t.c.pipeline.not_in(sa.bindparam("b_names", expanding=True)),
    )
    .limit(DUE_BATCH)
)


@dataclass(frozen=True, slots=True)
class Fired:
    """What one tick did: a run created (``run_id``), or the outcome that made none."""

    schedule_id: int
    fire_at: dt.datetime | None
    outcome: str
    run_id: int | None = None
    missed: int = 0


class Firer:
    """What a server's or a worker's housekeeping calls, once per poll.

    Holds only what it has reported already (a schedule whose pipeline this
    process lacks, or that cannot fire, is logged once, not once a second).
    """

    def __init__(
        self,
        engine: Engine,
        pipelines: Mapping[str, Pipeline],
        *,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.pipelines = pipelines
        self.clock = clock
        self.metrics = metrics
        self._reported: set[int] = set()
        self._waiting_for_database = False

    def now(self, conn: Connection) -> dt.datetime:
        """The firer's clock: the one given, else the database's."""
        return database_now(conn) if self.clock is None else self.clock().astimezone(dt.UTC)

    def fire_due(self) -> list[Fired]:
        """Fire every due tick (of the pipelines loaded here) and release waiting ones."""
        names = list(self.pipelines)
        due: Sequence[int]
        done: list[Fired] = []
        try:
            with db.read(self.engine) as conn:
                if self.clock is None:
                    due = conn.execute(_DUE_BY_DATABASE, {"b_names": names}).scalars().all()
                else:
                    now = {"b_now": self.now(conn), "b_names": names}
                    due = conn.execute(_DUE_BY_CLOCK, now).scalars().all()
                waiting = conn.execute(_WAITING_SCHEDULES, {"b_names": names}).scalars().all()
            work = [functools.partial(self._fire, s=s) for s in due]
            work += [functools.partial(self._release, s=s) for s in waiting]
            for act in work:
                fired = self._attempt(act.keywords["s"], act)
                if fired is not None:
                    done.append(fired)
        except db.DatabaseBusy as exc:
            # SQLite's write lock held by a long phase, or the database gone: the
            # ticks stay due and fire at a later pass. Said once per episode.
            if not self._waiting_for_database:
                log.warning("schedules wait for the database: %s", exc)
            self._waiting_for_database = True
            return done
        self._waiting_for_database = False
        return done

    def _attempt(self, schedule_id: int, act: Callable[[Connection], Fired | None]) -> Fired | None:
        try:
            with db.write(self.engine) as conn:
                fired = act(conn)
        except sa.exc.IntegrityError:
            return None  # another firer recorded this tick first: it is fired, once
        except db.DatabaseBusy:
            raise  # the database is busy or gone: the next pass tries again
        except Exception:
            if schedule_id not in self._reported:
                self._reported.add(schedule_id)
                log.exception("schedule %d cannot fire; it is skipped until fixed", schedule_id)
            return None
        if fired is not None:
            self._count(fired)
        return fired

    def _report(self, schedule_id: int, message: str) -> None:
        """A warning about one schedule, once per process."""
        if schedule_id not in self._reported:
            self._reported.add(schedule_id)
            log.warning("schedule %d: %s", schedule_id, message)

    def _count(self, fired: Fired) -> None:
        if self.metrics is None:
            return
        if fired.run_id is not None:
            self.metrics.schedule_ticks_fired.inc()
        if fired.outcome == "skipped":
            self.metrics.schedule_ticks_skipped.inc()
        if fired.missed:
            self.metrics.schedule_ticks_missed.inc(fired.missed)

    def _fire(self, conn: Connection, *, s: int) -> Fired | None:
        schedule_id, now = s, self.now(conn)
        row = conn.execute(_LOCK_DUE, {"b_id": schedule_id, "b_now": now}).mappings().first()
        if row is None:
            return None  # fired by another firer meanwhile, or being fired by one now
        first: dt.datetime = row["next_fire_at"]
        latest, due = latest_tick(row["cron"], row["timezone"], first, now)
        fire_at: dt.datetime | None = latest
        if row["catch_up"] == "none" and now - latest > LATE_LIMIT:
            fire_at = None
        changes: dict[str, Any] = {"next_fire_at": next_fire(row["cron"], row["timezone"], latest)}
        missed = due - (0 if fire_at is None else 1)
        if (
            fire_at is not None
            and conn.execute(_TICK_RECORDED, {"b_id": schedule_id, "b_at": fire_at}).scalar_one()
        ):
            # next_fire_at pointed at a tick fired already (the database's clock
            # stepped back, say): move past it, fire nothing twice.
            self._report(schedule_id, f"tick {rfc3339(fire_at)} was fired already; skipped")
            conn.execute(_update(schedule_id).values(**changes))
            return Fired(schedule_id, None, "missed", missed=missed)
        if missed:
            log.warning(
                "schedule %r missed %d tick(s) up to %s (catch_up %s)",
                row["name"],
                missed,
                rfc3339(latest),
                row["catch_up"],
            )
        if fire_at is None:
            conn.execute(_update(schedule_id).values(**changes))
            return Fired(schedule_id, None, "missed", missed=missed)
        outcome, run_id = self._decide(conn, row, fire_at)
        _record_tick(conn, schedule_id, fire_at, outcome, run_id)
        if run_id is not None:
            changes.update(last_fired_at=fire_at, last_run_id=run_id)
        conn.execute(_update(schedule_id).values(**changes))
        return Fired(schedule_id, fire_at, outcome, run_id, missed)

    def _decide(
        self, conn: Connection, row: RowMapping, fire_at: dt.datetime
    ) -> tuple[str, int | None]:
        """The overlap rule: the tick's outcome and the run it created, if any."""
        schedule_id = row["id"]
        if row["overlap"] != "allow":
            busy = conn.execute(_HAS_ACTIVE_RUN, {"b_id": schedule_id}).scalar_one()
            if row["overlap"] == "skip" and busy:
                log.info(
                    "schedule %r: tick %s skipped, a run is still active",
                    row["name"],
                    rfc3339(fire_at),
                )
                return "skipped", None
            if row["overlap"] == "queue":
                waiting = conn.execute(_WAITING_COUNT, {"b_id": schedule_id}).scalar_one()
                if waiting >= MAX_WAITING:
                    log.warning(
                        "schedule %r: %d ticks wait already; tick %s skipped",
                        row["name"],
                        waiting,
                        rfc3339(fire_at),
                    )
                    return "skipped", None
                if busy or waiting:
                    return "waiting", None
        return self._start(conn, row)

    def _start(self, conn: Connection, row: RowMapping) -> tuple[str, int | None]:
        pipeline = self.pipelines[row["pipeline"]]
        try:
            params, _ = pipeline.check_params(validate_params(row["params"]))
        except Exception as exc:  # the pipeline's model changed since the schedule was made
            log.error(
                "schedule %r: its params no longer fit pipeline %r: %s",
                row["name"],
                pipeline.name,
                exc,
            )
            return "error", None
        run = runs.create_run(conn, params=params, pipeline=pipeline.name, schedule_id=row["id"])
        return "fired", run.id

    def _release(self, conn: Connection, *, s: int) -> Fired | None:
        """Overlap "queue": start the oldest waiting tick once the schedule has no active run."""
        schedule_id = s
        row = conn.execute(_LOCK, {"b_id": schedule_id}).mappings().first()
        if row is None or conn.execute(_HAS_ACTIVE_RUN, {"b_id": schedule_id}).scalar_one():
            return None
        fire_at = conn.execute(_OLDEST_WAITING, {"b_id": schedule_id}).scalar_one_or_none()
        if fire_at is None:
            return None
        outcome, run_id = self._start(conn, row)
        conn.execute(
            sa.update(ticks_t)
            .where(ticks_t.c.schedule_id == schedule_id, ticks_t.c.fire_at == fire_at)
            .values(outcome=outcome, run_id=run_id)
        )
        if run_id is not None:
            conn.execute(_update(schedule_id).values(last_fired_at=fire_at, last_run_id=run_id))
        return Fired(schedule_id, fire_at, outcome, run_id)

    def report_orphans(self) -> list[str]:
        """Log (once each) due schedules of pipelines this process does not load.

        They are left alone: a process that loads their pipeline fires them.
        """
        with db.read(self.engine) as conn:
            late = self.now(conn) - LATE_LIMIT
            rows = conn.execute(_ORPHANS, {"b_late": late, "b_names": list(self.pipelines)}).all()
        names = []
        for schedule_id, name, pipeline in rows:
            names.append(name)
            if schedule_id not in self._reported:
                self._reported.add(schedule_id)
                log.warning(
                    "schedule %r is due but names pipeline %r, which this process does not "
                    "load (PIPELINE_PHASES); it fires where that pipeline is loaded",
                    name,
                    pipeline,
                )
        return names

    def prune(self) -> int:
        with db.write(self.engine) as conn:
            return prune_ticks(conn, before=self.now(conn) - TICK_HISTORY)


def _update(schedule_id: int) -> sa.Update:
    return sa.update(schedules_t).where(schedules_t.c.id == schedule_id)


def _record_tick(
    conn: Connection, schedule_id: int, fire_at: dt.datetime, outcome: str, run_id: int | None
) -> None:
    """The tick's row: its primary key is what makes a tick fire once."""
    conn.execute(
        sa.insert(ticks_t).values(
            schedule_id=schedule_id,
            fire_at=fire_at,
            outcome=outcome,
            run_id=run_id,
            created_at=db_now(),
        )
    )
