"""Schedules in one process, with an injected clock: cron, DST, catch-up, overlap, bad input.

The firing code takes its clock as a parameter (``Service(clock=...)``); these
tests walk it through days of ticks in a moment and call the housekeeping's
``fire_schedules`` themselves. The multi-process "exactly once" tests are in
``test_schedule_firers.py``.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pydantic
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.engine import Connection, Engine

from pipeline import Pipeline, db, retention, schedules
from pipeline.api import create_app
from pipeline.config import Settings
from pipeline.orchestrator import RunContext
from pipeline.schema import schedule_ticks
from pipeline.schema import schedules as schedules_table
from pipeline.service import Service

from .conftest import is_sqlite_url, scalar, wait_for

UTC = dt.UTC


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


class Clock:
    """The clock the firer reads; the test moves it."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def _quick(conn: Connection, ctx: RunContext) -> None:
    return None


class Size(pydantic.BaseModel):
    size: int = pydantic.Field(default=3, ge=1, le=10)


QUICK = Pipeline("quick", [(1, "Only", _quick)], params=Size)

# Runs of HELD last until the test releases them (longer than any tick interval).
RELEASE = threading.Event()


def _held(conn: Connection, ctx: RunContext) -> None:
    deadline = 30.0
    while not RELEASE.wait(0.02):
        ctx.raise_if_cancelled()
        deadline -= 0.02
        if deadline <= 0:
            raise TimeoutError("never released")


HELD = Pipeline("held", [(1, "Held", _held)])


@pytest.fixture
def clock() -> Clock:
    return Clock(at("2030-01-01T00:00:30"))


@contextmanager
def service(
    db_url: str, clock: Clock, *, execute: bool = False, registry: Any = None, **options: Any
) -> Iterator[Service]:
    """A service whose housekeeping the test drives (``fire_schedules``) with its clock."""
    settings = Settings(database_url=db_url, poll_seconds=3600, max_concurrent_runs=4, **options)
    svc = Service(settings, registry or [QUICK, HELD], execute=execute, clock=clock)
    svc.start()
    try:
        yield svc
    finally:
        RELEASE.set()
        svc.stop(wait=True)
        RELEASE.clear()


def fired_ticks(engine: Engine, schedule_id: int) -> list[tuple[dt.datetime, str, int | None]]:
    """The schedule's ticks, oldest first: (fire_at, outcome, run_id)."""
    query = (
        sa.select(schedule_ticks.c.fire_at, schedule_ticks.c.outcome, schedule_ticks.c.run_id)
        .where(schedule_ticks.c.schedule_id == schedule_id)
        .order_by(schedule_ticks.c.fire_at)
    )
    with db.read(engine) as conn:
        return [(row[0], row[1], row[2]) for row in conn.execute(query)]


def has_status(engine: Engine, schedule_id: int, run_id: int, status: str) -> bool:
    return dict(runs_of(engine, schedule_id))[run_id] == status


def runs_of(engine: Engine, schedule_id: int) -> list[tuple[int, str]]:
    with db.read(engine) as conn:
        rows = conn.execute(
            sa.text("SELECT id, status FROM analysis_runs WHERE schedule_id = :s ORDER BY id"),
            {"s": schedule_id},
        )
        return [(row[0], row[1]) for row in rows]


def walk(
    svc: Service, clock: Clock, start: dt.datetime, end: dt.datetime, step: dt.timedelta
) -> None:
    """Move the clock from ``start`` to ``end`` by ``step``, firing at every step."""
    clock.now = start
    while clock.now <= end:
        svc.fire_schedules()
        clock.now += step


# -- cron and time zones ---------------------------------------------------------------


def test_cron_aliases_and_words():
    assert schedules.next_fire("@daily", "UTC", at("2030-01-01T10:00:00")) == at(
        "2030-01-02T00:00:00"
    )
    assert schedules.next_fire("@hourly", "UTC", at("2030-01-01T10:00:00")) == at(
        "2030-01-01T11:00:00"
    )
    assert schedules.next_fire("*/5 9-17 * * MON-FRI", "UTC", at("2030-01-05T12:00:00")) == at(
        "2030-01-07T09:00:00"
    )  # 2030-01-05 is a Saturday
    assert schedules.describe("* * * * *") == "Every minute"
    assert "Monday through Friday" in (schedules.describe("*/5 9-17 * * MON-FRI") or "")
    assert schedules.describe("@daily") == "At 00:00 every day"


