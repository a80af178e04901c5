"""The HTTP service: an ``APIRouter`` for runs, and an app factory around it.

Paths, status codes and the Run JSON are DESIGN.md's HTTP contract; clients
are written against them. The router can be included in another FastAPI
application under its own prefix (see the README); its routes keep their
browser defences there (``pipeline.security``).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any, Literal

import anyio.to_thread
from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    Header,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
)
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from pipeline import db, runs, schedules, security
from pipeline.config import Settings, get_settings
from pipeline.metrics import Metrics
from pipeline.orchestrator import UnknownPipeline, retry_policy
from pipeline.params import InvalidParams, parse_json, validate_params
from pipeline.pipelines import Pipeline, Registry, field_errors
from pipeline.runs import Outcome, PhasesChanged, Run, RunStatus
from pipeline.schedules import Schedule
from pipeline.security import StreamSlots
from pipeline.service import NotFound, QueueFull, Service
from pipeline.watch import Subscription, Watcher

log = logging.getLogger("pipeline.api")

MAX_BODY_BYTES = 64 * 1024
MAX_ID = 2**63 - 1
# How often an event stream reads its run: one indexed read by primary key
# (about a millisecond), twice a second per open stream. That keeps sub-progress
# within about a second of the runner and costs SQLite nothing noticeable even
# with dozens of streams; an unchanged run sends nothing.
EVENTS_POLL_SECONDS = 0.5
RETRY_AFTER_SECONDS = "1"
# When a full queue or a full set of event streams may have room again: a queue
# drains at the pace of runs, streams free up as runs end or clients leave.
QUEUE_FULL_RETRY_AFTER_SECONDS = 30
STREAMS_FULL_RETRY_AFTER_SECONDS = 5

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
    has_result: bool


class ArtifactRef(_Strict):
    key: str
    phase: int
    kind: Literal["markdown", "table", "chart"]
    title: str | None


class ArtifactOut(ArtifactRef):
    created_at: str


class ArtifactPage(_Strict):
    items: list[ArtifactOut]


class ArtifactDetail(ArtifactOut):
    data: Any = Field(description="markdown: a string; table and chart: an object")


class ResultOut(_Strict):
    phase: int
    result: Any = Field(description="the phase's return value, any JSON value")


class RunOut(_Strict):
    id: int
    pipeline: str
    schedule_id: int | None = Field(description="the schedule that started the run, if any")
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
    artifacts: list[ArtifactRef]


class LastRunOut(_Strict):
    id: int
    status: RunStatus | None = Field(description="null once the run was pruned")


class ScheduleOut(_Strict):
    id: int
    name: str
    pipeline: str
    params: dict[str, Any]
    cron: str
    timezone: str
    enabled: bool
    overlap: Literal["skip", "queue", "allow"]
    catch_up: Literal["latest", "none"]
    next_fire_at: str | None = Field(description="null while disabled")
    last_fired_at: str | None
    created_at: str
    cron_text: str | None = Field(description="the cron expression in words, where it can be said")
    last_run: LastRunOut | None = Field(description="the last run a tick of it started")


class SchedulePage(_Strict):
    items: list[ScheduleOut]


class PipelinePhaseOut(_Strict):
    num: int
    label: str
    retries: int


class PipelineOut(_Strict):
    name: str
    description: str
    phases: list[PipelinePhaseOut]
    params_schema: dict[str, Any] | None = Field(
        description="the params model's JSON Schema; null: any JSON object"
    )


class PipelinePage(_Strict):
    items: list[PipelineOut]


class RunPage(_Strict):
    items: list[RunOut]
    next_before: int | None


class Health(_Strict):
    status: Literal["ok"]


class ErrorOut(BaseModel):
    detail: Any


# -- errors -----------------------------------------------------------------------


def _route_class(metrics: Metrics) -> type[APIRoute]:
    """Routes that time themselves, refuse browsers of other sites, and turn a locked
    database into a 503.

    Done in the route class (not app middleware or an exception handler) so
    that all of it holds when a host application includes the router: a
    cross-site request (403) or a body that is not JSON (415) is refused
    before the route does anything (``pipeline.security``), and every answer
    of the API carries ``nosniff`` and ``Cache-Control: no-store``.
    """

    class Route(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()
            template = self.path_format

            async def handle(request: Request) -> Response:
                started = time.perf_counter()
                status = 500
                try:
                    refused = security.refusal(request)
                    if refused is not None:
                        status = refused.status_code
                        return refused
                    response = await handler(request)
                    status = response.status_code
                    for name, value in security.API_HEADERS.items():
                        response.headers.setdefault(name, value)
                    return response
                except HTTPException as exc:
                    status = exc.status_code
                    exc.headers = {**security.API_HEADERS, **(exc.headers or {})}
                    raise
                except RequestValidationError:
                    status = 422
                    raise
                except db.DatabaseBusy as exc:
                    status = 503
                    return JSONResponse(
                        {"detail": str(exc)},
                        status_code=503,
                        headers={**security.API_HEADERS, "Retry-After": RETRY_AFTER_SECONDS},
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
                    "pipeline": {
                        "anyOf": [{"type": "string"}, {"type": "null"}],
                        "description": (
                            "the pipeline to run (GET /pipelines); may be left out "
                            "only when the service has exactly one"
                        ),
                    },
                    "params": {
                        "anyOf": [{"type": "object"}, {"type": "null"}],
                        "description": (
                            "the run's parameters, given to every phase; checked by the "
                            "pipeline's params model (its params_schema) if it has one"
                        ),
                    },
                },
            }
        }
    },
}


_SCHEDULE_PROPERTIES: dict[str, Any] = {
    "name": {"type": "string", "description": "a slug, unique: [a-z0-9][a-z0-9_-]{0,63}"},
    "pipeline": {
        "anyOf": [{"type": "string"}, {"type": "null"}],
        "description": "the pipeline it starts (GET /pipelines); optional with one",
    },
    "params": {
        "anyOf": [{"type": "object"}, {"type": "null"}],
        "description": "the runs' parameters, checked like POST /runs",
    },
    "cron": {"type": "string", "description": "5 fields, or @hourly, @daily, @weekly, ..."},
    "timezone": {"type": "string", "description": "an IANA name; default UTC"},
    "enabled": {"type": "boolean", "description": "default true"},
    "overlap": {"enum": ["skip", "queue", "allow"], "description": "default skip"},
    "catch_up": {"enum": ["latest", "none"], "description": "default latest"},
}


def _json_body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    schema = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = required
    return {"required": True, "content": {"application/json": {"schema": schema}}}


_SCHEDULE_CREATE = _json_body(_SCHEDULE_PROPERTIES, ["name", "cron"])
_SCHEDULE_PATCH = _json_body(
    {k: v for k, v in _SCHEDULE_PROPERTIES.items() if k not in ("name", "pipeline")}, []
)


async def _read_object(request: Request) -> dict[str, Any]:
    """A JSON object body (at most 64 KiB, checked as params are), or a 422."""
    try:
        raw = await _read_limited(request)
    except ClientDisconnect:
        raise HTTPException(400, "the request body was not received") from None
    try:
        payload = parse_json(raw) if raw.strip() else None
    except InvalidParams as exc:
        raise _bad_body(f"the body is {exc}" if str(exc).startswith("not ") else str(exc)) from None
    if not isinstance(payload, dict):
        raise _bad_body("the body must be a JSON object")
    return payload


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


def parse_create_body(raw: bytes) -> tuple[str | None, dict[str, Any]]:
    """The pipeline and params of ``POST /runs``, or a 422 that says what is wrong.

    Params pass ``pipeline.params`` here; the pipeline's params model, if it
    has one, checks them next (``Service.create_run``).
    """
    if len(raw) > MAX_BODY_BYTES:
        raise _bad_body(f"the body is larger than {MAX_BODY_BYTES // 1024} KiB")
    if not raw.strip():
        return None, {}
    try:
        payload = parse_json(raw)
    except InvalidParams as exc:
        raise _bad_body(f"the body is {exc}" if str(exc).startswith("not ") else str(exc)) from None
    if not isinstance(payload, dict):
        raise _bad_body('the body must be a JSON object, like {"params": {}}')
    unknown = sorted(set(payload) - {"params", "pipeline"})
    if unknown:
        raise _bad_body(
            f"unknown field(s): {', '.join(unknown)}; only 'pipeline' and 'params' are accepted"
        )
    pipeline = payload.get("pipeline")
    if pipeline is not None and not isinstance(pipeline, str):
        raise _bad_body("'pipeline' must be a pipeline's name (a string)")
    try:
        return pipeline, validate_params(payload.get("params"))
    except InvalidParams as exc:
        raise _bad_body(str(exc)) from None


MAX_IDEMPOTENCY_KEY = 255


def _idempotency_key(value: str | None) -> str | None:
    """The header's key, or a 422: 1 to 255 printable ASCII characters."""
    if value is None:
        return None
    if not 1 <= len(value) <= MAX_IDEMPOTENCY_KEY or not all(" " <= c <= "~" for c in value):
        raise _bad_body(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"
        )
    return value


