"""DESIGN.md's HTTP contract, endpoint by endpoint, through FastAPI's TestClient.

Every test runs the real application (its lifespan included) on a fresh migrated
SQLite file, with a small registry whose phases are steered by the run's own
params: ``hold`` (phase numbers that wait on the test's gate), ``check_cancel``
(phase numbers that call ``raise_if_cancelled()`` after the gate), ``fail_once``
(a phase number that raises the first time it runs) and ``warn``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy.engine import Connection, Engine

from pipeline import api, db, liveness, runs
from pipeline.api import RunOut, create_app
from pipeline.config import Settings
from pipeline.liveness import process_identity
from pipeline.orchestrator import RunContext
from pipeline.schema import analysis_runs, run_phases
from pipeline.service import Service

from .conftest import read_run, scalar, wait_for

# -- the contract, as DESIGN.md writes it ----------------------------------------------

RUN_FIELDS = {
    "id",
    "pipeline",
    "schedule_id",
    "status",
    "params",
    "current_phase",
    "phase_label",
    "progress_current",
    "progress_total",
    "phase_progress_current",
    "phase_progress_total",
    "percent",
    "warnings",
    "error_message",
    "created_at",
    "started_at",
    "completed_at",
    "cancel_requested_at",
    "phases",
    "artifacts",
}
PHASE_FIELDS = {
    "num",
    "label",
    "status",
    "attempts",
    "started_at",
    "finished_at",
    "duration_ms",
    "has_result",
}
WARNING_FIELDS = {"phase", "message"}
TERMINAL = {"completed", "failed", "cancelled"}

# What must never reach a client in an error body.
LEAK_MARKERS = ("Traceback", "SELECT", "INSERT", "UPDATE ", 'File "', "/tmp", ".py")  # noqa: S108

WAIT = 10.0  # seconds a held phase waits for the test before it gives up (and fails)
LABELS = ("A", "B", "C", "D")


# -- helpers ------------------------------------------------------------------------


def error_detail(response: Any, status: int) -> Any:
    """Assert an error answer: the status, a JSON ``detail``, and nothing internal in it."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"detail"}, body
    assert body["detail"], body
    assert_leaks_nothing(response.text)
    return body["detail"]


def assert_leaks_nothing(text: str) -> None:
    """No traceback, SQL, driver name or file path in what a client reads."""
    for marker in LEAK_MARKERS:
        assert marker not in text, f"{marker!r} leaked into an error body: {text}"
    for driver in ("sqlite", "psycopg"):
        assert driver not in text.lower(), f"the driver leaked into an error body: {text}"


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Server-sent events as ``(event name, JSON data)``, per the EventSource format."""
    name, data = "message", list[str]()
    for line in lines:
        if line == "":
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", list[str]()
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
    if data:
        yield name, json.loads("\n".join(data))


class Gates:
    """Holds phases in place until the test lets them go: deterministic, no sleeps."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entered: dict[Hashable, threading.Event] = {}
        self._released: dict[Hashable, threading.Event] = {}
        self._all_open = False

    def _event(self, table: dict[Hashable, threading.Event], key: Hashable) -> threading.Event:
        with self._lock:
            event = table.setdefault(key, threading.Event())
            if self._all_open and table is self._released:
                event.set()
            return event

    def hold(self, key: Hashable) -> None:
        """Called by a phase: say it is here, then wait to be released."""
        self._event(self._entered, key).set()
        if not self._event(self._released, key).wait(WAIT):
            raise TimeoutError(f"the test never released {key}")

    def wait_entered(self, key: Hashable) -> None:
        assert self._event(self._entered, key).wait(WAIT), f"{key} was never entered"

    def release(self, key: Hashable) -> None:
        self._event(self._released, key).set()

    def open_all(self) -> None:
        with self._lock:
            self._all_open = True
            events = list(self._released.values())
        for event in events:
            event.set()


class Harness:
    """One test's database, the phases' shared records, and a way to serve the app."""

    def __init__(self, db_url: str, engine: Engine) -> None:
        self.db_url = db_url
        self.engine = engine
        self.gates = Gates()
        self._lock = threading.Lock()
        self.calls: list[tuple[int, int]] = []  # (run_id, phase) per execution
        self.started: list[int] = []  # run ids, in the order their first phase began
        self.active = 0
        self.max_active = 0
        self._failed_once: set[int] = set()

    def phase(self, conn: Connection, ctx: RunContext) -> None:
        """The one phase function of every test registry: it does what the params say."""
        with self._lock:
            self.calls.append((ctx.run_id, ctx.phase_num))
            if ctx.run_id not in self.started:
                self.started.append(ctx.run_id)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            ctx.progress(1, 2)
            if ctx.params.get("warn"):
                ctx.warn(f"note from {ctx.phase_label}")
            # Held before its first statement, so a held phase keeps no write lock
            # (BEGIN IMMEDIATE is sent with the first statement): the API can write.
            if ctx.phase_num in ctx.params.get("hold", ()):
                self.gates.hold((ctx.run_id, ctx.phase_num))
            conn.execute(
                sa.text("INSERT INTO items (run_id, phase) VALUES (:run_id, :phase)"),
                {"run_id": ctx.run_id, "phase": ctx.phase_num},
            )
            if ctx.phase_num in ctx.params.get("check_cancel", ()):
                ctx.raise_if_cancelled()
            if ctx.phase_num == ctx.params.get("fail_once"):
                with self._lock:
                    first_time = ctx.run_id not in self._failed_once
                    self._failed_once.add(ctx.run_id)
                if first_time:
                    raise RuntimeError(f"phase {ctx.phase_num} broke")
        finally:
            with self._lock:
                self.active -= 1

    def registry(self, phases: int = 2) -> list[tuple[int, str, Callable[..., None]]]:
        return [(n, LABELS[n - 1], self.phase) for n in range(1, phases + 1)]

    @contextmanager
    def serve(
        self,
        phases: int = 2,
        *,
        raise_server_exceptions: bool = True,
        **settings: Any,
    ) -> Iterator[TestClient]:
        """The whole app, lifespan included; held phases are let go before it stops."""
        # Explicit, so that no PIPELINE_* variable of the environment changes what is tested.
        settings = {"api_token": None, "executor": "thread", "auto_resume": False} | settings
        app = create_app(
            Settings(database_url=self.db_url, **settings), registry=self.registry(phases)
        )
        with TestClient(app, raise_server_exceptions=raise_server_exceptions) as client:
            try:
                yield client
            finally:
                self.gates.open_all()

    def wait_started(self, count: int) -> None:
        """Until ``count`` runs have begun their first phase."""
        wait_for(lambda: len(self.started) >= count, timeout=WAIT)

    def executions(self, run_id: int, phase: int) -> int:
        with self._lock:
            return self.calls.count((run_id, phase))

    def item_phases(self, run_id: int) -> list[int]:
        with db.read(self.engine) as conn:
            rows = conn.execute(
                sa.text("SELECT phase FROM items WHERE run_id = :run_id ORDER BY phase"),
                {"run_id": run_id},
            )
            return [row[0] for row in rows]

    def run_count(self) -> int:
        return int(scalar(self.engine, "SELECT count(*) FROM analysis_runs"))


