"""Phase results and artifacts: what a run produced, kept with the run.

Both cascade from ``analysis_runs``, so retention deletes them with their run.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _run_fk() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(
        "run_id",
        ID,
        sa.ForeignKey("analysis_runs.id", ondelete="CASCADE"),
        primary_key=True,
    )


def upgrade() -> None:
    op.create_table(
        "run_results",
        _run_fk(),
        sa.Column("phase_num", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_table(
        "run_artifacts",
        _run_fk(),
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("phase_num", sa.Integer, nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("title", sa.String(200)),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.CheckConstraint("kind IN ('markdown', 'table', 'chart')", name="ck_run_artifacts_kind"),
    )


def downgrade() -> None:
    op.drop_table("run_artifacts")
    op.drop_table("run_results")
