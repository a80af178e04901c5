"""The tables, as SQLAlchemy Core ``Table`` objects.

Alembic's revisions create them; ``tests/test_migrations.py`` checks that the
migrated database and these definitions agree, so this file and
``alembic/versions`` must change together.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

metadata = sa.MetaData()

RUN_STATUSES = ("queued", "running", "completed", "failed", "cancelled")
SCHEDULE_OVERLAPS = ("skip", "queue", "allow")
SCHEDULE_CATCH_UPS = ("latest", "none")
TICK_OUTCOMES = ("fired", "skipped", "waiting", "error")
PHASE_STATUSES = ("pending", "running", "completed", "failed", "cancelled")


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """A timestamp that is always an aware UTC datetime in Python.

    SQLite keeps no offset, PostgreSQL keeps one; both come back as UTC.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given for a UTC column")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        stamp: dt.datetime = value
        if stamp.tzinfo is None:
            return stamp.replace(tzinfo=dt.UTC)
        return stamp.astimezone(dt.UTC)


class db_now(FunctionElement[dt.datetime]):
    """The database's clock, UTC, as one statement sees it: every timestamp we write.

    Machines' clocks disagree; the database's is the one all of them share, so
    heartbeats are written and judged on it (``pipeline.liveness``), and the
    other timestamps too, so that their order holds across machines.
    PostgreSQL: ``statement_timestamp()`` (the same in every column of one
    statement, and not the transaction's start, which a long phase would
    make stale). SQLite: the time in the text format our ``UTCDateTime``
    stores (microseconds, of which SQLite gives milliseconds), so that values
    compare equal to what SQLAlchemy binds.
    """

    type = UTCDateTime()
    inherit_cache = True
    name = "db_now"