@contextmanager
def harness(url: str) -> Iterator[Harness]:
    engine = db.create_engine(url)
    try:
        with db.write(engine) as conn:
            conn.exec_driver_sql(
                "CREATE TABLE items (run_id INTEGER NOT NULL, phase INTEGER NOT NULL)"
            )
        yield Harness(url, engine)
    finally:
        engine.dispose()


@pytest.fixture
def h(db_url: str) -> Iterator[Harness]:
    """A harness on a fresh migrated database (every backend), with an ``items`` table."""
    with harness(db_url) as made:
        yield made


@pytest.fixture
def h_sqlite(sqlite_url: str) -> Iterator[Harness]:
    """The same, on a SQLite file only: for SQLite's own locking."""
    with harness(sqlite_url) as made:
        yield made


def post_run(client: TestClient, params: dict[str, Any] | None = None) -> dict[str, Any]:
    response = client.post("/runs", json={"params": params or {}})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_status(client: TestClient, run_id: int, *statuses: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        run: dict[str, Any] = client.get(f"/runs/{run_id}").json()
        return run if run["status"] in statuses else None

    return wait_for(check, timeout=WAIT)


def insert_runs(engine: Engine, statuses: Iterable[str], **values: Any) -> list[int]:
    """Rows written straight into the table (no runner), oldest first."""
    ids = []
    with db.write(engine) as conn:
        for status in statuses:
            now = runs.utcnow()
            row: dict[str, Any] = {
                "status": status,
                "params": {},
                "progress_current": 0,
                "created_at": now,
                "completed_at": now if status in TERMINAL else None,
            }
            row.update(values)
            result = conn.execute(
                sa.insert(analysis_runs).values(**row).returning(analysis_runs.c.id)
            )
            ids.append(int(result.scalar_one()))
    return ids


def noop(conn: Connection, ctx: RunContext) -> None:
    """A phase that does nothing (for apps that never get to run one)."""


def live_owner() -> str:
    """An owner naming a live process of this host (the test's parent), as its runner would.

    Not this process: here, a run that no runner of ours executes is lost.
    """
    return f"{process_identity(os.getppid())}:some-thread"


# -- POST /runs ------------------------------------------------------------------------


def test_create_answers_201_with_location_and_exactly_the_run_fields(h: Harness) -> None:
    """POST /runs is 201 with Location /runs/{id} and a body holding exactly the Run fields."""
    with h.serve() as client:
        response = client.post("/runs", json={"params": {"warn": True, "subreddit": "python"}})
        assert response.status_code == 201, response.text
        body = response.json()
        assert set(body) == RUN_FIELDS
        assert response.headers["location"] == f"/runs/{body['id']}"
        assert body["status"] in ("queued", "running")
        assert body["params"] == {"warn": True, "subreddit": "python"}
        assert body["created_at"].endswith("Z")
        assert body["completed_at"] is None
        done = wait_status(client, body["id"], "completed")
    assert set(done) == RUN_FIELDS
    assert len(done["phases"]) == 2
    assert all(set(phase) == PHASE_FIELDS for phase in done["phases"])
    assert [w["message"] for w in done["warnings"]] == ["note from A", "note from B"]
    assert all(set(warning) == WARNING_FIELDS for warning in done["warnings"])
    assert done["percent"] == 100.0
    assert done["completed_at"].endswith("Z")


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        pytest.param(b"", {}, id="empty-body"),
        pytest.param(b"", {"content-type": "application/json"}, id="empty-body-json-type"),
        pytest.param(b"  \n", {"content-type": "application/json"}, id="whitespace-body"),
        pytest.param(b"{}", {"content-type": "application/json"}, id="empty-object"),
        pytest.param(b'{"params": null}', {"content-type": "application/json"}, id="params-null"),
        pytest.param(b'{"params": {}}', {"content-type": "application/json"}, id="params-empty"),
    ],
)
def test_create_without_params_means_empty_params(
    h: Harness, content: bytes, headers: dict[str, str]
) -> None:
    """An empty body, ``{}`` and ``{"params": null}`` all start a run with params ``{}``."""
    with h.serve() as client:
        response = client.post("/runs", content=content, headers=headers)
        assert response.status_code == 201, response.text
        assert response.json()["params"] == {}
        run_id = response.json()["id"]
        assert wait_status(client, run_id, "completed")["params"] == {}


def test_create_returns_at_once_while_the_first_phase_is_held(h: Harness) -> None:
    """The 201 arrives while phase 1 is still held by the test; the run finishes only after."""
    with h.serve() as client:
        body = post_run(client, {"hold": [1]})
        run_id = body["id"]
        assert body["status"] in ("queued", "running")
        h.gates.wait_entered((run_id, 1))
        running = client.get(f"/runs/{run_id}").json()
        assert (running["status"], running["current_phase"]) == ("running", 1)
        assert h.executions(run_id, 2) == 0
        h.gates.release((run_id, 1))
        assert wait_status(client, run_id, "completed")["progress_current"] == 2


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


