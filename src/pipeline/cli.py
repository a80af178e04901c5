"""The ``pipeline`` command: migrate, run, status, list (and serve)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any, NoReturn

import uvicorn
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline import db, runs
from pipeline.config import Settings, get_settings
from pipeline.logs import configure_logging
from pipeline.orchestrator import Executor, RegistryError, load_registry
from pipeline.runs import RunStatus

EXIT_CODES = {RunStatus.COMPLETED: 0, RunStatus.FAILED: 1, RunStatus.CANCELLED: 2}
GRACEFUL_HTTP_SECONDS = 10
MAX_RUN_ID = 2**63 - 1  # run ids are 64-bit

console = Console(stderr=True)


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 64."""


def _params(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--params is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError("--params must be a JSON object, like '{\"limit\": 100}'")
    return value


def _engine(settings: Settings) -> Any:
    engine = db.create_engine(settings.database_url, busy_timeout_ms=settings.busy_timeout_ms)
    db.check_schema(engine)
    return engine


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    db.migrate(settings.database_url)
    console.print(f"database at the head revision ({db.head_revision()}): {settings.database_url}")
    return 0


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    params = _params(args.params)
    registry = load_registry(settings.phases)  # a broken registry is refused either way
    engine = _engine(settings)
    if not args.wait:
        with db.write(engine) as conn:
            run_id = runs.create_run(conn, params=params).id
        print(run_id)
        console.print(
            f"run {run_id} queued; a `pipeline serve` or `pipeline worker` will execute it"
        )
        return 0
    executor = Executor(
        settings.database_url,
        registry,
        heartbeat_seconds=settings.heartbeat_seconds,
        busy_timeout_ms=settings.busy_timeout_ms,
    )
    executor.sweep(engine, lease_seconds=settings.lease_seconds, requeue=settings.auto_resume)
    run_id, thread = executor.start_reserved(params)
    console.print(f"run {run_id} started ({len(registry)} phases); Ctrl-C cancels it")
    status = _watch(engine, executor, run_id, thread)
    run = _read_run(engine, run_id)
    if run is not None:
        _print_outcome(run)
    return EXIT_CODES.get(status, 1)


def _read_run(engine: Any, run_id: int) -> runs.Run | None:
    with db.read(engine) as conn:
        return runs.get_run(conn, run_id=run_id)


def _watch(engine: Any, executor: Executor, run_id: int, thread: threading.Thread) -> RunStatus:
    """Show live progress until the runner thread ends; the first Ctrl-C asks to cancel."""
    cancelled = threading.Event()

    def on_interrupt(signum: int, frame: object) -> None:
        if cancelled.is_set():
            console.print("second interrupt: leaving now; the run will be swept as interrupted")
            os._exit(130)  # at once: the runner thread is non-daemon and would be waited for
        cancelled.set()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    columns = (
        TextColumn("{task.description}", justify="left"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, console=console, transient=False) as bars:
            overall = bars.add_task("run", total=100.0)
            phase = bars.add_task("phase", total=1.0, visible=False)
            asked = False
            while True:
                thread.join(0.1)
                if cancelled.is_set() and not asked:
                    asked = True
                    with db.write(engine) as conn:
                        runs.request_cancel(conn, run_id=run_id)
                    executor.notify_cancel(run_id)
                    console.print("cancel requested; stopping at the next phase boundary")
                finished = not thread.is_alive()  # before the read, so the read is final
                run = _read_run(engine, run_id)
                if run is None:
                    return RunStatus.FAILED
                run = run.with_live_progress(executor.live_progress(run_id))
                _update_bars(bars, overall, phase, run)
                if finished:
                    return run.status
    finally:
        signal.signal(signal.SIGINT, previous)


def _update_bars(bars: Progress, overall: Any, phase: Any, run: runs.Run) -> None:
    label = f"phase {run.current_phase}/{run.progress_total}: {run.phase_label}"
    bars.update(overall, completed=run.percent, description=f"run {run.id} [{run.status}]")
    if run.status is RunStatus.RUNNING and run.phase_progress_total:
        bars.update(
            phase,
            visible=True,
            description=label,
            total=run.phase_progress_total,
            completed=run.phase_progress_current or 0,
        )
    else:
        bars.update(phase, visible=run.status is RunStatus.RUNNING, description=label)


def _print_outcome(run: runs.Run) -> None:
    for warning in run.warnings:
        console.print(f"[yellow]warning[/] (phase {warning.phase}): {warning.message}")
    if run.status is RunStatus.COMPLETED:
        console.print(f"[green]run {run.id} completed[/] ({run.progress_total} phases)")
    elif run.status is RunStatus.FAILED:
        console.print(
            f"[red]run {run.id} failed[/] in phase {run.current_phase}: {run.error_message}"
        )
    else:
        console.print(f"run {run.id} {run.status}")


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    run = _read_run(_engine(settings), args.run_id)
    if run is None:
        raise UsageError(f"no run with id {args.run_id}")
    print(json.dumps(run.to_dict(), indent=2))
    return 0


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    status = RunStatus(args.status) if args.status else None
    with db.read(_engine(settings)) as conn:
        page, _ = runs.list_runs(conn, status=status, limit=args.limit)
    table = Table("id", "status", "phase", "progress", "created", "error")
    for run in page:
        table.add_row(
            str(run.id),
            run.status.value,
            f"{run.current_phase or '-'} {run.phase_label or ''}",
            f"{run.percent:.1f}%",
            runs.rfc3339(run.created_at) or "",
            (run.error_message or "")[:60],
        )
    Console().print(table)
    return 0


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.api import create_app

    _engine(settings).dispose()  # a clear error now, rather than a failed startup later
    app = create_app(settings)
    service = app.state.service
    # In JSON mode uvicorn's records go through our root handler, like every other.
    log_config = None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        lifespan="on",
        log_config=log_config,
        # After a stop signal, open requests get this long to finish; event
        # streams end by themselves (they watch the service's stop flag).
        timeout_graceful_shutdown=GRACEFUL_HTTP_SECONDS,
    )
    server = GracefulServer(config, on_stop=service.stop_claiming)
    console.print(f"serving on http://{args.host}:{args.port}/ (Ctrl-C stops, runs finish first)")
    server.run()
    return 0 if server.started else 1


class GracefulServer(uvicorn.Server):
    """uvicorn, but a graceful stop exits 0 and a second signal exits at once.

    uvicorn re-raises a captured SIGTERM after its shutdown, so the process
    would die with -15 even after a clean stop. Here the first SIGTERM or
    SIGINT stops accepting requests and lets running runs finish (the
    lifespan waits for them); a second one exits at once with 128+signal,
    and the runs it leaves are swept as interrupted on the next start.
    """

    def __init__(self, config: uvicorn.Config, *, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_stop = on_stop

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        serve_log = logging.getLogger("pipeline.serve")
        if self.should_exit:
            serve_log.warning("second signal: exiting now; unfinished runs will be swept later")
            os._exit(128 + sig)
        serve_log.info("stopping: no new requests; waiting for running runs to finish")
        self._on_stop()  # before the HTTP drain: no queued run may start during it
        self.handle_exit(sig, frame)


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    """Claim and execute queued runs until SIGTERM; then let the running ones finish."""
    from pipeline.service import Service

    _engine(settings).dispose()
    service = Service(settings, execute=True, concurrency=args.concurrency)
    stop = threading.Event()
    worker_log = logging.getLogger("pipeline.worker")

    def on_signal(sig: int, frame: FrameType | None) -> None:
        if stop.is_set():
            worker_log.warning("second signal: exiting now; unfinished runs will be swept later")
            os._exit(128 + sig)
        worker_log.info("stopping: no new claims; waiting for running runs to finish")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service.start()
    worker_log.info(
        "worker %s ready: up to %d runs at once",
        service.executor.identity,
        service.executor.max_concurrent,
    )
    while not stop.wait(0.5):
        pass
    service.stop(wait=True)
    worker_log.info("worker stopped")
    return 0


def cmd_prune(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline import retention

    try:
        older_than = retention.parse_duration(args.older_than)
    except ValueError as exc:
        raise UsageError(f"--older-than: {exc}") from None
    statuses = [RunStatus(s) for s in args.status] if args.status else list(retention.FINISHED)
    engine = _engine(settings)
    count = retention.prune(engine, older_than=older_than, statuses=statuses, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(count)
    console.print(f"{verb} {count} finished run(s) older than {args.older_than}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _run_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a run id (a whole number)") from None
    if not 1 <= value <= MAX_RUN_ID:
        raise argparse.ArgumentTypeError(f"{text} is not a run id (1 to {MAX_RUN_ID})")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pipeline", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="bring the database to the head migration")
    run = sub.add_parser("run", help="start a run of the configured registry")
    run.add_argument("--params", help="the run's parameters, a JSON object")
    run.add_argument(
        "--wait",
        action="store_true",
        help="execute here with live progress; exit 0 completed, 1 failed, 2 cancelled",
    )
    status = sub.add_parser("status", help="print one run as JSON")
    status.add_argument("run_id", type=_run_id)
    serve = sub.add_parser("serve", help="the HTTP service and dashboard; runs execute here")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    worker = sub.add_parser("worker", help="claim and execute queued runs (many may run)")
    worker.add_argument(
        "--concurrency",
        type=int,
        choices=range(1, 257),
        metavar="N",
        help="runs executing at once in this worker (default PIPELINE_MAX_CONCURRENT_RUNS)",
    )
    prune = sub.add_parser("prune", help="delete finished runs older than a duration")
    prune.add_argument("--older-than", required=True, help="e.g. 30d, 12h, 90m, 1d12h")
    prune.add_argument(
        "--status",
        action="append",
        choices=["completed", "failed", "cancelled"],
        help="only runs that ended so (repeatable; default: all three)",
    )
    prune.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    listing = sub.add_parser("list", help="a table of recent runs")
    listing.add_argument("--status", choices=[s.value for s in RunStatus])
    listing.add_argument("--limit", type=int, default=20, choices=range(1, 501), metavar="1-500")
    return parser


COMMANDS = {
    "migrate": cmd_migrate,
    "run": cmd_run,
    "serve": cmd_serve,
    "worker": cmd_worker,
    "prune": cmd_prune,
    "status": cmd_status,
    "list": cmd_list,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
    except ValidationError as exc:  # a bad PIPELINE_* value
        console.print(f"[red]error: bad configuration:[/] {exc}")
        return 64
    configure_logging(settings.log_format, logging.DEBUG if args.verbose else logging.INFO)
    if args.command != "migrate":  # schema checks would log Alembic's chatter
        logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](settings, args)
    except (UsageError, RegistryError, db.SchemaNotCurrent, db.DatabaseBusy) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 64


if __name__ == "__main__":
    sys.exit(main())
