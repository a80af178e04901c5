"""PostgreSQL: the trigger's NOTIFY only for what changes a run's state, not its progress.

A ``NOTIFY`` in a transaction takes a database-wide lock at its commit
(PostgreSQL keeps the notification queue in commit order), so transactions
that notify commit one at a time. Migration 0007's trigger notified at every
statement that changed runs, so every phase boundary of every runner queued
behind that lock: 5-13% of runs/s with 2 workers x 4 (bench "postgres").
The trigger now fires for inserts, deletes and updates that set a run's
status, cancel request or owner (a claim, an end, a cancel, a sweep, a
resume), from whichever process. A runner's boundaries and heartbeats are
told by its process after they commit, folded to at most a few a second, on
a connection of its own (``pipeline.notify.Notifier``).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _trigger(events: str) -> None:
    op.execute("DROP TRIGGER IF EXISTS analysis_runs_changed_notify ON analysis_runs")
    op.execute(
        f"""
        CREATE TRIGGER analysis_runs_changed_notify
        AFTER {events} ON analysis_runs
        FOR EACH STATEMENT EXECUTE FUNCTION pipeline_notify_changed()
        """
    )


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    _trigger("INSERT OR DELETE OR UPDATE OF status, cancel_requested_at, owner")


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    _trigger("INSERT OR UPDATE OR DELETE")