BAD_BODIES = [
    pytest.param(b"{", id="truncated-json"),
    pytest.param(b"params=1", id="form-encoded"),
    pytest.param(b"\xff\xfe\x00", id="not-utf8"),
    pytest.param(b"[]", id="list"),
    pytest.param(b'[{"params": {}}]', id="list-of-object"),
    pytest.param(b'"params"', id="string"),
    pytest.param(b"42", id="number"),
    pytest.param(b"true", id="boolean"),
    pytest.param(b"null", id="null"),
    pytest.param(b'{"params": {}, "priority": 1}', id="unknown-field"),
    pytest.param(b'{"parameters": {}}', id="misspelt-field"),
    pytest.param(b'{"params": []}', id="params-list"),
    pytest.param(b'{"params": "a=1"}', id="params-string"),
    pytest.param(b'{"params": 3}', id="params-number"),
    pytest.param(b'{"params": false}', id="params-boolean"),
    pytest.param(json.dumps({"params": {"blob": "x" * (64 * 1024)}}).encode(), id="over-64KiB"),
    pytest.param(json.dumps({"params": _nested(33)}).encode(), id="params-nested-33"),
    pytest.param(b'{"params": {"a": ' + b"[" * 40 + b"]" * 40 + b"}}", id="params-nested-lists-41"),
    pytest.param(b'{"params": {"a": ' + b"[" * 30000 + b"}}", id="bracket-bomb"),
    pytest.param(b'{"params": {"x": NaN}}', id="NaN"),
    pytest.param(b'{"params": {"x": Infinity}}', id="Infinity"),
    pytest.param(b'{"params": {"x": -Infinity}}', id="minus-Infinity"),
    pytest.param(b'{"params": {"x": 1e400}}', id="overflows-to-infinity"),
    pytest.param(b'{"params": {"x": [-1e999]}}', id="overflows-to-minus-infinity"),
    pytest.param(b'{"params": {"x": "\\ud800"}}', id="lone-surrogate-in-a-value"),
    pytest.param(b'{"params": {"\\udc00": 1}}', id="lone-surrogate-in-a-key"),
]


@pytest.mark.parametrize("content", BAD_BODIES)
def test_create_rejects_bad_bodies_with_422_and_changes_nothing(h: Harness, content: bytes) -> None:
    """Each malformed body is a 422 with a JSON detail, no run row appears, listing still works."""
    with h.serve(raise_server_exceptions=False) as client:
        before = h.run_count()
        response = client.post(
            "/runs", content=content, headers={"content-type": "application/json"}
        )
        detail = error_detail(response, 422)
        assert isinstance(detail, str)
        assert h.run_count() == before == 0
        assert client.get("/runs").json() == {"items": [], "next_before": None}


@pytest.mark.parametrize(
    "params",
    [
        pytest.param(_nested(32), id="nested-32"),
        pytest.param({"blob": "x" * (64 * 1024 - 100)}, id="just-under-64KiB"),
        pytest.param({"big": 2**70, "unicode": "é ü 🙂", "list": [1, None, 2.5]}, id="varied"),
    ],
)
def test_create_accepts_params_at_the_limits(h: Harness, params: dict[str, Any]) -> None:
    """Params exactly at the depth and size limits are accepted and returned as given."""
    with h.serve() as client:
        body = post_run(client, params)
        assert body["params"] == params
        assert client.get(f"/runs/{body['id']}").json()["params"] == params


# -- GET /runs/{id} --------------------------------------------------------------------


def test_get_run_answers_the_run(h: Harness) -> None:
    """GET /runs/{id} is 200 with the same Run the POST described, up to date."""
    with h.serve() as client:
        created = post_run(client, {"k": "v"})
        response = client.get(f"/runs/{created['id']}")
        assert response.status_code == 200
        assert set(response.json()) == RUN_FIELDS
        assert response.json()["id"] == created["id"]
        assert response.json()["created_at"] == created["created_at"]


def test_get_run_is_exactly_the_documented_run_json_and_the_events_data(h: Harness) -> None:
    """GET /runs/{id} (encoded once, as the event streams encode it) is RunOut's JSON.

    A finished run with phases and warnings: the body validates against the
    schema OpenAPI documents (no field missing, none extra, each of its type)
    and is what that model would have sent, and the same as its event data.
    """
    with h.serve() as client:
        created = post_run(client, {"warn": True})
        done = wait_status(client, created["id"], "completed")
        response = client.get(f"/runs/{created['id']}")
        events = client.get(f"/runs/{created['id']}/events")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body == done
    assert body["phases"]
    assert body["warnings"]
    assert RunOut.model_validate(body).model_dump(mode="json") == body
    data = [line[5:] for line in events.text.splitlines() if line.startswith("data:")]
    assert [json.loads(d) for d in data] == [body]


def test_get_run_sends_a_stored_nan_as_null(h_sqlite: Harness) -> None:
    """A params value stored before params were checked (NaN) reads as null, never as NaN.

    ``NaN`` is not JSON: a client's parser would refuse the whole run.
    """
    [run_id] = insert_runs(h_sqlite.engine, ["failed"], params={"x": float("nan"), "y": 1})
    with h_sqlite.serve() as client:
        response = client.get(f"/runs/{run_id}")
    assert response.status_code == 200, response.text
    assert b"NaN" not in response.content
    assert response.json()["params"] == {"x": None, "y": 1}


@pytest.mark.parametrize(
    "run_id",
    [
        pytest.param(999, id="never-created"),
        pytest.param(2**31, id="beyond-int32"),
        pytest.param(2**63 - 1, id="max-int64"),
    ],
)
def test_get_unknown_run_is_404(h: Harness, run_id: int) -> None:
    """An id that names no run is a 404 with a detail, for every per-run endpoint (64-bit ids)."""
    with h.serve(raise_server_exceptions=False) as client:
        post_run(client)
        for method, suffix in (
            ("GET", ""),
            ("GET", "/events"),
            ("POST", "/cancel"),
            ("POST", "/resume"),
        ):
            detail = error_detail(client.request(method, f"/runs/{run_id}{suffix}"), 404)
            assert str(run_id) in detail, (method, suffix)


