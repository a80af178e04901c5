"""Property-based: every operation of the app's own OpenAPI schema, fuzzed by schemathesis.

Schemathesis generates valid and invalid requests for each operation and checks
that none gets a 5xx and that every answer matches the response schema the
app publishes. The schema is the app's own (``app.openapi()``), so what is
tested is what clients are told. Bounded and derandomized: the same examples
every run, well under a minute in all.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance
from sqlalchemy.engine import Connection

from pipeline import api
from pipeline.api import create_app
from pipeline.config import Settings
from pipeline.orchestrator import RunContext


def quick(conn: Connection, ctx: RunContext) -> int:
    """Reports progress, publishes one artifact of each kind, and returns a result."""
    ctx.progress(1, 1)
    ctx.artifact(f"notes-{ctx.phase_num}", markdown="# notes")
    ctx.artifact(f"table-{ctx.phase_num}", table={"columns": ["a"], "rows": [[1]]})
    ctx.artifact(
        f"chart-{ctx.phase_num}",
        chart={"type": "line", "x": [1, 2], "series": [{"name": "s", "values": [1, None]}]},
    )
    return ctx.phase_num


QUICK = [(1, "One", quick), (2, "Two", quick)]


def make_app(database_url: str) -> FastAPI:
    return create_app(
        Settings(database_url=database_url, api_token=None, executor="thread", auto_resume=False),
        registry=QUICK,
    )


# The OpenAPI document needs no database and no lifespan: only the routes.
# GET /events never ends by design (a list view follows it for as long as it
# is open): its filter's 422 and its events are tested in test_events.py.
schema = schemathesis.openapi.from_dict(make_app("sqlite://").openapi()).exclude(path="/events")


class Target:
    """The ASGI app schemathesis calls: the current test's app, without its lifespan.

    The test runs the real lifespan itself (TestClient), once per test, and
    stops it at the end; an ASGI app that raises on the ``lifespan`` scope is,
    by the ASGI spec, one without lifespan support, so schemathesis starts none.
    """

    app: FastAPI | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            raise RuntimeError("the test runs the lifespan itself")
        assert self.app is not None, "no app is being served"
        await self.app(scope, receive, send)


TARGET = Target()


@pytest.fixture
def served(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The app on a fresh database, with one completed run so that some ids exist."""
    monkeypatch.setattr(api, "EVENTS_POLL_SECONDS", 0.02)
    app = make_app(db_url)
    with TestClient(app) as client:
        run_id = client.post("/runs", json={"params": {"seed": 1}}).json()["id"]
        client.get(f"/runs/{run_id}/events")  # ends when the run has ended
        TARGET.app = app
        try:
            yield client
        finally:
            TARGET.app = None


@schema.parametrize()
@settings(
    max_examples=40,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one app per operation, on purpose
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)
def test_every_operation_conforms_and_never_5xx(case: Any, served: TestClient) -> None:
    """No generated request gets a 5xx, and every answer matches the published response schema."""
    case.call_and_validate(app=TARGET, checks=[not_a_server_error, response_schema_conformance])