def test_next_fire_in_the_schedules_zone():
    # 06:00 in Berlin is 05:00 UTC in winter, 04:00 in summer.
    assert schedules.next_fire("0 6 * * *", "Europe/Berlin", at("2030-01-10T12:00:00")) == at(
        "2030-01-11T05:00:00"
    )
    assert schedules.next_fire("0 6 * * *", "Europe/Berlin", at("2030-07-10T12:00:00")) == at(
        "2030-07-11T04:00:00"
    )


def test_daily_0230_in_berlin_fires_once_each_day_over_both_dst_changes(db_url, clock):
    """Spring forward: 02:30 does not exist, it fires at 03:00 CEST (the next valid
    instant); fall back: 02:30 happens twice, it fires once, at the first (CEST)."""
    berlin = {
        "pipeline": "quick",
        "cron": "30 2 * * *",
        "timezone": "Europe/Berlin",
        "overlap": "allow",
    }
    with service(db_url, clock) as svc:
        clock.now = at("2026-03-28T00:00:00")
        spring = svc.create_schedule({"name": "spring", **berlin})
        walk(svc, clock, clock.now, at("2026-03-31T00:00:00"), dt.timedelta(minutes=10))
        assert [t for t, _, _ in fired_ticks(svc.engine, spring.id)] == [
            at("2026-03-28T01:30:00"),  # 02:30 CET
            at("2026-03-29T01:00:00"),  # 02:30 does not exist: 03:00 CEST
            at("2026-03-30T00:30:00"),  # 02:30 CEST
        ]
        clock.now = at("2026-10-24T00:00:00")
        fall = svc.create_schedule({"name": "fall", **berlin})
        walk(svc, clock, clock.now, at("2026-10-27T00:00:00"), dt.timedelta(minutes=10))
        assert [t for t, _, _ in fired_ticks(svc.engine, fall.id)] == [
            at("2026-10-24T00:30:00"),  # 02:30 CEST
            at("2026-10-25T00:30:00"),  # 02:30 happens twice: once, the first (CEST)
            at("2026-10-26T01:30:00"),  # 02:30 CET
        ]
        assert len(runs_of(svc.engine, fall.id)) == 3


@pytest.mark.parametrize(
    "cron", ["30 2 * * *", "0,30 2 * * *", "30 2 * * SUN", "*/30 * * * *", "15 1-3 * * *"]
)
@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/Havana", "Australia/Lord_Howe"])
def test_the_next_fire_time_is_always_later_than_now_across_dst(cron, zone):
    """Every 5 minutes over both 2026 changes: never a tick at or before "now"."""
    for start in (at("2026-03-28T12:00:00"), at("2026-10-24T12:00:00")):
        for step in range(0, 48 * 12):
            now = start + dt.timedelta(minutes=5 * step)
            assert schedules.next_fire(cron, zone, now) > now, (cron, zone, now)


def test_a_schedule_made_or_resumed_inside_the_repeated_hour_fires_nothing_early(db_url, clock):
    """02:30 fired at its first occurrence (00:30Z); at 02:10 CET (01:10Z) it is over."""
    berlin = {"pipeline": "quick", "timezone": "Europe/Berlin", "overlap": "allow"}
    with service(db_url, clock) as svc:
        clock.now = at("2026-10-25T00:00:00")
        weekly = svc.create_schedule({"name": "weekly", "cron": "30 2 * * SUN", **berlin})
        clock.now = at("2026-10-25T00:31:00")
        (fired,) = svc.fire_schedules()
        assert fired.fire_at == at("2026-10-25T00:30:00")
        clock.now = at("2026-10-25T01:10:00")  # 02:10 CET: the second 02:xx
        made = svc.create_schedule({"name": "daily", "cron": "30 2 * * *", **berlin})
        assert made.next_fire_at == at("2026-10-26T01:30:00")
        svc.update_schedule(weekly.id, {"enabled": False})
        resumed = svc.update_schedule(weekly.id, {"enabled": True})
        assert resumed is not None
        assert resumed.next_fire_at == at("2026-11-01T01:30:00")
        # Old ticks forgotten (a week of history) cannot make the same tick fire again.
        clock.now = at("2026-11-01T01:00:00")
        assert svc.firer.prune() == 1
        walk(svc, clock, clock.now, at("2026-11-02T00:00:00"), dt.timedelta(minutes=10))
        assert len(runs_of(svc.engine, weekly.id)) == 2
        assert [t for t, _, _ in fired_ticks(svc.engine, weekly.id)] == [at("2026-11-01T01:30:00")]