BAD_IDS = [
    pytest.param("abc", id="not-a-number"),
    pytest.param("1.5", id="decimal"),
    pytest.param("1e3", id="exponent"),
    pytest.param("0", id="zero"),
    pytest.param("-1", id="negative"),
    pytest.param(str(2**63), id="beyond-int64"),
    pytest.param("1" + "0" * 40, id="huge"),
]


@pytest.mark.parametrize("run_id", BAD_IDS)
def test_bad_run_ids_are_422(h: Harness, run_id: str) -> None:
    """A path id that is not an integer in 1..2**63-1 is a 422 on every per-run endpoint."""
    with h.serve() as client:
        for method, suffix in (
            ("GET", ""),
            ("GET", "/events"),
            ("POST", "/cancel"),
            ("POST", "/resume"),
        ):
            error_detail(client.request(method, f"/runs/{run_id}{suffix}"), 422)
        assert h.run_count() == 0


def test_no_error_body_leaks_internals(h: Harness) -> None:
    """Across every kind of error the API gives, no traceback, SQL, driver or path is shown."""
    with h.serve() as client:
        done = wait_status(client, post_run(client)["id"], "completed")["id"]
        failed = wait_status(client, post_run(client, {"fail_once": 1})["id"], "failed")
        assert failed["error_message"] == "phase 1 broke"
        requests: list[tuple[str, str, bytes | None, int]] = [
            ("GET", "/runs/12345", None, 404),
            ("GET", "/runs/12345/events", None, 404),
            ("POST", "/runs/12345/cancel", None, 404),
            ("POST", "/runs/12345/resume", None, 404),
            ("GET", "/runs/x", None, 422),
            ("GET", f"/runs/{2**64}", None, 422),
            ("GET", "/runs?limit=0", None, 422),
            ("GET", "/runs?status=nope", None, 422),
            ("GET", "/runs?before=-5", None, 422),
            ("POST", f"/runs/{done}/cancel", None, 409),
            ("POST", f"/runs/{done}/resume", None, 409),
            ("POST", f"/runs/{failed['id']}/cancel", None, 409),
            ("POST", "/runs", b"{", 422),
            ("POST", "/runs", b'{"params": {"x": NaN}}', 422),
            ("POST", "/runs", b'{"params": 1, "x": 2}', 422),
        ]
        bodies = []
        for method, path, content, status in requests:
            headers = {"content-type": "application/json"} if content else {}
            response = client.request(method, path, content=content, headers=headers)
            error_detail(response, status)
            bodies.append(response.text)
    assert len(bodies) == len(requests)
    assert_leaks_nothing("\n".join(bodies))


# -- GET /runs -------------------------------------------------------------------------


def test_list_is_newest_first_with_a_default_limit_of_50(h: Harness) -> None:
    """Without parameters: the 50 newest runs, newest first, and a cursor to the rest."""
    ids = insert_runs(h.engine, ["completed"] * 55)
    with h.serve() as client:
        page = client.get("/runs").json()
        assert set(page) == {"items", "next_before"}
        assert [run["id"] for run in page["items"]] == ids[::-1][:50]
        assert all(set(run) == RUN_FIELDS for run in page["items"])
        assert page["next_before"] == page["items"][-1]["id"] == ids[5]
        everything = client.get("/runs?limit=500").json()
        assert [run["id"] for run in everything["items"]] == ids[::-1]
        assert everything["next_before"] is None


def test_list_filters_by_status(h: Harness) -> None:
    """``status=`` returns only runs in that state, for each of the five states."""
    owner = live_owner()
    ids = {
        "completed": insert_runs(h.engine, ["completed"] * 2),
        "failed": insert_runs(h.engine, ["failed"] * 3),
        "cancelled": insert_runs(h.engine, ["cancelled"]),
        "running": insert_runs(h.engine, ["running"], owner=owner, current_phase=1),
        "queued": insert_runs(h.engine, ["queued"], owner=owner),  # reserved: nobody starts it
    }
    with h.serve() as client:
        for status, expected in ids.items():
            page = client.get("/runs", params={"status": status}).json()
            assert [run["id"] for run in page["items"]] == expected[::-1], status
            assert {run["status"] for run in page["items"]} == {status}
            assert page["next_before"] is None
        assert len(client.get("/runs").json()["items"]) == 8


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        pytest.param("limit=1", 1, id="limit-1"),
        pytest.param("limit=3", 3, id="limit-3"),
        pytest.param("limit=500", 4, id="limit-500"),
    ],
)
def test_list_limit_within_bounds(h: Harness, query: str, expected: int) -> None:
    """``limit`` from 1 to 500 caps the page size."""
    insert_runs(h.engine, ["completed"] * 4)
    with h.serve() as client:
        response = client.get(f"/runs?{query}")
        assert response.status_code == 200
        assert len(response.json()["items"]) == expected


@pytest.mark.parametrize(
    "query",
    [
        pytest.param("limit=0", id="limit-0"),
        pytest.param("limit=501", id="limit-501"),
        pytest.param("limit=-1", id="limit-negative"),
        pytest.param("limit=ten", id="limit-not-a-number"),
        pytest.param("status=bogus", id="status-unknown"),
        pytest.param("status=COMPLETED", id="status-wrong-case"),
        pytest.param("status=", id="status-empty"),
        pytest.param("before=0", id="before-0"),
        pytest.param("before=-3", id="before-negative"),
        pytest.param("before=abc", id="before-not-a-number"),
        pytest.param(f"before={2**63}", id="before-beyond-int64"),
    ],
)
def test_list_bad_filters_are_422(h: Harness, query: str) -> None:
    """A limit outside 1..500, an unknown status or a bad cursor is a 422 with a detail."""
    insert_runs(h.engine, ["completed"])
    with h.serve() as client:
        error_detail(client.get(f"/runs?{query}"), 422)


