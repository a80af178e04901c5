"""A bench server: ``pipeline serve``'s app and uvicorn, plus two reference endpoints.

    python -m bench.server --port PORT      (settings from PIPELINE_* as usual)

What ``pipeline serve`` runs (the same ``create_app`` on uvicorn, logging at
INFO like the CLI), with two routes added on the app object for the API
benchmark:

* ``GET /bench/nodb/{run_id}``: the same Run JSON as ``GET /runs/{id}`` (a
  completed run with five phases and a warning, built once in memory),
  encoded the same way, on the event loop as on SQLite, but without the
  database: the difference to ``GET /runs/{id}`` is the cost of reading the run.
* ``GET /bench/trivial``: ``{"status": "ok"}``, the HTTP stack alone.
* ``GET /bench/statements``: how many statements the API's engine has sent,
  and how many ``GET /events`` subscribers there are (the fan-out benchmark).

uvicorn's access log is off: one log line per request would add the same
cost to every endpoint and shrink the ratios.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
import uvicorn
from fastapi import Response

from pipeline.api import RunOut, create_app, run_json
from pipeline.config import get_settings
from pipeline.logs import configure_logging
from pipeline.runs import PhaseRecord, Run, RunStatus, RunWarning


def sample_run(run_id: int) -> Run:
    """A completed run of five phases with one warning, as the benchmark's rows are."""
    start = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    step = dt.timedelta(milliseconds=3)
    return Run(
        id=run_id,
        status=RunStatus.COMPLETED,
        params={"subreddit": "python", "limit": 100},
        current_phase=5,
        phase_label="Phase 5",
        progress_current=5,
        progress_total=5,
        phase_progress_current=None,
        phase_progress_total=None,
        error_message=None,
        created_at=start,
        started_at=start,
        completed_at=start + 5 * step,
        cancel_requested_at=None,
        warnings=(RunWarning(phase=2, message="3 comments were deleted"),),
        phases=tuple(
            PhaseRecord(
                num=i,
                label=f"Phase {i}",
                status="completed",
                attempts=1,
                started_at=start + (i - 1) * step,
                finished_at=start + i * step,
            )
            for i in range(1, 6)
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.server")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    settings = get_settings()
    configure_logging(settings.log_format, logging.INFO)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    app = create_app(settings)
    # Statements the API's own engine sent (the watcher's looks, requests): the
    # fan-out benchmark reads it; runners have engines of their own.
    statements = [0]

    def count(*_: Any) -> None:
        statements[0] += 1

    sa.event.listen(app.state.service.engine, "before_cursor_execute", count)

    @app.get("/bench/statements")
    def sent() -> dict[str, int]:
        return {"statements": statements[0], "subscribers": app.state.watcher.subscribers}

    # async, as GET /runs/{id} is on SQLite: no thread-pool hop in the floor
    # either; and encoded as GET /runs/{id} encodes its answer.
    @app.get("/bench/nodb/{run_id}", response_model=RunOut)
    async def nodb(run_id: int) -> Response:
        return Response(run_json(sample_run(run_id)), media_type="application/json")

    @app.get("/bench/trivial")
    async def trivial() -> dict[str, str]:
        return {"status": "ok"}

    config = uvicorn.Config(
        app, host="127.0.0.1", port=args.port, lifespan="on", access_log=False, log_config=None
    )
    # Plain uvicorn.Server: SIGTERM still stops it gracefully (the lifespan lets
    # running runs finish); the CLI's exit-code handling does not matter here.
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    raise SystemExit(main())