def test_a_tick_fired_already_is_never_fired_again(db_url, clock, caplog):
    """If next_fire_at points back at a fired tick (a clock stepped back), it moves on."""
    with service(db_url, clock) as svc:
        made = svc.create_schedule(
            {"name": "again", "pipeline": "quick", "cron": "* * * * *", "overlap": "allow"}
        )
        clock.now = minute(1)
        svc.fire_schedules()
        with db.write(svc.engine) as conn:
            conn.execute(
                sa.update(schedules_table)
                .where(schedules_table.c.id == made.id)
                .values(next_fire_at=at("2030-01-01T00:01:00"))
            )
        with caplog.at_level(logging.WARNING, logger="pipeline.schedules"):
            assert svc.fire_schedules()[0].run_id is None
        assert any("fired already" in r.getMessage() for r in caplog.records)
        assert len(runs_of(svc.engine, made.id)) == 1
        assert svc.get_schedule(made.id).next_fire_at == at("2030-01-01T00:02:00")  # type: ignore[union-attr]


# -- catch-up --------------------------------------------------------------------------


@pytest.mark.parametrize("catch_up", ["latest", "none"])
def test_catch_up_after_five_missed_ticks(db_url, clock, catch_up):
    with service(db_url, clock) as svc:
        clock.now = at("2030-01-01T00:00:30")
        made = svc.create_schedule(
            {
                "name": "minutely",
                "pipeline": "quick",
                "cron": "* * * * *",
                "catch_up": catch_up,
                "overlap": "allow",
            }
        )
        clock.now = at("2030-01-01T00:01:01")
        svc.fire_schedules()
        assert [t for t, _, _ in fired_ticks(svc.engine, made.id)] == [at("2030-01-01T00:01:00")]
        # Everything stopped through the ticks of 00:02 .. 00:06; started at 00:06:40.
        clock.now = at("2030-01-01T00:06:40")
        svc.fire_schedules()
        svc.fire_schedules()  # a second pass fires nothing more
        after_gap = [t for t, _, _ in fired_ticks(svc.engine, made.id)]
        if catch_up == "latest":
            assert after_gap == [at("2030-01-01T00:01:00"), at("2030-01-01T00:06:00")]
            missed = 4
        else:
            assert after_gap == [at("2030-01-01T00:01:00")]
            missed = 5
        # Both continue on time.
        clock.now = at("2030-01-01T00:07:01")
        svc.fire_schedules()
        clock.now = at("2030-01-01T00:08:00")
        svc.fire_schedules()
        ticks = [t for t, _, _ in fired_ticks(svc.engine, made.id)]
        assert ticks == [*after_gap, at("2030-01-01T00:07:00"), at("2030-01-01T00:08:00")]
        assert len(runs_of(svc.engine, made.id)) == len(ticks)
        assert metric(svc, "pipeline_schedule_ticks_missed_total") == missed
        assert metric(svc, "pipeline_schedule_ticks_fired_total") == len(ticks)


def metric(svc: Service, name: str) -> float:
    value = svc.metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


# -- overlap ----------------------------------------------------------------------------


def active_runs(engine: Engine, schedule_id: int) -> int:
    return sum(status in ("queued", "running") for _, status in runs_of(engine, schedule_id))


def minute(n: int) -> dt.datetime:
    return at("2030-01-01T00:00:00") + dt.timedelta(minutes=n, seconds=1)


def overlap_schedule(svc: Service, clock: Clock, overlap: str) -> int:
    clock.now = at("2030-01-01T00:00:30")
    return svc.create_schedule(
        {"name": f"held-{overlap}", "pipeline": "held", "cron": "* * * * *", "overlap": overlap}
    ).id


def tick(svc: Service, clock: Clock, n: int, most_active: list[int], schedule_id: int) -> None:
    clock.now = minute(n)
    svc.fire_schedules()
    most_active.append(active_runs(svc.engine, schedule_id))


def release_all(svc: Service, schedule_id: int) -> None:
    """Let the held runs end, and wait until none is active."""
    RELEASE.set()
    wait_for(lambda: all(s == "completed" for _, s in runs_of(svc.engine, schedule_id)), timeout=30)
    RELEASE.clear()