@pytest.mark.parametrize(
    "before", [pytest.param(2**31, id="beyond-int32"), pytest.param(2**63 - 1, id="max-int64")]
)
def test_list_with_a_cursor_beyond_every_id_lists_from_the_newest(h: Harness, before: int) -> None:
    """A ``before`` larger than any id (up to 2**63-1) is valid and pages from the newest run."""
    ids = insert_runs(h.engine, ["completed"] * 2)
    with h.serve(raise_server_exceptions=False) as client:
        response = client.get("/runs", params={"before": before})
        assert response.status_code == 200, response.text
        assert [run["id"] for run in response.json()["items"]] == ids[::-1]


def test_list_pages_through_every_run_exactly_once(h: Harness) -> None:
    """Following ``next_before`` with limit 3 over 7 runs yields each id once, newest first."""
    ids = insert_runs(h.engine, ["completed", "failed", "cancelled"] * 2 + ["completed"])
    with h.serve() as client:
        seen: list[int] = []
        cursors: list[int | None] = []
        query: dict[str, Any] = {"limit": 3}
        while True:
            page = client.get("/runs", params=query).json()
            seen += [run["id"] for run in page["items"]]
            cursors.append(page["next_before"])
            if page["next_before"] is None:
                break
            assert page["next_before"] == page["items"][-1]["id"]
            query = {"limit": 3, "before": page["next_before"]}
        assert seen == ids[::-1]
        assert cursors == [ids[4], ids[1], None]
        # A page that ends exactly at the oldest run has no cursor.
        last = client.get("/runs", params={"limit": 1, "before": ids[1]}).json()
        assert [run["id"] for run in last["items"]] == [ids[0]]
        assert last["next_before"] is None
        # The cursor combines with the status filter.
        failed = client.get("/runs", params={"status": "failed", "limit": 1}).json()
        assert [run["id"] for run in failed["items"]] == [ids[4]]
        rest = client.get(
            "/runs", params={"status": "failed", "limit": 1, "before": failed["next_before"]}
        ).json()
        assert [run["id"] for run in rest["items"]] == [ids[1]]
        assert rest["next_before"] is None


# -- POST /runs/{id}/cancel ------------------------------------------------------------


def test_cancel_a_queued_run_cancels_it_at_once(h: Harness) -> None:
    """A queued run is 202 ``cancelled`` at once, with both timestamps, and never executes."""
    with h.serve(max_concurrent_runs=1) as client:
        blocker = post_run(client, {"hold": [1]})["id"]
        h.gates.wait_entered((blocker, 1))
        queued = post_run(client)["id"]
        assert client.get(f"/runs/{queued}").json()["status"] == "queued"
        response = client.post(f"/runs/{queued}/cancel")
        assert response.status_code == 202, response.text
        body = response.json()
        assert set(body) == RUN_FIELDS
        assert body["status"] == "cancelled"
        assert body["completed_at"] is not None
        assert body["cancel_requested_at"] is not None
        h.gates.release((blocker, 1))
        wait_status(client, blocker, "completed")
    assert h.executions(queued, 1) == 0
    assert read_run(h.engine, queued).status is runs.RunStatus.CANCELLED


def test_cancel_a_running_run_stops_it_at_the_next_boundary(h: Harness) -> None:
    """Cancel during phase 1: phase 1 still commits its rows, phase 2 never runs, run cancelled."""
    with h.serve() as client:
        run_id = post_run(client, {"hold": [1]})["id"]
        h.gates.wait_entered((run_id, 1))
        response = client.post(f"/runs/{run_id}/cancel")
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "running"
        assert response.json()["cancel_requested_at"] is not None
        assert response.json()["completed_at"] is None
        h.gates.release((run_id, 1))
        run = wait_status(client, run_id, *TERMINAL)
    assert run["status"] == "cancelled"
    assert run["completed_at"] is not None
    assert run["progress_current"] == 1
    assert [p["status"] for p in run["phases"]] == ["completed", "pending"]
    assert h.item_phases(run_id) == [1]
    assert (h.executions(run_id, 1), h.executions(run_id, 2)) == (1, 0)


def test_cancel_inside_a_cooperative_phase_rolls_that_phase_back(h: Harness) -> None:
    """A phase that calls raise_if_cancelled() after the request loses its rows; run cancelled."""
    with h.serve() as client:
        run_id = post_run(client, {"hold": [1], "check_cancel": [1]})["id"]
        h.gates.wait_entered((run_id, 1))
        assert client.post(f"/runs/{run_id}/cancel").status_code == 202
        h.gates.release((run_id, 1))
        run = wait_status(client, run_id, *TERMINAL)
    assert run["status"] == "cancelled"
    assert run["error_message"] is None
    assert run["completed_at"] is not None
    assert run["progress_current"] == 0
    assert [p["status"] for p in run["phases"]] == ["cancelled", "pending"]
    assert h.item_phases(run_id) == []
    assert h.executions(run_id, 2) == 0


def test_cancel_an_already_cancelled_run_is_202_again(h: Harness) -> None:
    """A second cancel of a cancelled run is still 202 and changes nothing."""
    with h.serve(max_concurrent_runs=1) as client:
        blocker = post_run(client, {"hold": [1]})["id"]
        h.gates.wait_entered((blocker, 1))
        queued = post_run(client)["id"]
        first = client.post(f"/runs/{queued}/cancel").json()
        again = client.post(f"/runs/{queued}/cancel")
        assert again.status_code == 202, again.text
        assert again.json() == first


@pytest.mark.parametrize(
    ("params", "status"),
    [
        pytest.param({}, "completed", id="completed"),
        pytest.param({"fail_once": 2}, "failed", id="failed"),
    ],
)
def test_cancel_a_finished_run_is_409(h: Harness, params: dict[str, Any], status: str) -> None:
    """A completed or failed run cannot be cancelled: 409 with a detail, and it stays as it was."""
    with h.serve() as client:
        run_id = post_run(client, params)["id"]
        before = wait_status(client, run_id, status)
        detail = error_detail(client.post(f"/runs/{run_id}/cancel"), 409)
        assert status in detail
        assert client.get(f"/runs/{run_id}").json() == before


# -- POST /runs/{id}/resume ------------------------------------------------------------


