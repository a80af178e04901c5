"""The HTTP service: an ``APIRouter`` for runs, and an app factory around it.

Paths, status codes and the Run JSON are DESIGN.md's HTTP contract; clients
are written against them. The router can be included in another FastAPI
application under its own prefix (see the README).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any, Literal

import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import ClientDisconnect

from pipeline import db
from pipeline.config import Settings, get_settings
from pipeline.metrics import Metrics
from pipeline.orchestrator import Registry
from pipeline.runs import Outcome, PhasesChanged, Run, RunStatus
from pipeline.service import Service

log = logging.getLogger("pipeline.api")

MAX_BODY_BYTES = 64 * 1024
MAX_DEPTH = 32
MAX_ID = 2**63 - 1
# How often an event stream reads its run: one indexed read by primary key
# (about a millisecond), twice a second per open stream. That keeps sub-progress
# within about a second of the runner and costs SQLite nothing noticeable even
# with dozens of streams; an unchanged run sends nothing.
EVENTS_POLL_SECONDS = 0.5
RETRY_AFTER_SECONDS = "1"

# -- the Run JSON ---------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WarningOut(_Strict):
    phase: int | None
    message: str


class PhaseOut(_Strict):
    num: int
    label: str
    status: Literal["pending", "running", "completed", "failed", "cancelled"]
    attempts: int
    started_at: str | None
    finished_at: str | None
    duration_ms: int | None


class RunOut(_Strict):
    id: int
    status: RunStatus
    params: dict[str, Any]
    current_phase: int | None
    phase_label: str | None
    progress_current: int
    progress_total: int | None
    phase_progress_current: int | None
    phase_progress_total: int | None
    percent: float
    warnings: list[WarningOut]
    error_message: str | None
    created_at: str
    started_at: str | None
    completed_at: str | None
    cancel_requested_at: str | None
    phases: list[PhaseOut]


class RunPage(_Strict):
    items: list[RunOut]
    next_before: int | None


class Health(_Strict):
    status: Literal["ok"]


class ErrorOut(BaseModel):
    detail: Any


# -- errors -----------------------------------------------------------------------


def _route_class(metrics: Metrics) -> type[APIRoute]:
    """Routes that time themselves and turn a locked database into a 503.

    Done in the route class (not app middleware or an exception handler) so
    that both hold when a host application includes the router.
    """

    class Route(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()
            template = self.path_format

            async def handle(request: Request) -> Response:
                started = time.perf_counter()
                status = 500
                try:
                    response = await handler(request)
                    status = response.status_code
                    return response
                except HTTPException as exc:
                    status = exc.status_code
                    raise
                except RequestValidationError:
                    status = 422
                    raise
                except db.DatabaseBusy as exc:
                    status = 503
                    return JSONResponse(
                        {"detail": str(exc)},
                        status_code=503,
                        headers={"Retry-After": RETRY_AFTER_SECONDS},
                    )
                finally:
                    elapsed = time.perf_counter() - started
                    labels = (request.method, template, str(status))
                    metrics.http_duration.labels(*labels).observe(elapsed)

            return handle

    return Route


def _not_found(run_id: int) -> HTTPException:
    return HTTPException(404, f"no run with id {run_id}")


def _bad_body(message: str) -> HTTPException:
    return HTTPException(422, message)


# -- request bodies ----------------------------------------------------------------

_CREATE_SCHEMA = {
    "required": False,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "params": {
                        "anyOf": [{"type": "object"}, {"type": "null"}],
                        "description": "the run's parameters, given to every phase",
                    }
                },
            }
        }
    },
}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: valid JSON syntax, but no JSON can say it back
        raise ValueError(f"{text} is out of range")
    return value


def _depth(value: Any) -> int:
    """Nesting depth, iteratively (a deep document must not exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


async def _read_limited(request: Request) -> bytes:
    """The body, refused as soon as it is known to be too large (never buffered whole)."""
    too_large = _bad_body(f"the body is larger than {MAX_BODY_BYTES // 1024} KiB")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse_create_body(raw: bytes) -> dict[str, Any]:
    """The params of ``POST /runs``, or a 422 that says what is wrong."""
    if len(raw) > MAX_BODY_BYTES:
        raise _bad_body(f"the body is larger than {MAX_BODY_BYTES // 1024} KiB")
    if not raw.strip():
        return {}
    try:
        payload = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        raise _bad_body("the body is not valid JSON (numbers must be finite)") from None
    if not isinstance(payload, dict):
        raise _bad_body('the body must be a JSON object, like {"params": {}}')
    unknown = sorted(set(payload) - {"params"})
    if unknown:
        raise _bad_body(f"unknown field(s): {', '.join(unknown)}; only 'params' is accepted")
    params = payload.get("params")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise _bad_body("'params' must be a JSON object (or null)")
    if _depth(params) > MAX_DEPTH:
        raise _bad_body(f"'params' is nested deeper than {MAX_DEPTH} levels")
    try:  # a lone surrogate (\ud800) parses, but cannot be stored or sent back as UTF-8
        json.dumps(params, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise _bad_body("'params' contains text that is not valid Unicode") from None
    return params


# -- the router ----------------------------------------------------------------------

RunId = Annotated[int, Path(ge=1, le=MAX_ID, description="the run's id")]


def _require_token(token: str | None) -> Callable[[Request], None]:
    expected = None if token is None else token.encode()

    def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), expected):
            raise HTTPException(
                401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
            )

    return check


