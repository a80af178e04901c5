"""Params: one check at every door (HTTP, CLI, Python), so no stored value breaks a read."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from pipeline import db, runs
from pipeline.api import create_app
from pipeline.config import Settings
from pipeline.orchestrator import Executor, start_run
from pipeline.params import InvalidParams

from .conftest import scalar


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def quick(conn, ctx):
    """A phase that does nothing."""


REGISTRY = [(1, "Quick", quick)]

# (id, the params as Python, the same as JSON text, what the refusal says)
BAD = [
    ("deep-300", nested(300), json.dumps(nested(300)), "nested deeper than 32"),
    ("lone-surrogate", {"x": "\ud800"}, '{"x": "\\ud800"}', "not valid Unicode"),
    ("nan", {"x": float("nan")}, '{"x": NaN}', "finite"),
    ("infinity", {"x": float("inf")}, '{"x": 1e400}', "finite"),
    ("huge-int", {"x": 10**4301}, '{"x": 1' + "0" * 4301 + "}", "more than 4300 digits"),
]


def run_count(engine) -> int:
    return int(scalar(engine, "SELECT count(*) FROM analysis_runs"))


@pytest.mark.parametrize(
    ("value", "text", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_http_refuses_what_no_reader_could_say_back(db_url, engine, value, text, message):
    """POST /runs: a 422 that names the problem, nothing written."""
    with TestClient(create_app(Settings(database_url=db_url), registry=REGISTRY)) as client:
        answer = client.post(
            "/runs",
            content=f'{{"params": {text}}}',
            headers={"content-type": "application/json"},
        )
    assert answer.status_code == 422, answer.text
    assert message in answer.json()["detail"]
    assert run_count(engine) == 0


@pytest.mark.parametrize(
    ("value", "text", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_python_api_refuses_the_same_before_anything_is_written(
    db_url, engine, value, text, message
):
    """start_run, start_reserved and runs.create_run apply the HTTP rules."""
    with pytest.raises(InvalidParams, match=message):
        start_run(db_url, value, REGISTRY)
    with pytest.raises(InvalidParams, match=message):
        Executor(db_url, REGISTRY).start_reserved(value)
    with pytest.raises(InvalidParams, match=message), db.write(engine) as conn:
        runs.create_run(conn, params=value)
    assert run_count(engine) == 0


@pytest.mark.parametrize("value", [{"when": dt.date(2026, 1, 1)}, {"s": {1, 2}}, {1: "x"}])
def test_python_api_refuses_values_that_are_not_json(engine, value):
    """A date, a set or a non-string key from Python is refused, not stored half-converted."""
    with pytest.raises(InvalidParams), db.write(engine) as conn:
        runs.create_run(conn, params=value)
    assert run_count(engine) == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [*((b[2], b[3]) for b in BAD), ("[" * 5000 + "]" * 5000, "nested deeper")],
    ids=[*(b[0] for b in BAD), "deep-5000"],
)
def test_cli_refuses_the_same_with_one_line(sqlite_url, text, message):
    """`pipeline run --params`: one clear line, exit 64, no traceback, nothing written."""
    env = {**os.environ, "PIPELINE_DATABASE_URL": sqlite_url}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--params", text],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 64, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    engine = db.create_engine(sqlite_url)
    try:
        assert run_count(engine) == 0
    finally:
        engine.dispose()


def test_a_legacy_nan_in_stored_params_never_reaches_the_event_stream_raw(sqlite_url):
    """A NaN stored before the check existed (SQLite kept it): REST and events both send null."""
    engine = db.create_engine(sqlite_url)
    with db.write(engine) as conn:
        run_id = runs.create_run(conn, params={"x": 1.5}).id
        # What an older version let `pipeline run --params '{"x": NaN}'` store.
        conn.execute(
            sa.text(
                "UPDATE analysis_runs SET params = '{\"x\": NaN}', status = 'failed', "
                "error_message = 'old', completed_at = created_at WHERE id = :r"
            ),
            {"r": run_id},
        )
    engine.dispose()

    def strict(text: str):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} was sent"))

    with TestClient(create_app(Settings(database_url=sqlite_url), registry=REGISTRY)) as client:
        rest = client.get(f"/runs/{run_id}")
        with client.stream("GET", f"/runs/{run_id}/events") as stream:
            data = [line[5:] for line in stream.iter_lines() if line.startswith("data:")]
    assert rest.status_code == 200
    assert strict(rest.text)["params"] == {"x": None}
    assert len(data) == 1
    assert strict(data[0])["params"] == {"x": None}
