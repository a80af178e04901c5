"""The ``pipeline`` command: migrate, run, status, show, list, schedule (and serve)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import sqlalchemy as sa
from pydantic import ValidationError
from rich.console import Console
from rich.markdown import Markdown
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.rule import Rule
from rich.table import Column, Table
from rich.text import Text

from pipeline import artifacts, db, runs, serving
from pipeline.config import Settings, get_settings
from pipeline.logs import configure_logging
from pipeline.orchestrator import Executor, RegistryError, UnknownPipeline, describe
from pipeline.params import InvalidParams, parse_json, validate_params
from pipeline.pipelines import load_pipelines, one_line
from pipeline.runs import RunStatus
from pipeline.schema import SCHEDULE_CATCH_UPS, SCHEDULE_OVERLAPS

if TYPE_CHECKING:
    from pipeline.schedules import Schedule
    from pipeline.service import Service

EXIT_CODES = {RunStatus.COMPLETED: 0, RunStatus.FAILED: 1, RunStatus.CANCELLED: 2}
MAX_RUN_ID = 2**63 - 1  # run ids are 64-bit

console = Console(stderr=True)


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 64 (or the one given)."""

    def __init__(self, message: str, *, exit_code: int = 64) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# What the schedule commands exit with for input they refuse (the 422s and 409
# over HTTP): 2, the code of a usage error, as the schedules issue asks.
SCHEDULE_REFUSED = 2


class DatabaseError(Exception):
    """The database could not be reached or refused the work: one line, exit code 1."""


# -- printing -----------------------------------------------------------------
#
# Everything that comes from the database or from the user is printed as a
# rich Text (never parsed as markup or emoji codes), with control characters
# shown as escapes, so that no stored value can crash or restyle the terminal.
# Only the styles we put around it are ours. Nothing prints a database password.

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all but tab and newline
_PASSWORD_IN_URL = re.compile(r"://[^:/]*:([^@]+)@")  # as SQLAlchemy's URL parser reads it


def _clean(value: object) -> str:
    """``value`` as printable text: control characters (ESC, CSI...) become ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


def _text(value: object, style: str = "") -> Text:
    """Data as a literal Text: no markup, no emoji codes, no control characters."""
    return Text(_clean(value), style=style)


def _say(*parts: str | Text) -> None:
    """One message on stderr, never wrapped; a plain string is literal text."""
    line = Text.assemble(*(part if isinstance(part, Text) else _text(part) for part in parts))
    console.print(line, soft_wrap=True)


def _error(message: str, url: str | None) -> None:
    """``error: message`` on one line, the database password hidden."""
    _say(Text("error:", style="red"), " ", " ".join(_hide_password(message, url).split()))


def _safe_url(url: str) -> str:
    """The URL to show: its password (if any) as ``***``."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not even a URL: show none of it, it may hold a password
        return "(an unparsable database URL)"


