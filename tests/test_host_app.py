"""The runs router inside someone else's FastAPI application, under its own prefix.

A host application builds a :class:`pipeline.service.Service` for its own
database and registry, includes ``create_router(service)`` under ``/pipeline``
and enters ``service.lifespan()`` from its own lifespan (see the README).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.engine import Connection

from pipeline.api import create_router
from pipeline.config import Settings
from pipeline.orchestrator import RunContext
from pipeline.service import Service

from .conftest import wait_for

TOKEN = "host-token"  # noqa: S105 (a test token)


@contextmanager
def host_app(database_url: str, **settings: Any) -> Iterator[tuple[TestClient, list[int]]]:
    """A host app with its own ``/hello`` route and the runs API under ``/pipeline``."""
    executed: list[int] = []
    lock = threading.Lock()

    def record(conn: Connection, ctx: RunContext) -> None:
        with lock:
            executed.append(ctx.phase_num)

    registry = [(1, "Host phase one", record), (2, "Host phase two", record)]
    settings = {"api_token": None, "executor": "thread", "auto_resume": False} | settings
    service = Service(Settings(database_url=database_url, **settings), registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with service.lifespan():
            yield

    host = FastAPI(title="someone else's app", lifespan=lifespan)

    @host.get("/hello")
    def hello() -> dict[str, str]:
        return {"hello": "world"}

    host.include_router(create_router(service), prefix="/pipeline")
    with TestClient(host) as client:
        yield client, executed


def test_the_router_works_under_the_host_prefix(db_url: str) -> None:
    """POST /pipeline/runs is 201 with a prefixed Location, the run completes, /hello works."""
    with host_app(db_url) as (client, executed):
        assert client.get("/hello").json() == {"hello": "world"}
        response = client.post("/pipeline/runs", json={"params": {"from": "host"}})
        assert response.status_code == 201, response.text
        run_id = response.json()["id"]
        location = response.headers["location"]
        assert location == f"/pipeline/runs/{run_id}"

        def completed() -> dict[str, Any] | None:
            run: dict[str, Any] = client.get(location).json()
            return run if run["status"] == "completed" else None

        run = wait_for(completed)
        assert run["params"] == {"from": "host"}
        assert [p["label"] for p in run["phases"]] == ["Host phase one", "Host phase two"]
        assert executed == [1, 2]
        page = client.get("/pipeline/runs").json()
        assert [item["id"] for item in page["items"]] == [run_id]
        events = client.get(f"/pipeline/runs/{run_id}/events")
        assert events.headers["content-type"].startswith("text/event-stream")
        assert '"status":"completed"' in events.text
        # Nothing leaks to the host's root, and the host's own routes are untouched.
        assert client.get("/runs").status_code == 404
        missing = client.get("/pipeline/runs/4242")
        assert missing.status_code == 404
        assert missing.json() == {"detail": "no run with id 4242"}
        assert client.get("/hello").json() == {"hello": "world"}
        paths = set(client.get("/openapi.json").json()["paths"])
        assert {"/hello", "/pipeline/runs", "/pipeline/runs/{run_id}"} <= paths


def test_the_token_guards_only_the_router_in_a_host(db_url: str) -> None:
    """With an API token, the host's /pipeline routes need it and the host's own do not."""
    with host_app(db_url, api_token=TOKEN) as (client, _):
        assert client.get("/hello").status_code == 200
        assert client.get("/pipeline/runs").status_code == 401
        assert client.post("/pipeline/runs", json={}).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/pipeline/runs", headers=auth).status_code == 200


def test_a_locked_database_is_a_503_in_a_host_too(sqlite_url: str) -> None:
    """The lock-to-503 translation lives in the router, so a host app gets it without setup."""
    path = sa.make_url(sqlite_url).database or ""
    with host_app(sqlite_url, busy_timeout_ms=200) as (client, _):
        locker = sqlite3.connect(path, isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")
            response = client.post("/pipeline/runs", json={})
            locker.execute("ROLLBACK")
        finally:
            locker.close()
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"]
        assert set(response.json()) == {"detail"}
        assert client.post("/pipeline/runs", json={}).status_code == 201