def _body_hash(pipeline: str | None, params: dict[str, Any]) -> str:
    """What makes two bodies the same request: the pipeline named and the params, canonical."""
    canonical = json.dumps(
        {"pipeline": pipeline, "params": params}, sort_keys=True, ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def describe_pipeline(pipeline: Pipeline) -> dict[str, Any]:
    """A pipeline as ``GET /pipelines`` shows it."""
    return {
        "name": pipeline.name,
        "description": pipeline.description,
        "phases": [
            {"num": num, "label": label, "retries": retry_policy(fn).retries}
            for num, label, fn in pipeline.phases
        ],
        "params_schema": pipeline.params_schema(),
    }


# -- the router ----------------------------------------------------------------------

RunId = Annotated[int, Path(ge=1, le=MAX_ID, description="the run's id")]
PhaseNum = Annotated[int, Path(ge=1, le=2**31 - 1, description="the phase's number")]
ArtifactKey = Annotated[str, Path(max_length=200, description="the artifact's key (a slug)")]


def _require_token(token: str | None) -> Callable[[Request], Coroutine[Any, Any, None]]:
    expected = None if token is None else token.encode()

    # async: FastAPI runs a plain function dependency in its thread pool, a
    # hop (and a fight for the GIL) per request for a comparison of bytes.
    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), expected):
            raise HTTPException(
                401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
            )

    return check