def test_overlap_skip_never_has_two_runs_at_once(db_url, clock):
    with service(db_url, clock, execute=True) as svc:
        sid = overlap_schedule(svc, clock, "skip")
        seen: list[int] = []
        for n in (1, 2, 3):  # each run lasts longer than a minute of ticks
            tick(svc, clock, n, seen, sid)
        release_all(svc, sid)
        tick(svc, clock, 4, seen, sid)
        assert max(seen) == 1
        outcomes = [(t, o) for t, o, _ in fired_ticks(svc.engine, sid)]
        assert outcomes == [
            (at("2030-01-01T00:01:00"), "fired"),
            (at("2030-01-01T00:02:00"), "skipped"),
            (at("2030-01-01T00:03:00"), "skipped"),
            (at("2030-01-01T00:04:00"), "fired"),
        ]
        assert len(runs_of(svc.engine, sid)) == 2
        assert metric(svc, "pipeline_schedule_ticks_skipped_total") == 2


def test_overlap_queue_runs_every_tick_one_at_a_time_in_order(db_url, clock):
    with service(db_url, clock, execute=True) as svc:
        sid = overlap_schedule(svc, clock, "queue")
        seen: list[int] = []
        for n in (1, 2, 3):
            tick(svc, clock, n, seen, sid)
        assert [o for _, o, _ in fired_ticks(svc.engine, sid)] == ["fired", "waiting", "waiting"]
        # Each time the run ends, the oldest waiting tick gets its run (at the next pass).
        for expected_runs in (2, 3):
            first = runs_of(svc.engine, sid)[-1][0]
            RELEASE.set()
            wait_for(functools.partial(has_status, svc.engine, sid, first, "completed"))
            RELEASE.clear()
            svc.fire_schedules()
            seen.append(active_runs(svc.engine, sid))
            assert len(runs_of(svc.engine, sid)) == expected_runs
        release_all(svc, sid)
        assert max(seen) == 1
        ticks = fired_ticks(svc.engine, sid)
        assert [o for _, o, _ in ticks] == ["fired"] * 3
        # Runs were made in tick order: each tick's run id is larger than the one before.
        run_ids = [r for _, _, r in ticks if r is not None]
        assert run_ids == sorted(run_ids)
        assert len(set(run_ids)) == 3


def test_overlap_allow_starts_a_run_at_every_tick_alongside(db_url, clock):
    with service(db_url, clock, execute=True) as svc:
        sid = overlap_schedule(svc, clock, "allow")
        seen: list[int] = []
        for n in (1, 2, 3):
            tick(svc, clock, n, seen, sid)
        assert seen == [1, 2, 3]
        wait_for(lambda: sum(s == "running" for _, s in runs_of(svc.engine, sid)) == 3)
        release_all(svc, sid)
        assert [o for _, o, _ in fired_ticks(svc.engine, sid)] == ["fired"] * 3


def test_pausing_a_queue_schedule_drops_its_waiting_ticks(db_url, clock):
    with service(db_url, clock, execute=True) as svc:
        sid = overlap_schedule(svc, clock, "queue")
        seen: list[int] = []
        for n in (1, 2, 3):
            tick(svc, clock, n, seen, sid)
        assert [o for _, o, _ in fired_ticks(svc.engine, sid)] == ["fired", "waiting", "waiting"]
        svc.update_schedule(sid, {"enabled": False})
        svc.update_schedule(sid, {"enabled": True})
        release_all(svc, sid)
        svc.fire_schedules()
        assert [o for _, o, _ in fired_ticks(svc.engine, sid)] == ["fired", "skipped", "skipped"]
        assert len(runs_of(svc.engine, sid)) == 1


def test_a_change_racing_a_pause_reads_the_paused_row(db_url, clock):
    """A PATCH of the cron while a pause commits must not bring next_fire_at back."""
    if is_sqlite_url(db_url):
        pytest.skip("SQLite serialises writers whole; the race is PostgreSQL's")
    with service(db_url, clock) as svc:
        made = svc.create_schedule({"name": "raced", "pipeline": "quick", "cron": "* * * * *"})
        other = db.create_engine(db_url)
        try:
            with other.connect() as conn:
                pausing = conn.begin()
                conn.execute(
                    sa.text(
                        "UPDATE schedules SET enabled = false, next_fire_at = NULL WHERE id = :i"
                    ),
                    {"i": made.id},
                )
                changed: list[Any] = []
                change = threading.Thread(
                    target=lambda: changed.append(
                        svc.update_schedule(made.id, {"cron": "*/5 * * * *"})
                    )
                )
                change.start()
                wait_for(lambda: waiting_on_a_lock(other))
                pausing.commit()
                change.join(10)
        finally:
            other.dispose()
        (result,) = changed
        assert result.enabled is False
        assert result.next_fire_at is None
        clock.now = minute(10)
        assert svc.fire_schedules() == []


