"""PostgreSQL: a notification whenever a run becomes claimable.

A trigger on ``analysis_runs`` sends ``NOTIFY pipeline_runs_queued`` when a
row is inserted or updated to ``queued`` without an owner (created, resumed,
requeued by a sweep), from whichever door did it. Workers and servers LISTEN
(``pipeline.notify``) and start a runner at once instead of at their next
poll, which stays as the fallback. PostgreSQL folds identical notifications
of one transaction into one, and delivers them at commit. SQLite has no such
thing (and no other process to tell on one machine): nothing changes there.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHANNEL = "pipeline_runs_queued"


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute(
        f"""
        CREATE FUNCTION pipeline_notify_queued() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', '');
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER analysis_runs_queued_notify
        AFTER INSERT OR UPDATE OF status ON analysis_runs
        FOR EACH ROW WHEN (NEW.status = 'queued' AND NEW.owner IS NULL)
        EXECUTE FUNCTION pipeline_notify_queued()
        """
    )


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS analysis_runs_queued_notify ON analysis_runs")
    op.execute("DROP FUNCTION IF EXISTS pipeline_notify_queued()")
