"""The Procrastinate side of ``bench.postgres``: one job of five one-INSERT transactions.

``procrastinate --app=bench.procrastinate_jobs.app worker`` runs it on the
database ``BENCH_PG_CONNINFO``; the benchmark makes an app of its own per
database with :func:`make_app`. Each worker thread keeps its connection, as
a pipeline runner does.
"""

from __future__ import annotations

import os
import threading

import psycopg
from procrastinate import App, PsycopgConnector

_local = threading.local()


def five(run_id: int) -> None:
    """The same 5 transactions of one INSERT each as a run of bench.phases:INSERT5."""
    conn: psycopg.Connection[tuple[object, ...]] | None = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = psycopg.connect(os.environ["BENCH_PG_CONNINFO"])
    for phase in range(1, 6):
        with conn.transaction():
            conn.execute(
                "INSERT INTO bench_ledger (run_id, phase) VALUES (%s, %s)", (run_id, phase)
            )


def make_app(conninfo: str) -> App:
    app = App(connector=PsycopgConnector(conninfo=conninfo))
    app.task(name="five")(five)
    return app


app = make_app(os.environ.get("BENCH_PG_CONNINFO", ""))