def waiting_on_a_lock(engine: Engine) -> bool:
    with engine.connect() as conn:
        waiting = conn.execute(
            sa.text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
        ).scalar_one()
    return bool(waiting)


# -- enable, disable, delete ----------------------------------------------------------------


def test_a_disabled_schedule_fires_nothing_and_resumes_from_now(db_url, clock):
    with service(db_url, clock) as svc:
        made = svc.create_schedule({"name": "paused", "pipeline": "quick", "cron": "* * * * *"})
        paused = svc.update_schedule(made.id, {"enabled": False})
        assert paused is not None
        assert paused.next_fire_at is None
        walk(svc, clock, minute(1), minute(10), dt.timedelta(minutes=1))
        assert fired_ticks(svc.engine, made.id) == []
        clock.now = at("2030-01-01T00:10:30")
        resumed = svc.update_schedule(made.id, {"enabled": True})
        assert resumed is not None
        assert resumed.next_fire_at == at("2030-01-01T00:11:00")
        clock.now = minute(11)
        svc.fire_schedules()
        # The paused minutes are not "missed": nothing fired for them.
        assert [t for t, _, _ in fired_ticks(svc.engine, made.id)] == [at("2030-01-01T00:11:00")]
        assert metric(svc, "pipeline_schedule_ticks_missed_total") == 0


def test_deleting_a_schedule_keeps_its_runs(db_url, clock):
    with service(db_url, clock) as svc:
        made = svc.create_schedule({"name": "gone", "pipeline": "quick", "cron": "* * * * *"})
        clock.now = minute(1)
        svc.fire_schedules()
        ((run_id, _),) = runs_of(svc.engine, made.id)
        assert svc.delete_schedule(made.id)
        assert svc.get_schedule(made.id) is None
        run = svc.get_run(run_id)
        assert run is not None
        assert run.schedule_id == made.id
        assert scalar(svc.engine, "SELECT count(*) FROM schedule_ticks") == 0
        # A new schedule never takes the old one's id.
        again = svc.create_schedule({"name": "gone", "pipeline": "quick", "cron": "* * * * *"})
        assert again.id != made.id


def test_retention_deletes_a_scheduled_run_and_the_schedule_stays(db_url, clock):
    with service(db_url, clock) as svc:
        made = svc.create_schedule({"name": "kept", "pipeline": "quick", "cron": "* * * * *"})
        clock.now = minute(1)
        (fired,) = svc.fire_schedules()
        with db.write(svc.engine) as conn:  # as if it completed long ago
            conn.execute(
                sa.text(
                    "UPDATE analysis_runs SET status = 'completed', completed_at = :at "
                    "WHERE id = :i"
                ),
                {"at": at("2020-01-01T00:00:00"), "i": fired.run_id},
            )
        assert retention.prune(svc.engine, older_than=dt.timedelta(days=1)) == 1
        kept = svc.get_schedule(made.id)
        assert kept is not None
        assert kept.last_run_id is None
        assert kept.last_fired_at == at("2030-01-01T00:01:00")
        assert fired_ticks(svc.engine, made.id) == [(at("2030-01-01T00:01:00"), "fired", None)]


def test_changing_the_cron_counts_from_now(db_url, clock):
    with service(db_url, clock) as svc:
        made = svc.create_schedule({"name": "change", "pipeline": "quick", "cron": "0 * * * *"})
        assert made.next_fire_at == at("2030-01-01T01:00:00")
        changed = svc.update_schedule(made.id, {"cron": "*/15 * * * *", "timezone": "Asia/Kolkata"})
        assert changed is not None
        assert changed.next_fire_at == at("2030-01-01T00:15:00")
        same = svc.update_schedule(made.id, {"overlap": "allow"})
        assert same is not None
        assert same.next_fire_at == changed.next_fire_at