def _hide_password(text: str, url: str | None) -> str:
    """``text`` with the database URL's password replaced by ``***``, in any spelling."""
    if not url:
        return text
    shown = _safe_url(url)
    spellings = [url]  # the whole URL first: it then reads as the safe one
    secrets = set(_PASSWORD_IN_URL.findall(url))  # as written (maybe %-encoded)
    with suppress(Exception):  # unparsable: the pattern above still finds the password
        parsed = sa.make_url(url)
        spellings.append(parsed.render_as_string(hide_password=False))
        secrets.add(str(parsed.password or ""))  # decoded
    for spelling in spellings:
        text = text.replace(spelling, shown)
    for secret in sorted(secrets - {""}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _configured_url() -> str | None:
    """PIPELINE_DATABASE_URL as the environment gives it (settings may not have loaded)."""
    for key, value in os.environ.items():
        if key.upper() == "PIPELINE_DATABASE_URL":
            return value
    return None


def _configuration_error(exc: ValidationError) -> str:
    """Which PIPELINE_* variables are wrong and why, without echoing their values."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        name = "PIPELINE_" + "_".join(str(part) for part in error["loc"]).upper()
        problems.append(f"{name}: {error['msg']}")
    return "bad configuration: " + "; ".join(problems or ["invalid settings"])


def _check_url(url: str) -> None:
    """Refuse a URL SQLAlchemy cannot use, in one line, before anything connects."""
    try:
        sa.make_url(url).get_dialect()
    except Exception as exc:
        raise UsageError(
            f"PIPELINE_DATABASE_URL is not a usable database URL: {describe(exc)}"
        ) from None


def _params(text: str | None) -> dict[str, Any]:
    """--params, checked as every door checks them (``pipeline.params``)."""
    if text is None:
        return {}
    try:
        value = parse_json(text)
        if not isinstance(value, dict):
            raise UsageError("--params must be a JSON object, like '{\"limit\": 100}'")
        return validate_params(value)
    except InvalidParams as exc:
        raise UsageError(f"--params: {exc}") from None


def _engine(settings: Settings) -> Any:
    engine = db.create_engine(settings.database_url, busy_timeout_ms=settings.busy_timeout_ms)
    db.check_schema(engine)
    return engine


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    shown = _safe_url(settings.database_url)
    try:
        db.migrate(settings.database_url)
    except sa.exc.SQLAlchemyError as exc:
        raise DatabaseError(f"cannot migrate the database at {shown}: {describe(exc)}") from exc
    _say(f"database at the head revision ({db.head_revision()}): {shown}")
    return 0


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    params = _params(args.params)
    loaded = load_pipelines(settings.phases)  # a broken registry is refused either way
    executor = Executor(
        settings.database_url,
        loaded,
        heartbeat_seconds=settings.heartbeat_seconds,
        busy_timeout_ms=settings.busy_timeout_ms,
    )
    try:
        chosen = executor.pipeline(args.pipeline)
    except UnknownPipeline as exc:
        raise UsageError(f"--pipeline: {exc}") from None
    try:
        params, _ = chosen.check_params(params)
    except ValidationError as exc:
        raise UsageError(f"--params: {one_line(exc)}") from None
    engine = _engine(settings)
    if not args.wait:
        with db.write(engine) as conn:
            run_id = runs.create_run(conn, params=params, pipeline=chosen.name).id
        print(run_id)
        _say(f"run {run_id} queued; a `pipeline serve` or `pipeline worker` will execute it")
        return 0
    executor.sweep(engine, lease_seconds=settings.lease_seconds, requeue=settings.auto_resume)
    run_id, thread = executor.start_reserved(params, pipeline=chosen.name)
    _say(f"run {run_id} of {chosen.name} started ({len(chosen.phases)} phases); Ctrl-C cancels it")
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
            _say("second interrupt: leaving now; the run will be swept as interrupted")
            os._exit(130)  # at once: the runner thread is non-daemon and would be waited for
        cancelled.set()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    columns = (
        TextColumn("{task.description}", justify="left", markup=False),  # data: see _update_bars
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
                    _say("cancel requested; stopping at the next phase boundary")
                finished = not thread.is_alive()  # before the read, so the read is final
                # The row only: its phases are read once, at the end (a run of
                # 10,000 phases costs the watcher what a run of 3 does).
                with db.read(engine) as conn:
                    run = runs.get_run_row(conn, run_id=run_id)
                if run is None:
                    return RunStatus.FAILED
                run = run.with_live_progress(executor.live_progress(run_id))
                _update_bars(bars, overall, phase, run)
                if finished:
                    return run.status
    finally:
        signal.signal(signal.SIGINT, previous)


def _update_bars(bars: Progress, overall: Any, phase: Any, run: runs.Run) -> None:
    # The description column takes no markup: these are shown exactly as written.
    label = _clean(f"phase {run.current_phase}/{run.progress_total}: {run.phase_label}")
    bars.update(overall, completed=run.percent, description=f"run {run.id} [{run.status.value}]")
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
        _say(Text("warning", style="yellow"), f" (phase {warning.phase}): ", warning.message)
    if run.status is RunStatus.COMPLETED:
        _say(Text(f"run {run.id} completed", style="green"), f" ({run.progress_total} phases)")
    elif run.status is RunStatus.FAILED:
        _say(
            Text(f"run {run.id} failed", style="red"),
            f" in phase {run.current_phase}: ",
            run.error_message or "",
        )
    else:
        _say(f"run {run.id} {run.status.value}")


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    run = _read_run(_engine(settings), args.run_id)
    if run is None:
        raise UsageError(f"no run with id {args.run_id}")
    print(json.dumps(run.to_dict(), indent=2))
    return 0


SPARKS = "▁▂▃▄▅▆▇█"
BAR_WIDTH = 40


def _duration(ms: int | None) -> str:
    if ms is None:
        return "-"
    return f"{ms / 1000:.2f}s" if ms < 60_000 else f"{ms // 60_000}m{ms % 60_000 // 1000:02d}s"


def _render_table(data: dict[str, Any]) -> Table:
    table = Table(*(Column(header=_text(c)) for c in data["columns"]))
    for row in data["rows"]:
        table.add_row(*(_text("" if cell is None else cell) for cell in row))
    return table


def _render_chart(console: Console, data: dict[str, Any]) -> None:
    """A bar chart as a list of bars, a line chart as one sparkline per series."""
    values = [v for one in data["series"] for v in one["values"] if v is not None]
    top = max((abs(v) for v in values), default=0) or 1
    if data["type"] == "bar":
        width = max((len(_clean(x)) for x in data["x"]), default=0)
        for one in data["series"]:
            if len(data["series"]) > 1:
                console.print(_text(one["name"], "bold"))
            for x, v in zip(data["x"], one["values"], strict=True):
                bar = "█" * round(BAR_WIDTH * abs(v) / top) if v is not None else ""
                shown = "-" if v is None else f"{v:g}"
                console.print(
                    Text.assemble(_text(f"{_clean(x):>{width}} "), (bar, "cyan"), f" {shown}")
                )
        return
    low = min(values, default=0)
    span = (max(values, default=0) - low) or 1
    for one in data["series"]:
        line = "".join(
            " " if v is None else SPARKS[round((len(SPARKS) - 1) * (v - low) / span)]
            for v in one["values"]
        )
        console.print(
            Text.assemble(
                _text(one["name"]), " ", (line, "cyan"), _text(f"  {low:g} to {low + span:g}")
            )
        )


def _render_artifact(console: Console, artifact: artifacts.Artifact) -> None:
    data = json.loads(artifact.data or "null")
    heading = artifact.title or artifact.key
    console.print(Rule(_text(f"{heading} ({artifact.kind}, phase {artifact.phase})"), align="left"))
    if artifact.kind == "markdown":
        # Markdown of data is rendered as markdown; rich does not read console
        # markup in it, and control characters are shown as escapes.
        console.print(Markdown(_clean(data)))
    elif artifact.kind == "table":
        console.print(_render_table(data))
    else:
        _render_chart(console, data)


def cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    """One run for a person: status, phases with durations, warnings, artifacts."""
    engine = _engine(settings)
    with db.read(engine) as conn:
        run = runs.get_run(conn, run_id=args.run_id)
        published = artifacts.list_artifacts(conn, run_id=args.run_id) if run else []
    if run is None:
        raise UsageError(f"no run with id {args.run_id}")
    out = Console()
    head = Text.assemble(
        (f"run {run.id} ", "bold"),
        _text(run.status.value, STATUS_STYLES.get(run.status, "")),
        _text(f"  {run.percent:.1f}%  created {runs.rfc3339(run.created_at)}"),
    )
    out.print(head)
    if run.error_message:
        out.print(Text.assemble(("error: ", "red"), _text(run.error_message)))
    phases = Table("#", "phase", "status", "attempts", "duration")
    for p in run.phases:
        phases.add_row(
            _text(p.num),
            _text(p.label),
            _text(p.status),
            _text(p.attempts),
            _text(_duration(p.duration_ms)),
        )
    out.print(phases)
    for warning in run.warnings:
        where = "run" if warning.phase is None else f"phase {warning.phase}"
        out.print(
            Text.assemble(("warning", "yellow"), _text(f" ({where}): "), _text(warning.message))
        )
    for artifact in published:
        _render_artifact(out, artifact)
    return 0


STATUS_STYLES = {
    RunStatus.COMPLETED: "green",
    RunStatus.FAILED: "red",
    RunStatus.CANCELLED: "yellow",
    RunStatus.RUNNING: "cyan",
}


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    status = RunStatus(args.status) if args.status else None
    with db.read(_engine(settings)) as conn:
        page, _ = runs.list_runs(conn, status=status, limit=args.limit)
    table = Table("id", "pipeline", "status", "phase", "progress", "created", "error")
    for run in page:
        table.add_row(  # Text cells: a stored value is never read as markup
            _text(run.id),
            _text(run.pipeline),
            _text(run.status.value),
            _text(f"{run.current_phase or '-'} {run.phase_label or ''}"),
            _text(f"{run.percent:.1f}%"),
            _text(runs.rfc3339(run.created_at) or ""),
            _text((run.error_message or "")[:60]),
        )
    Console().print(table)
    return 0


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.api import create_app

    _engine(settings).dispose()  # a clear error now, rather than a failed startup later
    app = create_app(settings, bound_host=args.host)
    service = app.state.service
    _say(f"serving on http://{args.host}:{args.port}/ (Ctrl-C stops, runs finish first)")
    started = serving.serve(
        app, settings, host=args.host, port=args.port, on_stop=service.stop_claiming
    )
    return 0 if started else 1


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
    _say(f"{verb} {count} finished run(s) older than {args.older_than}")
    return 0


# -- schedules: the same Service methods (and checks) as /schedules over HTTP --


@contextmanager
def _schedule_service(settings: Settings) -> Iterator[Service]:
    """A Service that starts nothing (no thread): its pipelines check what is written."""
    from pipeline.service import Service

    service = Service(settings, execute=False)
    try:
        db.check_schema(service.engine)
        yield service
    finally:
        service.stop(wait=False)  # nothing was started: this disposes of the engine


def _schedule_named(service: Service, name: str) -> Schedule:
    found = service.get_schedule(name=name)
    if found is None:
        raise UsageError(f"no schedule named {name!r}", exit_code=SCHEDULE_REFUSED)
    return found


def _checked_schedule(call: Callable[[], Schedule | None]) -> Schedule | None:
    """``call()``, its refusals (as over HTTP: 422 or 409) as one-line usage errors."""
    from pipeline import schedules

    try:
        result = call()
    except schedules.InvalidSchedule as exc:
        raise UsageError(str(exc), exit_code=SCHEDULE_REFUSED) from None
    except ValidationError as exc:  # the pipeline's params model refused them
        raise UsageError(f"--params: {one_line(exc)}", exit_code=SCHEDULE_REFUSED) from None
    except schedules.NameTaken as exc:
        raise UsageError(str(exc), exit_code=SCHEDULE_REFUSED) from None
    return result


def _next_fire_text(schedule: Schedule) -> str:
    if not schedule.enabled:
        return "paused"
    return f"next fire {runs.rfc3339(schedule.next_fire_at) or '-'}"


def cmd_schedule_add(settings: Settings, args: argparse.Namespace) -> int:
    try:
        params = _params(args.params)
    except UsageError as exc:
        raise UsageError(str(exc), exit_code=SCHEDULE_REFUSED) from None
    payload: dict[str, Any] = {
        "name": args.name,
        "params": params,
        "cron": args.cron,
        "enabled": not args.disabled,
    }
    optional = {
        "pipeline": args.pipeline,
        "timezone": args.timezone,
        "overlap": args.overlap,
        "catch_up": args.catch_up,
    }
    payload.update({key: value for key, value in optional.items() if value is not None})
    with _schedule_service(settings) as service:
        created = _checked_schedule(lambda: service.create_schedule(payload))
    assert created is not None
    words = created.to_dict()["cron_text"]
    print(created.id)
    _say(
        f"schedule {created.name!r} (id {created.id}) added for pipeline {created.pipeline}: ",
        f"{created.cron!r}" + (f" ({words})" if words else ""),
        f" in {created.timezone}; {_next_fire_text(created)}",
        "" if created.enabled else f" (`pipeline schedule resume {created.name}` starts it)",
    )
    return 0


def cmd_schedule_list(settings: Settings, args: argparse.Namespace) -> int:
    with _schedule_service(settings) as service:
        found = service.list_schedules()
    table = Table(
        "id",
        "name",
        "pipeline",
        "cron",
        "in words",
        "timezone",
        "enabled",
        "overlap",
        "next fire (UTC)",
        "last run",
    )
    for schedule in found:
        shown = schedule.to_dict()
        last = shown["last_run"]
        table.add_row(  # Text cells: a stored value is never read as markup
            _text(schedule.id),
            _text(schedule.name),
            _text(schedule.pipeline),
            _text(schedule.cron),
            _text(shown["cron_text"] or "-"),
            _text(schedule.timezone),
            _text("yes" if schedule.enabled else "no (paused)"),
            _text(schedule.overlap),
            _text(shown["next_fire_at"] or "-"),
            _text("-" if last is None else f"{last['id']} {last['status'] or ''}".strip()),
        )
    Console().print(table)
    if not found:
        _say("no schedules; `pipeline schedule add NAME --cron EXPR` adds one")
    return 0


def _set_enabled(settings: Settings, name: str, *, enabled: bool) -> Schedule:
    with _schedule_service(settings) as service:
        current = _schedule_named(service, name)
        changed = _checked_schedule(
            lambda: service.update_schedule(current.id, {"enabled": enabled})
        )
    if changed is None:  # removed meanwhile
        raise UsageError(f"no schedule named {name!r}", exit_code=SCHEDULE_REFUSED)
    return changed


def cmd_schedule_pause(settings: Settings, args: argparse.Namespace) -> int:
    paused = _set_enabled(settings, args.name, enabled=False)
    _say(f"schedule {paused.name!r} paused; it starts no run until resumed")
    return 0


def cmd_schedule_resume(settings: Settings, args: argparse.Namespace) -> int:
    resumed = _set_enabled(settings, args.name, enabled=True)
    _say(f"schedule {resumed.name!r} resumed; {_next_fire_text(resumed)}")
    return 0


def cmd_schedule_remove(settings: Settings, args: argparse.Namespace) -> int:
    with _schedule_service(settings) as service:
        current = _schedule_named(service, args.name)
        if not service.delete_schedule(current.id):  # removed meanwhile
            raise UsageError(f"no schedule named {args.name!r}", exit_code=SCHEDULE_REFUSED)
    _say(f"schedule {current.name!r} (id {current.id}) removed; the runs it started are kept")
    return 0


SCHEDULE_COMMANDS = {
    "add": cmd_schedule_add,
    "list": cmd_schedule_list,
    "pause": cmd_schedule_pause,
    "resume": cmd_schedule_resume,
    "remove": cmd_schedule_remove,
}


def cmd_schedule(settings: Settings, args: argparse.Namespace) -> int:
    return SCHEDULE_COMMANDS[args.schedule_command](settings, args)


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
    run.add_argument("--pipeline", help="the pipeline to run (required when several are loaded)")
    run.add_argument("--params", help="the run's parameters, a JSON object")
    run.add_argument(
        "--wait",
        action="store_true",
        help="execute here with live progress; exit 0 completed, 1 failed, 2 cancelled",
    )
    status = sub.add_parser("status", help="print one run as JSON")
    status.add_argument("run_id", type=_run_id)
    show = sub.add_parser("show", help="a run for a person: phases, warnings, its artifacts")
    show.add_argument("run_id", type=_run_id)
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
    _add_schedule_parser(sub)
    return parser


def _add_schedule_parser(sub: Any) -> None:
    schedule = sub.add_parser("schedule", help="runs of a pipeline on a cron expression")
    actions = schedule.add_subparsers(dest="schedule_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="add a schedule (prints its id)")
    add.add_argument("name", metavar="NAME", help="a slug: [a-z0-9][a-z0-9_-]{0,63}, unique")
    add.add_argument("--pipeline", help="the pipeline it runs (required when several are loaded)")
    add.add_argument("--cron", required=True, metavar="EXPR", help="e.g. '0 6 * * MON-FRI', @daily")
    add.add_argument("--timezone", metavar="TZ", help="an IANA time zone name (default UTC)")
    add.add_argument("--params", metavar="JSON", help="the runs' parameters, a JSON object")
    add.add_argument(
        "--overlap",
        choices=SCHEDULE_OVERLAPS,
        help="while one of its runs is queued or running: skip a tick (default), queue it, "
        "or allow another run",
    )
    add.add_argument(
        "--catch-up",
        choices=SCHEDULE_CATCH_UPS,
        help="after downtime: fire once for the latest missed tick (default), or none",
    )
    add.add_argument("--disabled", action="store_true", help="add it paused")
    actions.add_parser("list", help="a table of the schedules and their next fire times")
    for action, what in (
        ("pause", "start no run until resumed"),
        ("resume", "fire again, from the next tick on"),
        ("remove", "delete it (the runs it started are kept)"),
    ):
        one = actions.add_parser(action, help=what)
        one.add_argument("name", metavar="NAME")


COMMANDS = {
    "migrate": cmd_migrate,
    "run": cmd_run,
    "serve": cmd_serve,
    "worker": cmd_worker,
    "prune": cmd_prune,
    "status": cmd_status,
    "show": cmd_show,
    "list": cmd_list,
    "schedule": cmd_schedule,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
    except ValidationError as exc:  # a bad PIPELINE_* value: named, never echoed
        _error(_configuration_error(exc), _configured_url())
        return 64
    url = settings.database_url
    configure_logging(settings.log_format, logging.DEBUG if args.verbose else logging.INFO)
    if args.command != "migrate":  # schema checks would log Alembic's chatter
        logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        _check_url(url)
        return COMMANDS[args.command](settings, args)
    except UsageError as exc:
        _error(str(exc), url)
        return exc.exit_code
    except (RegistryError, db.SchemaNotCurrent) as exc:
        _error(str(exc), url)
        return 64
    except db.DatabaseBusy as exc:  # busy, or unavailable: say why, when the driver said
        cause = f" ({describe(exc.__cause__)})" if exc.__cause__ is not None else ""
        _error(f"{exc}{cause}", url)
        return 64
    except DatabaseError as exc:
        _error(str(exc), url)
        return 1
    except sa.exc.SQLAlchemyError as exc:  # one line; -v logs the traceback
        logging.getLogger("pipeline.cli").debug("database error", exc_info=True)
        _error(f"database error: {describe(exc)}", url)
        return 1


if __name__ == "__main__":
    sys.exit(main())
