"""Runs, their phases and warnings, and the example pipeline's result tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
# 64-bit ids on PostgreSQL; SQLite's INTEGER PRIMARY KEY is 64-bit already.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
RUN_STATUS = "status IN ('queued', 'running', 'completed', 'failed', 'cancelled')"
PHASE_STATUS = "status IN ('pending', 'running', 'completed', 'failed', 'cancelled')"


def _run_fk() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(
        "run_id",
        ID,
        sa.ForeignKey("analysis_runs.id", ondelete="CASCADE"),
        primary_key=True,
    )


def upgrade() -> None:
    op.create_table(
        "analysis_runs",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("current_phase", sa.Integer),
        sa.Column("phase_label", sa.String(200)),
        sa.Column("progress_current", sa.Integer, nullable=False),
        sa.Column("progress_total", sa.Integer),
        sa.Column("phase_progress_current", sa.Integer),
        sa.Column("phase_progress_total", sa.Integer),
        sa.Column("error_message", sa.Text),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS),
        sa.Column("completed_at", TS),
        sa.Column("heartbeat_at", TS),
        sa.Column("cancel_requested_at", TS),
        sa.Column("owner", sa.String(300)),
        sa.CheckConstraint(RUN_STATUS, name="ck_analysis_runs_status"),
    )
    op.create_index("ix_analysis_runs_status_id", "analysis_runs", ["status", "id"])
    op.create_table(
        "run_phases",
        _run_fk(),
        sa.Column("phase_num", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
        sa.CheckConstraint(PHASE_STATUS, name="ck_run_phases_status"),
    )
    op.create_table(
        "run_warnings",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column(
            "run_id",
            ID,
            sa.ForeignKey("analysis_runs.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("phase", sa.Integer),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_run_warnings_run_id", "run_warnings", ["run_id", "id"])
    op.create_table(
        "example_comments",
        _run_fk(),
        sa.Column("comment_id", sa.String(32), primary_key=True),
        sa.Column("thread_id", sa.String(32), nullable=False),
        sa.Column("author", sa.String(64), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("created_utc", sa.Integer, nullable=False),
    )
    op.create_table(
        "example_scores",
        _run_fk(),
        sa.Column("comment_id", sa.String(32), primary_key=True),
        sa.Column("tokens", sa.Integer, nullable=False),
        sa.Column("score", sa.Float, nullable=False),
    )
    op.create_table(
        "example_thread_stats",
        _run_fk(),
        sa.Column("thread_id", sa.String(32), primary_key=True),
        sa.Column("comments", sa.Integer, nullable=False),
        sa.Column("authors", sa.Integer, nullable=False),
        sa.Column("mean_score", sa.Float, nullable=False),
    )
    op.create_table(
        "example_author_stats",
        _run_fk(),
        sa.Column("author", sa.String(64), primary_key=True),
        sa.Column("comments", sa.Integer, nullable=False),
        sa.Column("mean_score", sa.Float, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "example_author_stats",
        "example_thread_stats",
        "example_scores",
        "example_comments",
        "run_warnings",
        "run_phases",
        "analysis_runs",
    ):
        op.drop_table(table)
