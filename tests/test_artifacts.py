"""Phase results and artifacts: stored with the phase, visible through the API, limits enforced.

Runs execute in real runner threads on a fresh migrated database (SQLite, and
PostgreSQL when configured); the API is the real application in a TestClient.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Connection

from pipeline import artifacts, db, retention
from pipeline.api import create_app
from pipeline.config import Settings
from pipeline.orchestrator import RunContext, phase, start_run
from pipeline.runs import RunStatus

from .conftest import execute, read_run, scalar

TABLE = {"columns": ["a", "b"], "rows": [[1, "x"], [2, None]]}
CHART = {"type": "bar", "x": ["p", "q"], "series": [{"name": "s", "values": [1, None]}]}


def _run(url: str, registry: list[Any], params: dict[str, Any] | None = None) -> int:
    run_id, thread = start_run(url, params or {}, registry)
    thread.join(30)
    assert not thread.is_alive()
    return run_id


def _stored(engine: Any, run_id: int) -> tuple[int, int]:
    results = scalar(engine, "SELECT count(*) FROM run_results WHERE run_id = :r", r=run_id)
    published = scalar(engine, "SELECT count(*) FROM run_artifacts WHERE run_id = :r", r=run_id)
    return results, published


# -- registries -------------------------------------------------------------------

SEEN: dict[str, Any] = {}


def produces(conn: Connection, ctx: RunContext) -> Any:
    ctx.artifact("notes", title="Notes", markdown="# Hello\n\n*first*")
    ctx.artifact("notes", title="Notes", markdown="# Hello\n\n**replaced**")
    ctx.artifact("numbers", table=TABLE)
    return {"count": 3, "names": ["a", "b"]}


def consumes(conn: Connection, ctx: RunContext) -> None:
    SEEN["results"] = dict(ctx.results)
    with pytest.raises(TypeError):
        ctx.results[1] = "changed"  # type: ignore[index]
    ctx.results[1]["count"] = 99  # a copy: later phases and the database keep the original
    ctx.artifact("chart", title="A chart", chart=CHART)


def later_reads(conn: Connection, ctx: RunContext) -> int:
    SEEN["later"] = ctx.results[1]
    return 7


PRODUCING = [(1, "Produces", produces), (2, "Consumes", consumes), (3, "Reads", later_reads)]


def test_results_and_artifacts_are_stored_and_passed_to_later_phases(db_url, engine):
    """A result reaches later phases as ctx.results; each artifact is stored once."""
    SEEN.clear()
    run_id = _run(db_url, PRODUCING)
    run = read_run(engine, run_id)
    assert run.status is RunStatus.COMPLETED
    assert SEEN["results"] == {1: {"count": 3, "names": ["a", "b"]}}
    assert SEEN["later"] == {"count": 3, "names": ["a", "b"]}
    assert [p.has_result for p in run.phases] == [True, False, True]
    assert [(a.key, a.phase, a.kind) for a in run.artifacts] == [
        ("notes", 1, "markdown"),
        ("numbers", 1, "table"),
        ("chart", 2, "chart"),
    ]
    with db.read(engine) as conn:
        notes = artifacts.get_artifact(conn, run_id=run_id, key="notes")
    assert notes is not None
    assert "replaced" in notes.to_dict()["data"]


def publishes_early(conn: Connection, ctx: RunContext) -> None:
    """Publishes, then works 20 ms: the call and the boundary are instants apart."""
    ctx.artifact(f"early-{ctx.phase_num}", markdown="published at the start")
    until = time.monotonic() + 0.02
    while time.monotonic() < until:
        pass


def test_an_artifact_is_dated_at_its_phase_boundary(db_url, engine):
    """An artifact's created_at is the instant its phase finished: the boundary that stored it.

    Not when ``ctx.artifact`` was called (that write is not yet committed,
    and may never be), and not a second reading of the clock.
    """
    run_id = _run(db_url, [(1, "Early", publishes_early), (2, "Again", publishes_early)])
    run = read_run(engine, run_id)
    finished = {p.num: p.finished_at for p in run.phases}
    assert all(stamp is not None for stamp in finished.values())
    assert [(a.key, a.created_at) for a in run.artifacts] == [
        ("early-1", finished[1]),
        ("early-2", finished[2]),
    ]


def test_the_http_contract_for_results_and_artifacts(db_url):
    """The result and artifact endpoints, the new Run JSON fields and their 404s."""
    settings = Settings(database_url=db_url, api_token=None, auto_resume=False)
    with TestClient(create_app(settings, registry=PRODUCING)) as client:
        run_id = client.post("/runs", json={"params": {}}).json()["id"]
        client.get(f"/runs/{run_id}/events")  # ends when the run has ended
        run = client.get(f"/runs/{run_id}").json()
        assert run["status"] == "completed"
        assert [p["has_result"] for p in run["phases"]] == [True, False, True]
        assert run["artifacts"] == [
            {"key": "notes", "phase": 1, "kind": "markdown", "title": "Notes"},
            {"key": "numbers", "phase": 1, "kind": "table", "title": None},
            {"key": "chart", "phase": 2, "kind": "chart", "title": "A chart"},
        ]
        result = client.get(f"/runs/{run_id}/phases/1/result")
        assert result.status_code == 200
        assert result.json() == {"phase": 1, "result": {"count": 3, "names": ["a", "b"]}}
        assert client.get(f"/runs/{run_id}/phases/3/result").json() == {"phase": 3, "result": 7}
        listing = client.get(f"/runs/{run_id}/artifacts").json()
        assert [a["key"] for a in listing["items"]] == ["notes", "numbers", "chart"]
        assert all(
            set(a) == {"key", "phase", "kind", "title", "created_at"} for a in listing["items"]
        )
        assert listing["items"][0]["created_at"].endswith("Z")
        table = client.get(f"/runs/{run_id}/artifacts/numbers").json()
        assert table["data"] == TABLE
        assert table["kind"] == "table"
        chart = client.get(f"/runs/{run_id}/artifacts/chart").json()
        assert chart["data"] == CHART
        missing = {
            f"/runs/{run_id}/phases/2/result": "has no result",
            f"/runs/{run_id}/phases/9/result": "has no phase 9",
            f"/runs/{run_id + 1}/phases/1/result": "no run with id",
            f"/runs/{run_id + 1}/artifacts": "no run with id",
            f"/runs/{run_id}/artifacts/nothing": "has no artifact",
            f"/runs/{run_id}/artifacts/NOT%20A%20SLUG%00": "has no artifact",
            f"/runs/{run_id + 1}/artifacts/notes": "no run with id",
        }
        for path, message in missing.items():
            response = client.get(path)
            assert response.status_code == 404, (path, response.text)
            assert message in response.json()["detail"], path


# -- what a failed or retried attempt leaves -------------------------------------------


def publishes_then_fails(conn: Connection, ctx: RunContext) -> Any:
    ctx.artifact("doomed", markdown="never seen")
    raise RuntimeError("the phase broke after publishing")


def test_a_failing_phase_leaves_no_result_and_no_artifacts(db_url, engine):
    """A phase failing after publishing leaves no artifact or result; earlier ones stay."""
    run_id = _run(db_url, [(1, "Produces", produces), (2, "Fails", publishes_then_fails)])
    run = read_run(engine, run_id)
    assert run.status is RunStatus.FAILED
    assert [a.key for a in run.artifacts] == ["notes", "numbers"]
    assert [p.has_result for p in run.phases] == [True, False]


ATTEMPTS: list[int] = []


@phase(retries=1, backoff=0)
def flaky(conn: Connection, ctx: RunContext) -> Any:
    ATTEMPTS.append(1)
    if len(ATTEMPTS) == 1:
        ctx.artifact("first-attempt", markdown="from the attempt that failed")
        ctx.artifact("both", markdown="first")
        raise ConnectionError("the source hung up")
    ctx.artifact("both", markdown="second")
    return "second"


def test_a_retried_phase_keeps_only_its_last_attempts_artifacts(db_url, engine):
    """The first, rolled-back attempt's artifacts are gone; the retry's are there."""
    ATTEMPTS.clear()
    run_id = _run(db_url, [(1, "Flaky", flaky)])
    run = read_run(engine, run_id)
    assert run.status is RunStatus.COMPLETED
    assert run.phases[0].attempts == 2
    assert [a.key for a in run.artifacts] == ["both"]
    with db.read(engine) as conn:
        both = artifacts.get_artifact(conn, run_id=run_id, key="both")
        assert artifacts.get_result(conn, run_id=run_id, phase_num=1) == '"second"'
    assert both is not None
    assert both.to_dict()["data"] == "second"


def test_a_key_from_an_earlier_phase_is_refused(db_url, engine):
    """Publishing a key an earlier phase published raises ValueError in the later phase."""

    def again(conn: Connection, ctx: RunContext) -> None:
        ctx.artifact("notes", markdown="again")

    run_id = _run(db_url, [(1, "Produces", produces), (2, "Again", again)])
    run = read_run(engine, run_id)
    assert run.status is RunStatus.FAILED
    assert run.error_message == "artifact key 'notes' was already published by phase 1"


# -- limits ------------------------------------------------------------------------------

BIG = "x" * (artifacts.MAX_BYTES + 1)
ROWS = [[i] for i in range(artifacts.MAX_ROWS + 1)]
POINTS = list(range(artifacts.MAX_POINTS + 1))

BAD_ARTIFACTS = [
    pytest.param({"key": "Bad Key", "markdown": "x"}, "is not a slug", id="key-not-slug"),
    pytest.param({"key": "k" * 65, "markdown": "x"}, "is not a slug", id="key-too-long"),
    pytest.param({"key": "k"}, "exactly one of", id="no-kind"),
    pytest.param({"key": "k", "markdown": "x", "table": TABLE}, "exactly one of", id="two-kinds"),
    pytest.param({"key": "k", "markdown": 3}, "markdown must be a string", id="markdown-not-str"),
    pytest.param({"key": "k", "markdown": BIG}, "at most 1,048,576 bytes", id="markdown-1mib"),
    pytest.param({"key": "k", "markdown": "x", "title": "a\x00b"}, "control", id="title-nul"),
    pytest.param({"key": "k", "table": {"columns": ["a"]}}, '{"columns"', id="table-shape"),
    pytest.param(
        {"key": "k", "table": {"columns": ["a"], "rows": ROWS}}, "at most 10,000", id="table-rows"
    ),
    pytest.param(
        {"key": "k", "table": {"columns": ["a", "b"], "rows": [[1]]}},
        "row 0 must be a list of 2 values",
        id="table-row-length",
    ),
    pytest.param(
        {"key": "k", "table": {"columns": ["a"], "rows": [[math.nan]]}},
        "a cell is a string, a finite number",
        id="table-nan",
    ),
    pytest.param(
        {"key": "k", "table": {"columns": ["a"], "rows": [[{"x": 1}]]}},
        "a cell is a string",
        id="table-cell-not-scalar",
    ),
    pytest.param(
        {"key": "k", "chart": {**CHART, "type": "pie"}}, "'bar' or 'line'", id="chart-type"
    ),
    pytest.param(
        {"key": "k", "chart": {**CHART, "series": [{"name": "s", "values": [1]}]}},
        "must have 2 values",
        id="chart-series-length",
    ),
    pytest.param(
        {"key": "k", "chart": {**CHART, "series": [{"name": "s", "values": [1, math.inf]}]}},
        "not a finite number or null",
        id="chart-infinity",
    ),
    pytest.param(
        {
            "key": "k",
            "chart": {
                "type": "line",
                "x": POINTS,
                "series": [{"name": "s", "values": POINTS}],
            },
        },
        "at most 10,000 are allowed",
        id="chart-points",
    ),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARTIFACTS)
def test_each_artifact_limit_raises_at_the_call_and_stores_nothing(db_url, engine, kwargs, message):
    """A malformed artifact raises ValueError at the call, clearly; nothing is stored."""
    caught: list[str] = []

    def publishes_bad(conn: Connection, ctx: RunContext) -> None:
        try:
            ctx.artifact(**kwargs)
        except ValueError as exc:
            caught.append(str(exc))

    run_id = _run(db_url, [(1, "Bad artifact", publishes_bad)])
    assert read_run(engine, run_id).status is RunStatus.COMPLETED
    assert len(caught) == 1, caught
    assert message in caught[0], caught
    assert _stored(engine, run_id) == (0, 0)


BAD_RESULTS = [
    pytest.param({1, 2}, "is not JSON-serializable", id="a-set"),
    pytest.param({"x": object()}, "is not JSON-serializable", id="an-object"),
    pytest.param({"score": math.nan}, "holds NaN or Infinity", id="nan"),
    pytest.param([math.inf], "holds NaN or Infinity", id="infinity"),
    pytest.param("x" * artifacts.MAX_BYTES, "at most 1,048,576 bytes", id="over-1mib"),
]


@pytest.mark.parametrize(("value", "message"), BAD_RESULTS)
def test_a_bad_result_fails_the_phase_and_rolls_it_back(db_url, engine, value, message):
    """A result that is not JSON, holds NaN or is over 1 MiB fails the phase; none of it stays."""

    def returns_bad(conn: Connection, ctx: RunContext) -> Any:
        ctx.artifact("before", markdown="published before the bad return")
        return value

    run_id = _run(db_url, [(1, "Produces", produces), (2, "Bad result", returns_bad)])
    run = read_run(engine, run_id)
    assert run.status is RunStatus.FAILED
    assert run.error_message is not None
    assert message in run.error_message
    assert run.error_message.startswith("phase 2 returned a result that")
    assert [p.status for p in run.phases] == ["completed", "failed"]
    assert _stored(engine, run_id) == (1, 2)  # phase 1's result and two artifacts only


def test_none_stores_no_result(db_url, engine):
    """A phase that returns None stores no result."""
    run_id = _run(db_url, [(1, "Nothing", lambda conn, ctx: None)])
    assert _stored(engine, run_id) == (0, 0)


def test_retention_deletes_results_and_artifacts_with_their_run(db_url, engine):
    """Pruning a run deletes its results and artifacts (ON DELETE CASCADE)."""
    run_id = _run(db_url, PRODUCING)
    assert _stored(engine, run_id) == (2, 3)
    execute(
        engine,
        "UPDATE analysis_runs SET completed_at = :t WHERE id = :r",
        t="2000-01-01 00:00:00.000000" if db_url.startswith("sqlite") else "2000-01-01T00:00:00Z",
        r=run_id,
    )
    import datetime as dt

    assert retention.prune(engine, older_than=dt.timedelta(days=1)) == 1
    assert _stored(engine, run_id) == (0, 0)


def test_a_pages_artifacts_are_read_in_order_without_a_sort(sqlite_url):
    """``GET /runs`` reads many runs' artifacts in phase order: the index gives that order."""
    engine = db.create_engine(sqlite_url)
    try:
        query = artifacts._SUMMARIES_OF.params(b_ids=[1, 2, 3]).compile(
            engine, compile_kwargs={"literal_binds": True}
        )
        with engine.connect() as conn:
            plan = [row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {query}")]
    finally:
        engine.dispose()
    assert any("run_artifacts" in step for step in plan), plan
    assert not [step for step in plan if "TEMP B-TREE" in step or step.startswith("SCAN")], plan
