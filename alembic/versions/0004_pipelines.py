"""Pipelines: every run names the pipeline it belongs to.

Runs made before this revision ran the only registry there was, the one
``PIPELINE_PHASES`` named: they get the name that registry loads as now (a
plain ``module:NAME`` loads as ``name``), read from the migrating process's
settings, so they keep working (get, list, resume, claim) under the same
configuration. When that cannot be told (the setting does not load, or names
several pipelines) they get ``"phases"``, the name the default
``pipeline.example:PHASES`` and ``pipeline.example:PIPELINE`` load as. The
index serves claims by pipeline. ``run_idempotency`` holds the
``Idempotency-Key`` of ``POST /runs`` (its primary key makes one key create
one run) and goes with its run.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


DEFAULT_NAME = "phases"


def _configured_name() -> str:
    """The name of the one pipeline PIPELINE_PHASES loads, or "phases"."""
    try:
        from pipeline.config import Settings
        from pipeline.pipelines import load_pipelines

        found = load_pipelines(Settings().phases)
    except Exception:  # a setting that does not load: old runs keep the default name
        return DEFAULT_NAME
    return found[0].name if len(found) == 1 else DEFAULT_NAME


def upgrade() -> None:
    # A plain ADD COLUMN (SQLite allows NOT NULL with a default): no table
    # rebuild, which on SQLite could cascade into the runs' phase rows.
    op.add_column(
        "analysis_runs",
        sa.Column("pipeline", sa.String(64), nullable=False, server_default=DEFAULT_NAME),
    )
    name = _configured_name()
    if name != DEFAULT_NAME:
        op.execute(sa.text("UPDATE analysis_runs SET pipeline = :name").bindparams(name=name))
    op.create_index(
        "ix_analysis_runs_pipeline_status_id", "analysis_runs", ["pipeline", "status", "id"]
    )
    op.create_table(
        "run_idempotency",
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("body_hash", sa.String(64), nullable=False),
        sa.Column(
            "run_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.ForeignKey("analysis_runs.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("run_idempotency")
    op.drop_index("ix_analysis_runs_pipeline_status_id", table_name="analysis_runs")
    with op.batch_alter_table("analysis_runs") as batch:
        batch.drop_column("pipeline")