class _SlotStream(EventSourceResponse):
    """An event stream that gives its slot back when it ends, whichever way it ends."""

    def __init__(
        self, content: AsyncIterator[ServerSentEvent], *, slots: StreamSlots, client: str
    ) -> None:
        super().__init__(content, ping=15)
        self._slots = slots
        self._client = client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._slots.release(self._client)


def create_router(
    service: Service, *, stream_slots: StreamSlots | None = None, watcher: Watcher | None = None
) -> APIRouter:
    """The runs API, bound to one service (database, registry, executor).

    ``stream_slots`` counts its open event streams (by default its own, with
    the caps of ``service.settings``); ``watcher`` feeds ``GET /events`` (by
    default its own, see :func:`watcher_for`).
    """
    settings = service.settings
    slots = stream_slots or StreamSlots(
        total=settings.max_event_streams, per_client=settings.max_streams_per_client
    )
    router = APIRouter(
        route_class=_route_class(service.metrics),
        dependencies=[Depends(_require_token(service.settings.api_token))],
        responses={
            403: {"model": ErrorOut, "description": "a request from another site"},
            503: {"model": ErrorOut, "description": "database busy; retry later"},
        },
    )

    def found(run: Run | None, run_id: int) -> dict[str, Any]:
        if run is None:
            raise _not_found(run_id)
        return run.to_dict()

    # SQLite reads a run from the local file in well under a millisecond, with
    # the GIL held: in the thread pool they bought no parallelism, only hops
    # and a fight for the GIL among the pool's threads (2.4x the server CPU
    # per GET /runs/{id}, bench "API"). A WAL reader never waits for a writer,
    # so the event loop does it. A server database's reads wait on the network
    # and may wait for a connection: those stay in the thread pool.
    read_inline = db.is_sqlite(service.engine)

    async def read(fn: Callable[[int], Run | None], run_id: int) -> Run | None:
        if read_inline:
            return fn(run_id)
        return await anyio.to_thread.run_sync(fn, run_id)

    @router.post(
        "/runs",
        status_code=201,
        response_model=RunOut,
        openapi_extra={"requestBody": _CREATE_SCHEMA},
        responses={
            200: {
                "model": RunOut,
                "description": "the run an earlier request with this Idempotency-Key created",
            },
            415: {"model": ErrorOut, "description": "the body is not application/json"},
            422: {
                "model": ErrorOut,
                "description": (
                    "a malformed body, an unknown pipeline (the known ones listed), or params "
                    "the pipeline's model refuses: then detail is every field error, "
                    "[{loc, msg, type}]"
                ),
            },
            429: {"model": ErrorOut, "description": "too many runs queued; retry later"},
        },
    )
    async def create_run(
        request: Request,
        response: Response,
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                description=(
                    "at most 255 printable ASCII characters: the same key with the same body "
                    "within 24 hours returns the run it created (200), nothing new created"
                ),
            ),
        ] = None,
    ) -> Any:
        """Queue a run; it starts as soon as a slot is free."""
        key = _idempotency_key(idempotency_key)
        try:
            raw = await _read_limited(request)
        except ClientDisconnect:  # the client left mid-body: nothing to answer, nothing done
            raise HTTPException(400, "the request body was not received") from None
        pipeline, params = parse_create_body(raw)
        idempotency = None if key is None else (key, _body_hash(pipeline, params))
        try:
            run, created = await anyio.to_thread.run_sync(
                service.create_or_replay, params, pipeline, idempotency
            )
        except runs.IdempotencyMismatch as exc:
            raise _bad_body(str(exc)) from None
        except UnknownPipeline as exc:
            raise _bad_body(str(exc)) from None
        except InvalidParams as exc:
            raise _bad_body(str(exc)) from None
        except ValidationError as exc:
            raise HTTPException(422, field_errors(exc)) from None
        except QueueFull as exc:
            return security.busy(str(exc), status=429, retry_after=QUEUE_FULL_RETRY_AFTER_SECONDS)
        response.headers["Location"] = request.url_for("get_run", run_id=run.id).path
        if not created:
            response.status_code = 200
        return run.to_dict()

    @router.get("/runs", response_model=RunPage)
    def list_runs(
        status: RunStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        before: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
        pipeline: Annotated[
            str | None,
            Query(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", description="only runs of this pipeline"),
        ] = None,
    ) -> dict[str, Any]:
        """Runs, newest first; pass ``next_before`` as ``before`` for the next page."""
        page, cursor = service.list_runs(
            status=status, limit=limit, before=before, pipeline=pipeline
        )
        return {"items": [run.to_dict() for run in page], "next_before": cursor}

    @router.get("/pipelines", response_model=PipelinePage)
    def list_pipelines() -> dict[str, Any]:
        """The pipelines this service runs: phases, retries and params schema."""
        return {"items": [describe_pipeline(p) for p in service.pipelines.values()]}

    @router.get("/runs/{run_id}", response_model=RunOut, responses={404: {"model": ErrorOut}})
    async def get_run(run_id: RunId) -> Response:
        """One run, with its phases and warnings."""
        run = await read(service.get_run, run_id)
        if run is None:
            raise _not_found(run_id)
        # What every watcher polls: encoded once, as the event streams send it
        # (``run_json``), not validated again against RunOut and re-encoded
        # (an eighth of the request's server CPU, bench "API"). RunOut still
        # documents it, and tests/test_api.py checks the two agree.
        return Response(run_json(run), media_type="application/json")

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
        responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut}, 415: {"model": ErrorOut}},
    )
    def cancel_run(run_id: RunId) -> dict[str, Any]:
        """Ask a run to stop: at once if queued, at the next phase boundary if running."""
        outcome, run = service.cancel(run_id)
        return act(outcome, run, run_id, "only queued or running runs can be cancelled")

    @router.post(
        "/runs/{run_id}/resume",
        status_code=202,
        response_model=RunOut,
        responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut}, 415: {"model": ErrorOut}},
    )
    def resume_run(run_id: RunId) -> dict[str, Any]:
        """Queue a failed or cancelled run again, from its first phase not completed."""
        try:
            outcome, run = service.resume(run_id)
        except PhasesChanged as exc:
            raise HTTPException(409, str(exc)) from None
        return act(outcome, run, run_id, "only failed or cancelled runs can resume")

    def lookup(fetch: Callable[[], Any]) -> Any:
        try:
            return fetch()
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None

    @router.get(
        "/runs/{run_id}/phases/{num}/result",
        response_model=ResultOut,
        responses={404: {"model": ErrorOut}},
    )
    def get_result(run_id: RunId, num: PhaseNum) -> dict[str, Any]:
        """A phase's result: its return value, stored when it committed."""
        return {"phase": num, "result": lookup(lambda: service.get_result(run_id, num))}

    @router.get(
        "/runs/{run_id}/artifacts",
        response_model=ArtifactPage,
        responses={404: {"model": ErrorOut}},
    )
    def list_artifacts(run_id: RunId) -> dict[str, Any]:
        """What the run's phases published (without the data), in phase order."""
        found = lookup(lambda: service.list_artifacts(run_id))
        return {"items": [a.to_dict() for a in found]}

    @router.get(
        "/runs/{run_id}/artifacts/{key}",
        response_model=ArtifactDetail,
        responses={404: {"model": ErrorOut}},
    )
    def get_artifact(run_id: RunId, key: ArtifactKey) -> dict[str, Any]:
        """One artifact, with its data."""
        found = lookup(lambda: service.get_artifact(run_id, key))
        result: dict[str, Any] = found.to_dict()
        return result

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
            503: {"model": ErrorOut, "description": "too many open streams, or database busy"},
        },
    )
    async def run_events(run_id: RunId, request: Request) -> Response:
        """Server-sent events: a ``run`` event at each change, until the run ends.

        Open streams are capped overall and per client address (503 beyond).
        """
        first = await anyio.to_thread.run_sync(service.get_run, run_id)
        if first is None:
            raise _not_found(run_id)
        client = security.client_key(request)
        full = slots.acquire(client)
        if full is not None:
            return security.busy(full, status=503, retry_after=STREAMS_FULL_RETRY_AFTER_SECONDS)
        return _SlotStream(_run_events(service, first, request), slots=slots, client=client)

    watcher = watcher or watcher_for(service)
    service.on_stop(watcher.stop)

    @router.get(
        "/events",
        response_class=EventSourceResponse,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "run events"},
            503: {"model": ErrorOut, "description": "too many open streams, or database busy"},
        },
    )
    async def all_events(
        request: Request,
        pipeline: Annotated[
            str | None,
            Query(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", description="only runs of this pipeline"),
        ] = None,
    ) -> Response:
        """Server-sent events: a ``run`` event whenever any run is created or changes.

        What a list view follows instead of one stream per run: it starts with
        the runs queued or running now, then every change. One watcher per
        process reads the database for all its subscribers.
        """
        client = security.client_key(request)
        full = slots.acquire(client)
        if full is not None:
            return security.busy(full, status=503, retry_after=STREAMS_FULL_RETRY_AFTER_SECONDS)
        try:
            sub = await watcher.subscribe(pipeline)
        except BaseException:
            slots.release(client)
            raise
        return _SlotStream(
            _watched_events(service, watcher, sub, request), slots=slots, client=client
        )

    _add_schedule_routes(router, service)
    return router


async def _watched_events(
    service: Service, watcher: Watcher, sub: Subscription, request: Request
) -> AsyncIterator[ServerSentEvent]:
    try:
        while not sub.dropped:
            try:
                data = await asyncio.wait_for(sub.queue.get(), timeout=EVENTS_POLL_SECONDS)
            except TimeoutError:
                if service.stopping or await request.is_disconnected():
                    return
                continue
            yield ServerSentEvent(data=data, event="run")
    finally:
        watcher.unsubscribe(sub)


ScheduleId = Annotated[int, Path(ge=1, le=MAX_ID, description="the schedule's id")]


def _add_schedule_routes(router: APIRouter, service: Service) -> None:
    """``/schedules``: runs on a clock (DESIGN.md, "Schedules"; ``pipeline.schedules``)."""
    invalid = {
        "model": ErrorOut,
        "description": (
            "bad cron, unknown time zone, unknown pipeline, invalid params (every field "
            "error, [{loc, msg, type}]), or a field it cannot have"
        ),
    }

    def checked(call: Callable[[], Schedule | None], schedule_id: int | None = None) -> Any:
        try:
            found = call()
        except schedules.InvalidSchedule as exc:
            raise _bad_body(str(exc)) from None
        except ValidationError as exc:
            raise HTTPException(422, field_errors(exc)) from None
        except schedules.NameTaken as exc:
            raise HTTPException(409, str(exc)) from None
        if found is None:
            raise HTTPException(404, f"no schedule with id {schedule_id}")
        return found.to_dict()

    @router.get("/schedules", response_model=SchedulePage)
    def list_schedules() -> dict[str, Any]:
        """Every schedule, by name."""
        return {"items": [s.to_dict() for s in service.list_schedules()]}

    @router.post(
        "/schedules",
        status_code=201,
        response_model=ScheduleOut,
        openapi_extra={"requestBody": _SCHEDULE_CREATE},
        responses={409: {"model": ErrorOut, "description": "the name is taken"}, 422: invalid},
    )
    async def create_schedule(request: Request, response: Response) -> Any:
        """Start runs of a pipeline on a cron expression, in a time zone."""
        payload = await _read_object(request)
        body = await anyio.to_thread.run_sync(
            checked, functools.partial(service.create_schedule, payload)
        )
        response.headers["Location"] = request.url_for("get_schedule", schedule_id=body["id"]).path
        return body

    @router.get(
        "/schedules/{schedule_id}",
        response_model=ScheduleOut,
        responses={404: {"model": ErrorOut}},
    )
    def get_schedule(schedule_id: ScheduleId) -> Any:
        """One schedule, with its next fire time and the last run it started."""
        return checked(lambda: service.get_schedule(schedule_id), schedule_id)

    @router.patch(
        "/schedules/{schedule_id}",
        response_model=ScheduleOut,
        openapi_extra={"requestBody": _SCHEDULE_PATCH},
        responses={404: {"model": ErrorOut}, 422: invalid},
    )
    async def update_schedule(schedule_id: ScheduleId, request: Request) -> Any:
        """Change its cron, time zone, params, overlap or catch-up; pause or resume it."""
        payload = await _read_object(request)
        change = functools.partial(service.update_schedule, schedule_id, payload)
        return await anyio.to_thread.run_sync(checked, change, schedule_id)

    @router.delete(
        "/schedules/{schedule_id}",
        status_code=204,
        response_class=Response,
        responses={404: {"model": ErrorOut}},
    )
    def delete_schedule(schedule_id: ScheduleId) -> Response:
        """Delete it; the runs it started stay (their schedule_id still says which)."""
        if not service.delete_schedule(schedule_id):
            raise HTTPException(404, f"no schedule with id {schedule_id}")
        return Response(status_code=204)


def watcher_for(service: Service) -> Watcher:
    """The one watcher of every run that a process's ``GET /events`` streams share."""
    return Watcher(service.watched_runs, run_json, interval=EVENTS_POLL_SECONDS)


def run_json(run: Run) -> str:
    """The Run JSON of ``GET /runs/{id}`` and of every event: never ``NaN``.

    (``NaN`` could be in a row stored before params were checked.)
    """
    value = run.to_dict()
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError:  # what REST's serializer does with such a float: null
        return RunOut.model_validate(value).model_dump_json()


async def _run_events(
    service: Service, first: Run, request: Request
) -> AsyncIterator[ServerSentEvent]:
    run: Run | None = first
    last = None
    while run is not None:
        data = run_json(run)
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


# Swagger UI and ReDoc, served from the fastapi-offline package's files: the docs
# load nothing from another host (a CDN script would run on the origin where the
# dashboard keeps its token), and they work offline.
DOCS_ASSETS = "/docs-assets"


def _docs_assets_dir() -> Any:
    return resources.files("fastapi_offline") / "static"


def create_app(
    settings: Settings | None = None,
    *,
    registry: Registry | Pipeline | Sequence[Pipeline] | None = None,
    bound_host: str | None = None,
    clock: schedules.Clock | None = None,
) -> FastAPI:
    """The whole service: the runs API at the root, the dashboard at ``/``, ``/healthz``.

    It answers only the allowed ``Host`` names (``PIPELINE_ALLOWED_HOSTS``; by
    default the loopback names and ``bound_host``, the host the server listens
    on, which ``pipeline serve`` passes). ``clock`` is what schedules fire by
    (the database's clock when None; tests walk one through hours in seconds).
    """
    settings = settings or get_settings()
    service = Service(settings, registry, clock=clock)
    stream_slots = StreamSlots(
        total=settings.max_event_streams, per_client=settings.max_streams_per_client
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with service.lifespan():
            yield

    app = FastAPI(
        title="analysis-pipeline",
        version="0.1.0",
        summary="Start long analysis runs and watch every phase of them.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    app.state.stream_slots = stream_slots
    app.state.watcher = watcher_for(service)
    service.on_runs_changed(app.state.watcher.wake)
    app.include_router(create_router(service, stream_slots=stream_slots, watcher=app.state.watcher))
    # The last added is the outermost: even a refused Host gets the headers.
    app.add_middleware(
        security.AllowedHosts, hosts=security.allowed_hosts(settings.allowed_hosts, bound_host)
    )
    app.add_middleware(security.SecurityHeaders)

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
        return FileResponse(str(dashboard / "index.html"), headers=dict(security.DASHBOARD_HEADERS))

    app.mount("/static", StaticFiles(directory=str(dashboard)), name="static")
    _add_docs(app)
    return app


def _add_docs(app: FastAPI) -> None:
    """``/docs`` (Swagger UI) and ``/redoc``, with every asset served from this app."""
    openapi_url = app.openapi_url or "/openapi.json"
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(_docs_assets_dir())), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            oauth2_redirect_url=None,
            # No badge from the public validator: nothing is sent to another host.
            swagger_ui_parameters={"validatorUrl": None},
        )
        page.headers.update(security.DOCS_HEADERS)
        return page

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )
        page.headers.update(security.DOCS_HEADERS)
        return page