def create_router(service: Service) -> APIRouter:
    """The runs API, bound to one service (database, registry, executor)."""
    router = APIRouter(
        route_class=_route_class(service.metrics),
        dependencies=[Depends(_require_token(service.settings.api_token))],
        responses={503: {"model": ErrorOut, "description": "database busy; retry later"}},
    )

    def found(run: Run | None, run_id: int) -> dict[str, Any]:
        if run is None:
            raise _not_found(run_id)
        return run.to_dict()

    @router.post(
        "/runs",
        status_code=201,
        response_model=RunOut,
        openapi_extra={"requestBody": _CREATE_SCHEMA},
        responses={422: {"model": ErrorOut}},
    )
    async def create_run(request: Request, response: Response) -> dict[str, Any]:
        """Queue a run; it starts as soon as a slot is free."""
        try:
            raw = await _read_limited(request)
        except ClientDisconnect:  # the client left mid-body: nothing to answer, nothing done
            raise HTTPException(400, "the request body was not received") from None
        params = parse_create_body(raw)
        run = await anyio.to_thread.run_sync(service.create_run, params)
        response.headers["Location"] = request.url_for("get_run", run_id=run.id).path
        return run.to_dict()

    @router.get("/runs", response_model=RunPage)
    def list_runs(
        status: RunStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        before: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    ) -> dict[str, Any]:
        """Runs, newest first; pass ``next_before`` as ``before`` for the next page."""
        page, cursor = service.list_runs(status=status, limit=limit, before=before)
        return {"items": [run.to_dict() for run in page], "next_before": cursor}

    @router.get("/runs/{run_id}", response_model=RunOut, responses={404: {"model": ErrorOut}})
    def get_run(run_id: RunId) -> dict[str, Any]:
        """One run, with its phases and warnings."""
        return found(service.get_run(run_id), run_id)

    def act(outcome: Outcome, run: Run | None, run_id: int, why: str) -> dict[str, Any]:
        if outcome is Outcome.NOT_FOUND:
            raise _not_found(run_id)
        if outcome is Outcome.CONFLICT:
            status = run.status.value if run else "gone"
            raise HTTPException(409, f"the run is {status}; {why}")
        return found(run, run_id)

    @router.post(
        "/runs/{run_id}/cancel",
        status_code=202,
        response_model=RunOut,
        responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut}},
    )
    def cancel_run(run_id: RunId) -> dict[str, Any]:
        """Ask a run to stop: at once if queued, at the next phase boundary if running."""
        outcome, run = service.cancel(run_id)
        return act(outcome, run, run_id, "only queued or running runs can be cancelled")

    @router.post(
        "/runs/{run_id}/resume",
        status_code=202,
        response_model=RunOut,
        responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut}},
    )
    def resume_run(run_id: RunId) -> dict[str, Any]:
        """Queue a failed or cancelled run again, from its first phase not completed."""
        try:
            outcome, run = service.resume(run_id)
        except PhasesChanged as exc:
            raise HTTPException(409, str(exc)) from None
        return act(outcome, run, run_id, "only failed or cancelled runs can resume")

    @router.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
    )
    def metrics() -> Response:
        """Prometheus metrics of this process (and run counts from the database)."""
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.get(
        "/runs/{run_id}/events",
        response_class=EventSourceResponse,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "run events"},
            404: {"model": ErrorOut},
        },
    )
    async def run_events(run_id: RunId, request: Request) -> EventSourceResponse:
        """Server-sent events: a ``run`` event at each change, until the run ends."""
        first = await anyio.to_thread.run_sync(service.get_run, run_id)
        if first is None:
            raise _not_found(run_id)
        return EventSourceResponse(_run_events(service, first, request), ping=15)

    return router


async def _run_events(
    service: Service, first: Run, request: Request
) -> AsyncIterator[ServerSentEvent]:
    run: Run | None = first
    last = None
    while run is not None:
        data = json.dumps(run.to_dict(), separators=(",", ":"))
        if data != last:
            yield ServerSentEvent(data=data, event="run")
            last = data
        # A stopping server ends its streams so that it can drain; clients
        # reconnect to the next server (the dashboard does).
        if run.status.terminal or service.stopping or await request.is_disconnected():
            return
        await asyncio.sleep(EVENTS_POLL_SECONDS)
        try:
            run = await anyio.to_thread.run_sync(service.get_run, first.id)
        except db.DatabaseBusy:
            continue


# -- the application -------------------------------------------------------------------


def _dashboard_dir() -> Any:
    return resources.files("pipeline") / "dashboard"


def create_app(settings: Settings | None = None, *, registry: Registry | None = None) -> FastAPI:
    """The whole service: the runs API at the root, the dashboard at ``/``, ``/healthz``."""
    settings = settings or get_settings()
    service = Service(settings, registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with service.lifespan():
            yield

    app = FastAPI(
        title="analysis-pipeline",
        version="0.1.0",
        summary="Start long analysis runs and watch every phase of them.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.include_router(create_router(service))

    @app.get("/healthz", response_model=Health, responses={503: {"model": ErrorOut}})
    def healthz() -> Any:
        """200 when the database answers and is at the migration head."""
        problem = service.health()
        if problem is not None:
            return JSONResponse({"detail": problem}, status_code=503)
        return {"status": "ok"}

    dashboard = _dashboard_dir()

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(str(dashboard / "index.html"))

    app.mount("/static", StaticFiles(directory=str(dashboard)), name="static")
    return app
