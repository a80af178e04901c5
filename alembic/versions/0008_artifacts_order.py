"""An index that hands out a page's artifacts in phase order, without a sort.

``GET /runs`` lists each run's artifacts in the order they were published
(phase, then position). With only the primary key (run_id, key), SQLite
sorted every page's artifacts in a temporary B-tree (the scale benchmark's
query-plan check counted it); this index gives the order as it is read.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_run_artifacts_run_order",
        "run_artifacts",
        ["run_id", "phase_num", "position", "key"],
    )


def downgrade() -> None:
    op.drop_index("ix_run_artifacts_run_order", table_name="run_artifacts")
