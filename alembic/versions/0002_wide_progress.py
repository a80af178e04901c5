"""Sub-progress counters are 64-bit: a phase may count bytes of a large download.

On PostgreSQL a value over 2**31-1 failed the heartbeat that carried it (and,
in one transaction, every other run's beat with it). SQLite's INTEGER is
64-bit already, so only PostgreSQL changes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("phase_progress_current", "phase_progress_total")


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for column in COLUMNS:
        op.alter_column("analysis_runs", column, type_=sa.BigInteger(), existing_type=sa.Integer())


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for column in COLUMNS:
        # Values that no longer fit are clamped rather than failing the downgrade.
        op.execute(f"UPDATE analysis_runs SET {column} = 2147483647 WHERE {column} > 2147483647")
        op.alter_column("analysis_runs", column, type_=sa.Integer(), existing_type=sa.BigInteger())