@compiles(db_now, "postgresql")
def _postgresql_now(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "statement_timestamp()"


@compiles(db_now)
def _sqlite_now(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "strftime('%Y-%m-%d %H:%M:%f000', 'now')"


# Run ids are 64-bit on PostgreSQL (clients may send any id up to 2**63-1);
# SQLite's INTEGER PRIMARY KEY is already 64-bit and must be spelled INTEGER.
RunId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Counter = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
MAX_COUNTER = 2**63 - 1


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


analysis_runs = sa.Table(
    "analysis_runs",
    metadata,
    sa.Column("id", RunId, primary_key=True, autoincrement=True),
    sa.Column("status", sa.String(16), nullable=False),
    # The pipeline the run belongs to; runs made before 0004 are "phases"
    # (what the default pipeline.example:PHASES loads as).
    sa.Column("pipeline", sa.String(64), nullable=False, server_default="phases"),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("current_phase", sa.Integer),
    sa.Column("phase_label", sa.String(200)),
    sa.Column("progress_current", sa.Integer, nullable=False),
    sa.Column("progress_total", sa.Integer),
    # Sub-progress may count bytes: 64-bit (values beyond are clamped by the runner).
    sa.Column("phase_progress_current", Counter),
    sa.Column("phase_progress_total", Counter),
    sa.Column("error_message", sa.Text),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("started_at", UTCDateTime),
    sa.Column("completed_at", UTCDateTime),
    sa.Column("heartbeat_at", UTCDateTime),
    sa.Column("cancel_requested_at", UTCDateTime),
    # "host:pid:process-start:thread" of the process executing (or about to
    # execute) the run; NULL while any executor may claim it.
    sa.Column("owner", sa.String(300)),
    # The schedule that started the run (pipeline.schedules); NULL for runs
    # started otherwise. Not a foreign key: a run outlives its schedule and
    # keeps saying which one started it (schedule ids are never reused).
    sa.Column("schedule_id", RunId),
    sa.CheckConstraint(_in("status", RUN_STATUSES), name="ck_analysis_runs_status"),
    sa.Index("ix_analysis_runs_status_id", "status", "id"),
    # Claims by pipeline: the oldest queued run of the pipelines a worker knows.
    sa.Index("ix_analysis_runs_pipeline_status_id", "pipeline", "status", "id"),
    # The overlap rule: is a run of this schedule queued or running?
    sa.Index("ix_analysis_runs_schedule_status", "schedule_id", "status"),
)

# Runs on a clock (pipeline.schedules). A disabled schedule has no
# next_fire_at, so the due query (next_fire_at <= now, on its index) never
# sees it and reads nothing but the schedules that are due.
schedules = sa.Table(
    "schedules",
    metadata,
    sa.Column("id", RunId, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("pipeline", sa.String(64), nullable=False),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("cron", sa.String(200), nullable=False),
    sa.Column("timezone", sa.String(64), nullable=False),
    sa.Column("enabled", sa.Boolean(create_constraint=False), nullable=False),
    sa.Column("overlap", sa.String(8), nullable=False),
    sa.Column("catch_up", sa.String(8), nullable=False),
    sa.Column("next_fire_at", UTCDateTime),
    sa.Column("last_fired_at", UTCDateTime),
    # The last run a tick created, for "last run and its status" without a
    # scan of the schedule's runs.
    sa.Column(
        "last_run_id",
        RunId,
        sa.ForeignKey("analysis_runs.id", ondelete="SET NULL", name="fk_schedules_last_run_id"),
    ),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("name", name="uq_schedules_name"),
    sa.CheckConstraint(_in("overlap", SCHEDULE_OVERLAPS), name="ck_schedules_overlap"),
    sa.CheckConstraint(_in("catch_up", SCHEDULE_CATCH_UPS), name="ck_schedules_catch_up"),
    sa.Index("ix_schedules_next_fire_at", "next_fire_at"),
    # Deleting a run (retention) looks here for a schedule to unlink.
    sa.Index("ix_schedules_last_run_id", "last_run_id"),
    # SQLite would otherwise reuse the id of the last schedule deleted.
    sqlite_autoincrement=True,
)

# One row per tick a schedule fired (or skipped, or deferred): its primary key
# is what makes a tick fire exactly once, whatever the number of firers.
schedule_ticks = sa.Table(
    "schedule_ticks",
    metadata,
    sa.Column(
        "schedule_id",
        RunId,
        sa.ForeignKey("schedules.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("fire_at", UTCDateTime, primary_key=True),
    sa.Column("outcome", sa.String(8), nullable=False),
    sa.Column("run_id", RunId, sa.ForeignKey("analysis_runs.id", ondelete="SET NULL")),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.CheckConstraint(_in("outcome", TICK_OUTCOMES), name="ck_schedule_ticks_outcome"),
    # Ticks waiting for their turn (overlap "queue"), by schedule, oldest first.
    sa.Index("ix_schedule_ticks_outcome", "outcome", "schedule_id", "fire_at"),
    # Deleting a run (retention) looks here for ticks to unlink.
    sa.Index("ix_schedule_ticks_run_id", "run_id"),
    # Forgetting old ticks (pipeline.schedules.prune_ticks).
    sa.Index("ix_schedule_ticks_fire_at", "fire_at"),
)

# Idempotency-Key of POST /runs: the key's primary key makes two requests
# with one key create one run, even at the same instant (DESIGN.md).
run_idempotency = sa.Table(
    "run_idempotency",
    metadata,
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("body_hash", sa.String(64), nullable=False),
    sa.Column(
        "run_id",
        RunId,
        sa.ForeignKey("analysis_runs.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

run_phases = sa.Table(
    "run_phases",
    metadata,
    sa.Column(
        "run_id",
        RunId,
        sa.ForeignKey("analysis_runs.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("phase_num", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("label", sa.String(200), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("started_at", UTCDateTime),
    sa.Column("finished_at", UTCDateTime),
    sa.CheckConstraint(_in("status", PHASE_STATUSES), name="ck_run_phases_status"),
)

run_warnings = sa.Table(
    "run_warnings",
    metadata,
    sa.Column("id", RunId, primary_key=True, autoincrement=True),
    sa.Column(
        "run_id",
        RunId,
        sa.ForeignKey("analysis_runs.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("phase", sa.Integer),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Index("ix_run_warnings_run_id", "run_id", "id"),
)


ARTIFACT_KINDS = ("markdown", "table", "chart")

# A phase's return value (pipeline.artifacts): JSON text, written with the
# phase's completion record. Text rather than JSON: the text is what was
# checked (no NaN, at most 1 MiB), and it is stored and served as it is.
run_results = sa.Table(
    "run_results",
    metadata,
    sa.Column(
        "run_id",
        RunId,
        sa.ForeignKey("analysis_runs.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("phase_num", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("value", sa.Text, nullable=False),
)

# What a phase published for a person to look at (pipeline.artifacts).
run_artifacts = sa.Table(
    "run_artifacts",
    metadata,
    sa.Column(
        "run_id",
        RunId,
        sa.ForeignKey("analysis_runs.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("phase_num", sa.Integer, nullable=False),
    # Order of publication within the phase: artifacts are listed in phase order.
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("title", sa.String(200)),
    sa.Column("data", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.CheckConstraint(_in("kind", ARTIFACT_KINDS), name="ck_run_artifacts_kind"),
    # A page's artifacts come out in phase order without a sort (GET /runs).
    sa.Index("ix_run_artifacts_run_order", "run_id", "phase_num", "position", "key"),
)


# -- the example pipeline's result tables (pipeline.example) -----------------


def _run_fk() -> sa.Column[int]:
    return sa.Column(
        "run_id",
        RunId,
        sa.ForeignKey("analysis_runs.id", ondelete="CASCADE"),
        primary_key=True,
    )


example_comments = sa.Table(
    "example_comments",
    metadata,
    _run_fk(),
    sa.Column("comment_id", sa.String(32), primary_key=True),
    sa.Column("thread_id", sa.String(32), nullable=False),
    sa.Column("author", sa.String(64), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("created_utc", sa.Integer, nullable=False),
)

example_scores = sa.Table(
    "example_scores",
    metadata,
    _run_fk(),
    sa.Column("comment_id", sa.String(32), primary_key=True),
    sa.Column("tokens", sa.Integer, nullable=False),
    sa.Column("score", sa.Float, nullable=False),
)

example_thread_stats = sa.Table(
    "example_thread_stats",
    metadata,
    _run_fk(),
    sa.Column("thread_id", sa.String(32), primary_key=True),
    sa.Column("comments", sa.Integer, nullable=False),
    sa.Column("authors", sa.Integer, nullable=False),
    sa.Column("mean_score", sa.Float, nullable=False),
)

example_author_stats = sa.Table(
    "example_author_stats",
    metadata,
    _run_fk(),
    sa.Column("author", sa.String(64), primary_key=True),
    sa.Column("comments", sa.Integer, nullable=False),
    sa.Column("mean_score", sa.Float, nullable=False),
)