def test_resume_a_failed_run_continues_from_the_failed_phase(h: Harness) -> None:
    """Phase 3 of 4 fails once; resume is 202 queued, phases 1-2 never rerun, the run completes."""
    with h.serve(phases=4, max_concurrent_runs=1) as client:
        run_id = post_run(client, {"fail_once": 3})["id"]
        failed = wait_status(client, run_id, *TERMINAL)
        assert failed["status"] == "failed"
        assert failed["error_message"] == "phase 3 broke"
        assert [p["status"] for p in failed["phases"]] == [
            "completed",
            "completed",
            "failed",
            "pending",
        ]
        # Keep the only slot busy, so the resumed run is seen waiting in the queue.
        blocker = post_run(client, {"hold": [1]})["id"]
        h.gates.wait_entered((blocker, 1))
        response = client.post(f"/runs/{run_id}/resume")
        assert response.status_code == 202, response.text
        resumed = response.json()
        assert set(resumed) == RUN_FIELDS
        assert resumed["status"] == "queued"
        assert resumed["error_message"] is None
        assert resumed["completed_at"] is None
        assert resumed["cancel_requested_at"] is None
        assert resumed["started_at"] == failed["started_at"]
        assert resumed["created_at"] == failed["created_at"]
        h.gates.release((blocker, 1))
        done = wait_status(client, run_id, *TERMINAL)
    assert done["status"] == "completed"
    assert done["error_message"] is None
    assert done["started_at"] == failed["started_at"]
    assert done["percent"] == 100.0
    assert [h.executions(run_id, n) for n in (1, 2, 3, 4)] == [1, 1, 2, 1]
    assert [p["attempts"] for p in done["phases"]] == [1, 1, 2, 1]
    assert h.item_phases(run_id) == [1, 2, 3, 4]


def test_resume_a_cancelled_run_runs_it_to_completion(h: Harness) -> None:
    """A run cancelled while queued resumes (202 queued) and then executes every phase once."""
    with h.serve(max_concurrent_runs=1) as client:
        blocker = post_run(client, {"hold": [1]})["id"]
        h.gates.wait_entered((blocker, 1))
        run_id = post_run(client)["id"]
        assert client.post(f"/runs/{run_id}/cancel").json()["status"] == "cancelled"
        response = client.post(f"/runs/{run_id}/resume")
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "queued"
        assert response.json()["cancel_requested_at"] is None
        assert response.json()["completed_at"] is None
        h.gates.release((blocker, 1))
        done = wait_status(client, run_id, *TERMINAL)
    assert done["status"] == "completed"
    assert [h.executions(run_id, n) for n in (1, 2)] == [1, 1]


@pytest.mark.parametrize("state", ["queued", "running", "completed"])
def test_resume_is_409_unless_failed_or_cancelled(h: Harness, state: str) -> None:
    """Resuming a queued, running or completed run is 409 with a detail, and changes nothing."""
    with h.serve(max_concurrent_runs=1) as client:
        done = post_run(client)["id"]
        wait_status(client, done, "completed")
        running = post_run(client, {"hold": [1]})["id"]
        h.gates.wait_entered((running, 1))
        queued = post_run(client)["id"]
        run_id = {"queued": queued, "running": running, "completed": done}[state]
        before = client.get(f"/runs/{run_id}").json()
        assert before["status"] == state
        detail = error_detail(client.post(f"/runs/{run_id}/resume"), 409)
        assert state in detail
        assert client.get(f"/runs/{run_id}").json()["status"] == state


def test_resume_conflict_detail_reads_well(h: Harness) -> None:
    """The 409 of a resume names the run's state once and has no unfilled placeholder."""
    with h.serve() as client:
        run_id = post_run(client)["id"]
        wait_status(client, run_id, "completed")
        detail = error_detail(client.post(f"/runs/{run_id}/resume"), 409)
        assert "{" not in detail
        assert detail.count("the run is") == 1


# -- GET /runs/{id}/events -------------------------------------------------------------


