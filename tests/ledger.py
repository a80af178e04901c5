"""A registry whose phases record each committed execution in a ledger table.

Used by the multi-process tests (PIPELINE_PHASES=tests.ledger:PHASES): since
the ledger row commits with the phase, a (run, phase) pair appearing twice
means a phase was executed twice, and a missing one that it was skipped.
"""

from __future__ import annotations

import os
import time

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pipeline import Pipeline, db
from pipeline.orchestrator import RunContext

LEDGER_DDL = "CREATE TABLE ledger (run_id INTEGER NOT NULL, phase INTEGER NOT NULL, pid INTEGER)"


def create_ledger(engine: Engine) -> None:
    with db.write(engine) as conn:
        conn.exec_driver_sql(LEDGER_DDL)


def record(conn: Connection, ctx: RunContext) -> None:
    # Work outside the transaction first, as phases should (DESIGN.md).
    time.sleep(float(ctx.params.get("sleep", 0.005)))
    ctx.progress(1, 1)
    conn.execute(
        sa.text("INSERT INTO ledger (run_id, phase, pid) VALUES (:r, :p, :pid)"),
        {"r": ctx.run_id, "p": ctx.phase_num, "pid": os.getpid()},
    )


PHASES = [(1, "Fetch", record), (2, "Analyze", record), (3, "Report", record)]

# Four phases, for the fault drills (tests/test_drills.py: PIPELINE_PHASES=tests.ledger:FOUR).
FOUR = [(1, "Fetch", record), (2, "Analyze", record), (3, "Score", record), (4, "Report", record)]

# Two pipelines for workers that know different ones (tests/test_workers.py).
LEFT = Pipeline("left", PHASES)
RIGHT = Pipeline("right", [(1, "Fetch", record), (2, "Other", record)])
