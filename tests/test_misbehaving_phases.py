"""Phases that misbehave end their run truthfully, and the server keeps serving."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from pipeline.api import create_app
from pipeline.config import Settings

from .conftest import wait_for


def raises_system_exit(conn, ctx):
    raise SystemExit(2)


def raises_keyboard_interrupt(conn, ctx):
    raise KeyboardInterrupt


def raises_generator_exit(conn, ctx):
    raise GeneratorExit


def returns_a_value(conn, ctx):
    return {"unexpected": True}


def nonsense_progress(conn, ctx):
    for current, total in ((-5, 10), (50, 10), (3, 0), (None, None), (float("nan"), 3), (1, -1)):
        ctx.progress(current, total)


def commits_itself(conn, ctx):
    conn.commit()


def closes_its_connection(conn, ctx):
    conn.close()


class BadStr(Exception):
    def __str__(self):
        raise RuntimeError("cannot even say what went wrong")


def raises_unprintable(conn, ctx):
    raise BadStr


def breaks_a_constraint(conn, ctx):
    conn.execute(sa.text("INSERT INTO example_comments VALUES (999999, 'c', 't', 'a', 'b', 0)"))


def fine(conn, ctx):
    ctx.progress(1, 1)


MISBEHAVIOURS = {
    "SystemExit": (raises_system_exit, "failed", "2"),
    "KeyboardInterrupt": (raises_keyboard_interrupt, "failed", "KeyboardInterrupt"),
    "GeneratorExit": (raises_generator_exit, "failed", "GeneratorExit"),
    "returns-a-value": (returns_a_value, "completed", None),
    "nonsense-progress": (nonsense_progress, "completed", None),
    "commits": (commits_itself, "failed", "leave its transaction to the runner"),
    "closes": (closes_its_connection, "failed", "leave its transaction to the runner"),
    "unprintable-exception": (raises_unprintable, "failed", "BadStr"),
    "sql-error": (breaks_a_constraint, "failed", "foreign key"),
}


def by_params(conn, ctx):
    """Dispatch to the misbehaviour named in the run's params (one registry for all)."""
    fn, _, _ = MISBEHAVIOURS[ctx.params["kind"]]
    return fn(conn, ctx)


@pytest.mark.parametrize("kind", list(MISBEHAVIOURS))
def test_misbehaving_phase_ends_truthfully_and_server_keeps_serving(db_url, kind):
    """The run ends failed (or completed when nothing was wrong), then a normal run completes."""
    _, expected_status, expected_message = MISBEHAVIOURS[kind]
    app = create_app(
        Settings(database_url=db_url),
        registry=[(1, "Misbehave", by_params), (2, "After", fine)],
    )
    with TestClient(app) as client:
        run_id = client.post("/runs", json={"params": {"kind": kind}}).json()["id"]

        def ended():
            run = client.get(f"/runs/{run_id}").json()
            return run if run["status"] in ("completed", "failed", "cancelled") else None

        run = wait_for(ended)
        assert run["status"] == expected_status
        if expected_message is None:
            assert run["error_message"] is None
            assert run["percent"] == 100.0
        else:
            assert expected_message.lower() in run["error_message"].lower()
            assert "[SQL" not in run["error_message"]  # no statement or parameters to clients
            assert "INSERT" not in run["error_message"]
            assert run["completed_at"] is not None
            assert run["current_phase"] == 1
            assert run["phases"][0]["status"] == "failed"
        assert client.get("/healthz").status_code == 200
        healthy = client.post("/runs", json={"params": {"kind": "returns-a-value"}}).json()["id"]
        wait_for(lambda: client.get(f"/runs/{healthy}").json()["status"] == "completed")