def test_events_stream_progress_until_the_run_ends(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running run's stream sends ``run`` events as it advances, never dropping, then ends."""
    monkeypatch.setattr(api, "EVENTS_POLL_SECONDS", 0.02)
    with h.serve(phases=3) as client:
        run_id = post_run(client, {"hold": [1, 2, 3]})["id"]
        h.gates.wait_entered((run_id, 1))
        events: list[tuple[str, dict[str, Any]]] = []
        released: set[int] = set()
        with client.stream("GET", f"/runs/{run_id}/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            for name, run in parse_sse(response.iter_lines()):
                events.append((name, run))
                phase = run["current_phase"]
                # Let a phase go only once the stream has shown it, with its sub-progress.
                if (
                    run["status"] == "running"
                    and run["phase_progress_current"] == 1
                    and phase not in released
                ):
                    released.add(phase)
                    h.gates.wait_entered((run_id, phase))
                    h.gates.release((run_id, phase))
    assert released == {1, 2, 3}
    assert {name for name, _ in events} == {"run"}
    assert all(set(run) == RUN_FIELDS for _, run in events)
    statuses = [run["status"] for _, run in events]
    assert statuses[-1] == "completed"
    assert all(status == "running" for status in statuses[:-1])
    percents = [run["percent"] for _, run in events]
    assert percents == sorted(percents), percents
    assert percents[-1] == 100.0
    assert len(set(percents)) >= 4, percents  # it moved more than once on the way
    assert [run["current_phase"] for _, run in events][:-1] == sorted(
        run["current_phase"] for _, run in events[:-1]
    )


def test_events_of_a_finished_run_send_one_event_and_end(h: Harness) -> None:
    """For a run already completed, the stream sends its final state once and closes."""
    with h.serve() as client:
        run_id = post_run(client)["id"]
        final = wait_status(client, run_id, "completed")
        response = client.get(f"/runs/{run_id}/events")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(parse_sse(response.text.splitlines()))
    assert events == [("run", final)]


def test_events_of_an_unknown_run_are_404(h: Harness) -> None:
    """No stream is opened for an id that names no run: a JSON 404."""
    with h.serve() as client:
        error_detail(client.get("/runs/77/events"), 404)


# -- GET /healthz, and starting up -----------------------------------------------------


def test_healthz_is_ok_on_a_migrated_database(h: Harness) -> None:
    """/healthz is 200 {"status": "ok"} when the database answers at the migration head."""
    with h.serve() as client:
        response = client.get("/healthz")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}


def test_healthz_is_503_when_the_database_leaves_the_head(h: Harness) -> None:
    """After a downgrade under the running app, /healthz is 503 with a detail naming the fix."""
    with h.serve() as client:
        command.downgrade(db.alembic_config(h.db_url), "base")
        detail = error_detail(client.get("/healthz"), 503)
        assert "pipeline migrate" in detail


def test_health_of_an_unmigrated_database_names_the_fix(tmp_path: Any) -> None:
    """Service.health() on a never-migrated file explains itself and mentions `pipeline migrate`."""
    service = Service(Settings(database_url=f"sqlite:///{tmp_path / 'blank.db'}"), [(1, "A", noop)])
    try:
        problem = service.health()
    finally:
        service.engine.dispose()
    assert problem is not None
    assert "pipeline migrate" in problem
    assert_leaks_nothing(problem)


def test_start_is_refused_on_an_unmigrated_database(tmp_path: Any) -> None:
    """The app's lifespan refuses a never-migrated file with a message naming `pipeline migrate`."""
    path = tmp_path / "blank.db"
    app = create_app(Settings(database_url=f"sqlite:///{path}"), registry=[(1, "A", noop)])
    try:
        with pytest.raises(db.SchemaNotCurrent, match="pipeline migrate"), TestClient(app):
            pass
    finally:
        app.state.service.engine.dispose()
    with sqlite3.connect(path) as conn:
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    conn.close()
    assert tables == []  # it created nothing on its way out


# -- concurrency, restart --------------------------------------------------------------


def test_at_most_max_concurrent_runs_execute_and_they_start_in_id_order(h: Harness) -> None:
    """With max_concurrent_runs=2 and 5 held runs: never more than 2 run, all end, in id order."""
    with h.serve(phases=1, max_concurrent_runs=2) as client:
        ids = [post_run(client, {"hold": [1]})["id"] for _ in range(5)]
        for released in range(5):
            h.wait_started(min(released + 2, 5))
            running = client.get("/runs", params={"status": "running"}).json()["items"]
            queued = client.get("/runs", params={"status": "queued"}).json()["items"]
            assert len(running) == min(2, 5 - released)
            assert len(queued) == max(0, 3 - released)
            assert h.active <= 2
            h.gates.release((h.started[released], 1))
            wait_status(client, h.started[released], *TERMINAL)
        for run_id in ids:
            assert client.get(f"/runs/{run_id}").json()["status"] == "completed"
    assert h.max_active == 2
    assert sorted(h.started[:2]) == ids[:2]
    assert h.started[2:] == ids[2:]


def test_restart_fails_runs_of_dead_runners_and_spares_live_ones(h: Harness) -> None:
    """At start, a run of a gone process is failed as interrupted; one of ours is untouched."""
    now = runs.utcnow()
    common = {"current_phase": 2, "phase_label": "B", "progress_current": 1, "progress_total": 3}
    common |= {"started_at": now, "heartbeat_at": now}
    dead = f"{liveness.HOST}:999999999:0:t"
    [orphan] = insert_runs(h.engine, ["running"], owner=dead, **common)
    [alive] = insert_runs(h.engine, ["running"], owner=live_owner(), **common)
    with db.write(h.engine) as conn:
        for run_id in (orphan, alive):
            conn.execute(
                sa.insert(run_phases),
                [
                    {
                        "run_id": run_id,
                        "phase_num": 1,
                        "label": "A",
                        "status": "completed",
                        "attempts": 1,
                    },
                    {
                        "run_id": run_id,
                        "phase_num": 2,
                        "label": "B",
                        "status": "running",
                        "attempts": 1,
                    },
                    {
                        "run_id": run_id,
                        "phase_num": 3,
                        "label": "C",
                        "status": "pending",
                        "attempts": 0,
                    },
                ],
            )
    with h.serve(phases=3) as client:
        swept = client.get(f"/runs/{orphan}").json()
        untouched = client.get(f"/runs/{alive}").json()
    assert swept["status"] == "failed"
    assert swept["error_message"] == "interrupted during phase 2 (B)"
    assert swept["completed_at"] is not None
    assert [p["status"] for p in swept["phases"]] == ["completed", "failed", "pending"]
    assert untouched["status"] == "running"
    assert untouched["error_message"] is None
    assert untouched["completed_at"] is None
    assert [p["status"] for p in untouched["phases"]] == ["completed", "running", "pending"]
    assert h.calls == []  # neither was executed again


# -- the API token ---------------------------------------------------------------------

TOKEN = "s3cret"  # noqa: S105 (a test token)
RUN_ENDPOINTS = [
    ("POST", "/runs"),
    ("GET", "/runs"),
    ("GET", "/runs/1"),
    ("POST", "/runs/1/cancel"),
    ("POST", "/runs/1/resume"),
    ("GET", "/runs/1/events"),
]


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-header"),
        pytest.param({"Authorization": "Bearer wrong"}, id="wrong-token"),
        pytest.param({"Authorization": f"Bearer {TOKEN}x"}, id="token-with-suffix"),
        pytest.param({"Authorization": f"Basic {TOKEN}"}, id="wrong-scheme"),
        pytest.param({"Authorization": TOKEN}, id="no-scheme"),
        pytest.param({"Authorization": "Bearer "}, id="empty-token"),
    ],
)
def test_every_runs_endpoint_needs_the_token(h: Harness, headers: dict[str, str]) -> None:
    """With an API token set, each /runs endpoint is 401 without the right bearer token."""
    insert_runs(h.engine, ["completed"])
    with h.serve(api_token=TOKEN) as client:
        for method, path in RUN_ENDPOINTS:
            response = client.request(method, path, headers=headers, json={})
            detail = error_detail(response, 401)
            assert TOKEN not in detail, (method, path)
            assert response.headers.get("www-authenticate") == "Bearer", (method, path)
        assert h.run_count() == 1  # the refused POST created nothing


