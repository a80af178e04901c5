"""PostgreSQL: a notification whenever a statement changes runs.

A statement-level trigger on ``analysis_runs`` sends ``NOTIFY
pipeline_runs_changed`` after any INSERT, UPDATE or DELETE of runs, from
whichever process made it: a worker's phase boundary, a heartbeat's
progress, a server's cancel. Each server's shared watcher of ``GET /events``
LISTENs (``pipeline.notify``, ``pipeline.watch``) and looks at once, so a
change made by a worker elsewhere reaches every server's viewers without
waiting for their next poll (which stays as the fallback). The payload is
empty, so PostgreSQL folds the notifications of one transaction into one.
SQLite has no such thing (and no other server on one file): nothing changes
there.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHANNEL = "pipeline_runs_changed"


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute(
        f"""
        CREATE FUNCTION pipeline_notify_changed() RETURNS trigger
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
        CREATE TRIGGER analysis_runs_changed_notify
        AFTER INSERT OR UPDATE OR DELETE ON analysis_runs
        FOR EACH STATEMENT EXECUTE FUNCTION pipeline_notify_changed()
        """
    )


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS analysis_runs_changed_notify ON analysis_runs")
    op.execute("DROP FUNCTION IF EXISTS pipeline_notify_changed()")