def test_a_schedule_of_a_pipeline_no_longer_loaded_is_reported_and_skipped(db_url, clock, caplog):
    with service(db_url, clock) as svc:
        orphan = svc.create_schedule({"name": "orphan", "pipeline": "held", "cron": "* * * * *"})
        kept = svc.create_schedule({"name": "kept", "pipeline": "quick", "cron": "* * * * *"})
    # The service restarts without the "held" pipeline.
    with service(db_url, clock, registry=[QUICK]) as svc:
        clock.now = minute(5)
        with caplog.at_level(logging.WARNING, logger="pipeline.schedules"):
            svc.fire_schedules()
            assert svc.firer.report_orphans() == ["orphan"]
            assert svc.firer.report_orphans() == ["orphan"]
        assert fired_ticks(svc.engine, orphan.id) == []
        assert len(fired_ticks(svc.engine, kept.id)) == 1
        warnings = [r.getMessage() for r in caplog.records if "orphan" in r.getMessage()]
        assert len(warnings) == 1
        assert "'held'" in warnings[0]


def test_params_that_no_longer_fit_the_model_fire_no_run_and_do_not_stop_the_loop(db_url, clock):
    with service(db_url, clock) as svc:
        bad = svc.create_schedule({"name": "bad", "pipeline": "quick", "cron": "* * * * *"})
        good = svc.create_schedule({"name": "good", "pipeline": "quick", "cron": "* * * * *"})
        with db.write(svc.engine) as conn:  # as if the pipeline's model changed since
            conn.execute(
                sa.text("UPDATE schedules SET params = :p WHERE id = :i"),
                {"p": '{"size": 99}', "i": bad.id},
            )
        clock.now = minute(1)
        svc.fire_schedules()
        assert [o for _, o, _ in fired_ticks(svc.engine, bad.id)] == ["error"]
        assert [o for _, o, _ in fired_ticks(svc.engine, good.id)] == ["fired"]
        assert runs_of(svc.engine, bad.id) == []


def test_a_locked_database_delays_a_tick_and_never_breaks_the_loop(sqlite_url, clock, caplog):
    with service(sqlite_url, clock, busy_timeout_ms=100) as svc:
        made = svc.create_schedule({"name": "locked", "pipeline": "quick", "cron": "* * * * *"})
        holder = db.create_engine(sqlite_url)
        try:
            with holder.begin() as conn:  # another writer holds SQLite's write lock
                conn.execute(sa.text("UPDATE schedules SET cron = cron"))
                clock.now = minute(1)
                with caplog.at_level(logging.WARNING, logger="pipeline.schedules"):
                    assert svc.fire_schedules() == []
                assert any("schedules wait" in r.getMessage() for r in caplog.records)
        finally:
            holder.dispose()
        clock.now = minute(1) + dt.timedelta(seconds=5)
        (fired,) = svc.fire_schedules()
        assert fired.fire_at == at("2030-01-01T00:01:00")
        assert len(runs_of(svc.engine, made.id)) == 1


# -- HTTP ---------------------------------------------------------------------------------


@contextmanager
def serve(db_url: str, clock: Clock) -> Iterator[TestClient]:
    settings = Settings(database_url=db_url, poll_seconds=3600)
    with TestClient(create_app(settings, registry=[QUICK, HELD], clock=clock)) as client:
        yield client


def count_schedules(client: TestClient) -> int:
    engine = client.app.state.service.engine  # type: ignore[attr-defined]
    return int(scalar(engine, "SELECT count(*) FROM schedules"))


GOOD = {"name": "nightly", "pipeline": "quick", "cron": "0 3 * * *"}


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"name": None}, "'name' must be a slug"),
        ({"name": "Has Spaces"}, "'name' must be a slug"),
        ({"name": "x" * 65}, "'name' must be a slug"),
        ({"cron": None}, "'cron' must be a cron expression"),
        ({"cron": "* * * *"}, "needs 5 fields"),
        ({"cron": "* * * * * *"}, "needs 5 fields"),
        ({"cron": "61 * * * *"}, "is not valid"),
        ({"cron": "0 0 30 2 *"}, "is not valid"),
        ({"cron": "@sometimes"}, "needs 5 fields"),
        ({"cron": "* * * * \x00"}, "printable"),
        ({"timezone": "Mars/Olympus"}, "IANA time zone"),
        ({"timezone": "../../etc/passwd"}, "IANA time zone"),
        ({"timezone": "localtime"}, "IANA time zone"),
        ({"timezone": 3}, "IANA time zone"),
        ({"pipeline": "nope"}, "no pipeline named 'nope'; known: held, quick"),
        ({"pipeline": None}, "name the pipeline"),
        ({"params": [1]}, "'params' must be a JSON object"),
        ({"enabled": "yes"}, "'enabled' must be true or false"),
        ({"overlap": "sometimes"}, "'overlap' must be one of skip, queue, allow"),
        ({"catch_up": "all"}, "'catch_up' must be one of latest, none"),
        ({"colour": "red"}, "unknown or unchangeable field(s): colour"),
    ],
)
def test_bad_input_is_a_422_and_writes_nothing(db_url, clock, change, fragment):
    with serve(db_url, clock) as client:
        body = {**GOOD, **change}
        response = client.post("/schedules", json=body)
        assert response.status_code == 422, response.text
        assert fragment in response.json()["detail"]
        assert count_schedules(client) == 0