def test_the_right_token_opens_every_runs_endpoint(h: Harness) -> None:
    """With the right bearer token each /runs endpoint answers as it would without a token."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with h.serve(api_token=TOKEN) as client:
        created = client.post("/runs", json={}, headers=auth)
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        wait_for(
            lambda: client.get(f"/runs/{run_id}", headers=auth).json()["status"] == "completed"
        )
        assert client.get("/runs", headers=auth).status_code == 200
        assert client.get(f"/runs/{run_id}", headers=auth).status_code == 200
        assert client.get(f"/runs/{run_id}/events", headers=auth).status_code == 200
        assert client.post(f"/runs/{run_id}/cancel", headers=auth).status_code == 409
        assert client.post(f"/runs/{run_id}/resume", headers=auth).status_code == 409
        lower = client.get("/runs", headers={"Authorization": f"bearer {TOKEN}"})
        assert lower.status_code == 200  # the scheme is case-insensitive (RFC 7235)


def test_healthz_and_dashboard_need_no_token(h: Harness) -> None:
    """/healthz, / and the dashboard's static files answer without a token."""
    with h.serve(api_token=TOKEN) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        index = client.get("/")
        assert index.status_code == 200
        assert index.headers["content-type"].startswith("text/html")
        assert client.get("/static/index.html").status_code == 200


# -- a locked database -----------------------------------------------------------------


@contextmanager
def write_lock_held(db_url: str) -> Iterator[None]:
    """Another connection holds SQLite's write lock (BEGIN IMMEDIATE) meanwhile."""
    locker = sqlite3.connect(sa.make_url(db_url).database or "", isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        yield
        locker.execute("ROLLBACK")
    finally:
        locker.close()


def test_a_locked_database_is_a_503_with_retry_after(h_sqlite: Harness) -> None:
    """While another connection holds the write lock, writes are 503 + Retry-After, reads work."""
    h = h_sqlite
    with h.serve(busy_timeout_ms=300, raise_server_exceptions=False) as client:
        done = post_run(client)["id"]
        wait_status(client, done, "completed")
        with write_lock_held(h.db_url):
            for method, path in (("POST", "/runs"), ("POST", f"/runs/{done}/cancel")):
                started = time.monotonic()
                response = client.request(method, path, json={})
                elapsed = time.monotonic() - started
                detail = error_detail(response, 503)
                assert int(response.headers["retry-after"]) >= 1
                assert "locked" not in detail.lower()
                # It gives up after about the busy timeout, not many times it.
                assert elapsed < 3.0, f"{method} {path} took {elapsed:.1f}s to answer 503"
            assert client.get(f"/runs/{done}").status_code == 200  # readers never wait
            assert client.get("/runs").status_code == 200
            assert h.run_count() == 1
        after = client.post("/runs", json={})
        assert after.status_code == 201, after.text
        wait_status(client, after.json()["id"], "completed")


def test_a_chunked_body_over_the_limit_is_refused_without_buffering_it(db_url):
    """A body without Content-Length is cut off at 64 KiB: 422, and nothing is created."""

    def chunks():
        yield b'{"params": {"x": "'
        for _ in range(100):
            yield b"y" * 1024
        yield b'"}}'

    app = create_app(Settings(database_url=db_url), registry=[(1, "Noop", lambda c, x: None)])
    with TestClient(app) as client:
        answer = client.post(
            "/runs", content=chunks(), headers={"content-type": "application/json"}
        )
        assert answer.status_code == 422
        assert "64 KiB" in answer.json()["detail"]
        assert client.get("/runs").json()["items"] == []


def test_an_empty_token_setting_is_refused():
    """PIPELINE_API_TOKEN set but empty would accept any "Bearer " header: refused."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="empty"):
        Settings(api_token="  ")  # noqa: S106 - the point is an empty token


def test_get_run_on_sqlite_answers_while_the_thread_pool_is_taken(h_sqlite: Harness) -> None:
    """SQLite's GET /runs/{id} reads on the event loop: no thread-pool hop, no wait for one.

    Every token of the thread pool is taken (as by slow requests); the GET
    still answers at once. (Its cost: bench "API", server CPU per request.)
    """
    import anyio.to_thread

    with h_sqlite.serve() as client:
        run_id = post_run(client)["id"]
        portal = client.portal
        assert portal is not None
        limiter = portal.call(anyio.to_thread.current_default_thread_limiter)
        tokens = limiter.total_tokens
        borrower = object()
        portal.call(limiter.acquire_on_behalf_of, borrower)
        portal.call(setattr, limiter, "total_tokens", 1)
        answer: dict[str, Any] = {}
        reader = threading.Thread(target=lambda: answer.update(r=client.get(f"/runs/{run_id}")))
        try:
            reader.start()
            reader.join(WAIT)
            assert not reader.is_alive(), "GET /runs/{id} waited for the thread pool"
            assert answer["r"].status_code == 200
            assert answer["r"].json()["id"] == run_id
        finally:
            portal.call(limiter.release_on_behalf_of, borrower)
            portal.call(setattr, limiter, "total_tokens", tokens)
            reader.join(WAIT)


def test_one_read_sees_one_instant(engine):
    """A run and its phases are read at one instant, so no answer mixes two states.

    On PostgreSQL's default READ COMMITTED each statement sees its own
    instant: a run read as queued could come with its first phase running
    (seen once in ``GET /events``). A write committed between two statements
    of one read must not show in the second.
    """
    with db.write(engine) as conn:
        run_id = runs.create_run(conn, params={}).id
    with db.read(engine) as conn:
        first = conn.execute(
            sa.select(analysis_runs.c.progress_current).where(analysis_runs.c.id == run_id)
        ).scalar_one()
        with db.write(engine) as other:
            other.execute(
                sa.update(analysis_runs)
                .where(analysis_runs.c.id == run_id)
                .values(progress_current=7)
            )
        second = conn.execute(
            sa.select(analysis_runs.c.progress_current).where(analysis_runs.c.id == run_id)
        ).scalar_one()
    assert (first, second) == (0, 0)
    assert read_run(engine, run_id).progress_current == 7
