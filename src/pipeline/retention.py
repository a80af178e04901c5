"""Retention: delete finished runs older than a given age, a batch at a time.

Batches keep each write transaction short, so on SQLite a prune of any size
holds the single write lock only for milliseconds at a time and API writes
slip in between (the FIFO gate in ``db`` queues them fairly).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Sequence

from sqlalchemy.engine import Engine

from pipeline import db, runs
from pipeline.runs import RunStatus

log = logging.getLogger("pipeline.retention")

FINISHED = (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED)
BATCH_SIZE = 500
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PART = re.compile(r"(\d+)\s*([smhdw])")


def parse_duration(text: str) -> dt.timedelta:
    """``30d``, ``12h``, ``1d12h``, ``90m``, ``45s``, ``2w`` -> a timedelta (never zero)."""
    compact = text.strip().lower()
    parts = _PART.findall(compact)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != compact.replace(" ", ""):
        raise ValueError(
            f"{text!r} is not a duration; use a number and a unit, like 30d, 12h, 90m, 1d12h"
        )
    seconds = sum(int(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError("the duration must be longer than zero")
    return dt.timedelta(seconds=seconds)


def prune(
    engine: Engine,
    *,
    older_than: dt.timedelta,
    statuses: Sequence[RunStatus] = FINISHED,
    dry_run: bool = False,
    batch_size: int = BATCH_SIZE,
) -> int:
    """Delete (or with ``dry_run`` count) finished runs that ended before now - ``older_than``.

    Their phases, warnings and result rows go with them (ON DELETE CASCADE).
    Queued and running runs are never touched, whatever ``statuses`` says.
    """
    chosen = [s for s in statuses if s in FINISHED]
    cutoff = runs.utcnow() - older_than
    if dry_run:
        with db.read(engine) as conn:
            return runs.count_finished_before(conn, cutoff=cutoff, statuses=chosen)
    deleted = 0
    while True:
        with db.write(engine) as conn:
            batch = runs.delete_finished_before(
                conn, cutoff=cutoff, statuses=chosen, limit=batch_size
            )
        deleted += batch
        if batch < batch_size:
            break
    if deleted:
        log.info("pruned %d finished run(s) older than %s", deleted, older_than)
    return deleted
