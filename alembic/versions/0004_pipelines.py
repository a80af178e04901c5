"""Pipelines: every run names the pipeline it belongs to.

Runs made before this revision ran the only registry there was; they get
``"phases"``, the name the default ``PIPELINE_PHASES=pipeline.example:PHASES``
(and ``pipeline.example:PIPELINE``) loads as, so they keep working: get,
list, resume. A service serving a custom ``module:PHASES`` loads it under the
same name. The index serves claims by pipeline.

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


def upgrade() -> None:
    # A plain ADD COLUMN (SQLite allows NOT NULL with a default): no table
    # rebuild, which on SQLite could cascade into the runs' phase rows.
    op.add_column(
        "analysis_runs",
        sa.Column("pipeline", sa.String(64), nullable=False, server_default="phases"),
    )
    op.create_index(
        "ix_analysis_runs_pipeline_status_id", "analysis_runs", ["pipeline", "status", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_analysis_runs_pipeline_status_id", table_name="analysis_runs")
    with op.batch_alter_table("analysis_runs") as batch:
        batch.drop_column("pipeline")