def test_missing_cron_and_invalid_params_are_422s(db_url, clock):
    with serve(db_url, clock) as client:
        no_cron = client.post("/schedules", json={"name": "x", "pipeline": "quick"})
        assert no_cron.status_code == 422
        assert "'cron' is required" in no_cron.json()["detail"]
        params = client.post("/schedules", json={**GOOD, "params": {"size": 0, "extra": 1}})
        assert params.status_code == 422
        assert params.json()["detail"][0]["loc"] == ["body", "params", "size"]
        for raw in (b"not json", b"[1, 2]", b""):
            response = client.post(
                "/schedules", content=raw, headers={"content-type": "application/json"}
            )
            assert response.status_code == 422, raw
        assert count_schedules(client) == 0


def test_create_get_list_patch_delete_over_http(db_url, clock):
    with serve(db_url, clock) as client:
        created = client.post("/schedules", json={**GOOD, "params": {"size": 5}})
        assert created.status_code == 201
        body = created.json()
        assert created.headers["location"] == f"/schedules/{body['id']}"
        assert body == {
            "id": body["id"],
            "name": "nightly",
            "pipeline": "quick",
            "params": {"size": 5},
            "cron": "0 3 * * *",
            "timezone": "UTC",
            "enabled": True,
            "overlap": "skip",
            "catch_up": "latest",
            "next_fire_at": "2030-01-01T03:00:00Z",
            "last_fired_at": None,
            "created_at": body["created_at"],
            "cron_text": "At 03:00 every day",
            "last_run": None,
        }
        assert client.post("/schedules", json=GOOD).status_code == 409
        assert client.get("/schedules").json()["items"] == [body]
        assert client.get(f"/schedules/{body['id']}").json() == body
        patched = client.patch(
            f"/schedules/{body['id']}", json={"enabled": False, "overlap": "queue"}
        )
        assert patched.status_code == 200
        assert patched.json()["enabled"] is False
        assert patched.json()["next_fire_at"] is None
        for bad in (
            {"name": "renamed"},
            {"pipeline": "held"},
            {"cron": "nope"},
            {"params": {"size": 11}},
        ):
            assert client.patch(f"/schedules/{body['id']}", json=bad).status_code == 422, bad
        assert client.get(f"/schedules/{body['id']}").json()["overlap"] == "queue"
        assert client.patch("/schedules/999", json={"enabled": True}).status_code == 404
        assert client.get("/schedules/999").status_code == 404
        assert client.delete(f"/schedules/{body['id']}").status_code == 204
        assert client.delete(f"/schedules/{body['id']}").status_code == 404
        assert client.get("/schedules").json() == {"items": []}


def test_a_fired_run_names_its_schedule_and_the_schedule_its_last_run(db_url, clock):
    with serve(db_url, clock) as client:
        sid = client.post("/schedules", json={**GOOD, "cron": "* * * * *"}).json()["id"]
        service: Service = client.app.state.service  # type: ignore[attr-defined]
        clock.now = minute(1)
        (fired,) = service.fire_schedules()
        run = client.get(f"/runs/{fired.run_id}").json()
        assert run["schedule_id"] == sid
        assert run["pipeline"] == "quick"
        assert run["params"] == {"size": 3}  # the model's defaults, stored with the schedule
        listed = client.get("/schedules").json()["items"][0]
        assert listed["last_run"]["id"] == fired.run_id
        assert listed["last_fired_at"] == "2030-01-01T00:01:00Z"
        assert listed["next_fire_at"] == "2030-01-01T00:02:00Z"
        manual = client.post("/runs", json={"pipeline": "quick"}).json()
        assert manual["schedule_id"] is None
