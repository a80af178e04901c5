"""Schedules: runs on a cron expression, and the ticks they fired.

``schedule_ticks``' primary key ``(schedule_id, fire_at)`` is what makes a
tick fire once whatever the number of firers (``pipeline.schedules``).
``analysis_runs.schedule_id`` says which schedule started a run; it is not a
foreign key, so a run outlives its schedule and still says which one started
it (ids are never reused), and adding it is a plain ``ADD COLUMN`` on SQLite
(no rebuild of ``analysis_runs``, which would cascade into its phase rows).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("pipeline", sa.String(64), nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("cron", sa.String(200), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("enabled", sa.Boolean(create_constraint=False), nullable=False),
        sa.Column("overlap", sa.String(8), nullable=False),
        sa.Column("catch_up", sa.String(8), nullable=False),
        sa.Column("next_fire_at", TS),
        sa.Column("last_fired_at", TS),
        sa.Column(
            "last_run_id",
            ID,
            sa.ForeignKey("analysis_runs.id", ondelete="SET NULL", name="fk_schedules_last_run_id"),
        ),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("name", name="uq_schedules_name"),
        sa.CheckConstraint("overlap IN ('skip', 'queue', 'allow')", name="ck_schedules_overlap"),
        sa.CheckConstraint("catch_up IN ('latest', 'none')", name="ck_schedules_catch_up"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_schedules_next_fire_at", "schedules", ["next_fire_at"])
    op.create_index("ix_schedules_last_run_id", "schedules", ["last_run_id"])
    op.create_table(
        "schedule_ticks",
        sa.Column(
            "schedule_id",
            ID,
            sa.ForeignKey("schedules.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("fire_at", TS, primary_key=True),
        sa.Column("outcome", sa.String(8), nullable=False),
        sa.Column("run_id", ID, sa.ForeignKey("analysis_runs.id", ondelete="SET NULL")),
        sa.Column("created_at", TS, nullable=False),
        sa.CheckConstraint(
            "outcome IN ('fired', 'skipped', 'waiting', 'error')",
            name="ck_schedule_ticks_outcome",
        ),
    )
    op.create_index(
        "ix_schedule_ticks_outcome", "schedule_ticks", ["outcome", "schedule_id", "fire_at"]
    )
    op.create_index("ix_schedule_ticks_run_id", "schedule_ticks", ["run_id"])
    op.create_index("ix_schedule_ticks_fire_at", "schedule_ticks", ["fire_at"])
    # Not a foreign key (a run outlives its schedule): a plain ADD COLUMN, no rebuild.
    op.add_column("analysis_runs", sa.Column("schedule_id", ID))
    op.create_index("ix_analysis_runs_schedule_status", "analysis_runs", ["schedule_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_analysis_runs_schedule_status", table_name="analysis_runs")
    op.drop_column("analysis_runs", "schedule_id")  # SQLite 3.35+ drops it in place
    op.drop_table("schedule_ticks")
    op.drop_table("schedules")
