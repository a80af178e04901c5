"""Pipelines and typed parameters (DESIGN.md): loading, the HTTP rows, claims by pipeline."""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pydantic
import pytest
import sqlalchemy as sa
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy.engine import Connection, Engine

from pipeline import Pipeline, db, runs
from pipeline.api import create_app
from pipeline.config import Settings
from pipeline.orchestrator import Executor, RegistryError, RunContext, load_registry
from pipeline.pipelines import load_pipelines

from .conftest import read_run, wait_for


def _noop(conn: Connection, ctx: RunContext) -> None:
    return None


class Limits(pydantic.BaseModel):
    size: int = pydantic.Field(default=3, ge=1, le=10, description="how many")
    name: str = "x"


PLAIN = [(1, "One", _noop), (2, "Two", _noop)]
SEEN: list[Any] = []


def _record(conn: Connection, ctx: RunContext) -> None:
    SEEN.append((ctx.pipeline, dict(ctx.params), ctx.args))


TYPED = Pipeline("typed", [(1, "Only", _record)], params=Limits, description="typed one")
OTHER = Pipeline("other", [(1, "Else", _record)])


@pytest.fixture
def module() -> Iterator[types.ModuleType]:
    """A throwaway module holding registries for PIPELINE_PHASES specs."""
    mod = types.ModuleType("pipelines_under_test")
    mod.PHASES = PLAIN  # type: ignore[attr-defined]
    mod.TYPED = TYPED  # type: ignore[attr-defined]
    mod.BOTH = [TYPED, OTHER]  # type: ignore[attr-defined]
    mod.AGAIN = Pipeline("typed", PLAIN)  # type: ignore[attr-defined]
    mod.BROKEN = [(2, "Two", _noop)]  # type: ignore[attr-defined]
    sys.modules[mod.__name__] = mod
    yield mod
    del sys.modules[mod.__name__]


# -- loading -------------------------------------------------------------------------


def test_plain_registry_loads_as_a_pipeline_named_after_the_attribute(module):
    """A plain registry becomes a pipeline named after its attribute, lower-cased."""
    (only,) = load_pipelines("pipelines_under_test:PHASES")
    assert only.name == "phases"
    assert only.params is None
    assert only.labels == [(1, "One"), (2, "Two")]


def test_several_entries_pipelines_and_lists_load_together(module):
    """Comma-separated entries of plain registries, pipelines and lists all load, in order."""
    found = load_pipelines("pipelines_under_test:PHASES, pipelines_under_test:BOTH")
    assert [p.name for p in found] == ["phases", "typed", "other"]


def test_a_name_clash_is_refused_at_load(module):
    """Two pipelines of one name are refused with a message naming it."""
    with pytest.raises(RegistryError, match="two pipelines are named 'typed'"):
        load_pipelines("pipelines_under_test:TYPED,pipelines_under_test:AGAIN")


def test_a_malformed_registry_is_refused_with_its_spec(module):
    """A malformed registry among several is refused, the message naming which."""
    with pytest.raises(RegistryError, match="pipelines_under_test:BROKEN: entry 1"):
        load_pipelines("pipelines_under_test:TYPED,pipelines_under_test:BROKEN")


@pytest.mark.parametrize("name", ["", "Upper", "-dash", "a" * 65, "sp ace"])
def test_a_pipeline_name_must_be_a_slug(name):
    """A name that is not a slug is refused when the pipeline is declared."""
    with pytest.raises(RegistryError, match="not a slug"):
        Pipeline(name, PLAIN)


def test_load_registry_still_returns_the_default_registry_phases():
    """load_registry of the default example spec is still its list of phases."""
    assert [label for _, label, _ in load_registry("pipeline.example:PIPELINE")] == [
        label for _, label, _ in load_registry("pipeline.example:PHASES")
    ]


# -- HTTP ------------------------------------------------------------------------------


@contextmanager
def serve(db_url: str, registry: Any) -> Iterator[TestClient]:
    settings = Settings(database_url=db_url, api_token=None, executor="thread", auto_resume=False)
    with TestClient(create_app(settings, registry=registry)) as client:
        yield client


def count_runs(engine: Engine) -> int:
    with db.read(engine) as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM analysis_runs")).scalar_one())


def test_example_refuses_bad_params_with_every_field_error(db_url, engine):
    """The example's bad fetch_delay and limit are one 422 listing both fields, nothing written."""
    with serve(db_url, load_pipelines("pipeline.example:PIPELINE")) as client:
        response = client.post("/runs", json={"params": {"fetch_delay": "x", "limit": 0}})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert {tuple(e["loc"]) for e in detail} == {
        ("body", "params", "fetch_delay"),
        ("body", "params", "limit"),
    }
    assert all(set(e) == {"loc", "msg", "type"} for e in detail)
    assert count_runs(engine) == 0


def test_validated_params_are_stored_with_defaults_and_args_is_the_model(db_url, engine):
    """A run stores the model's JSON with defaults, and its phase sees ctx.args as the model."""
    SEEN.clear()
    with serve(db_url, [TYPED, OTHER]) as client:
        response = client.post("/runs", json={"pipeline": "typed", "params": {"size": "4"}})
        assert response.status_code == 201, response.text
        body = response.json()
        assert list(body)[:2] == ["id", "pipeline"]
        assert body["pipeline"] == "typed"
        assert body["params"] == {"size": 4, "name": "x"}
        wait_for(lambda: client.get(f"/runs/{body['id']}").json()["status"] == "completed")
    pipeline, params, args = SEEN[0]
    assert (pipeline, params) == ("typed", {"size": 4, "name": "x"})
    assert isinstance(args, Limits)
    assert args.size == 4


def test_pipeline_without_model_takes_any_object_and_args_is_none(db_url):
    """A pipeline without a model keeps params as given and gives the phase args None."""
    SEEN.clear()
    with serve(db_url, [TYPED, OTHER]) as client:
        response = client.post("/runs", json={"pipeline": "other", "params": {"any": [1]}})
        assert response.status_code == 201, response.text
        run_id = response.json()["id"]
        wait_for(lambda: client.get(f"/runs/{run_id}").json()["status"] == "completed")
    assert SEEN == [("other", {"any": [1]}, None)]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"params": {}}, "name the pipeline: this service has several (other, typed)"),
        ({"pipeline": "nope"}, "no pipeline named 'nope'; known: other, typed"),
        ({"pipeline": 3}, "'pipeline' must be a pipeline's name"),
    ],
)
def test_a_missing_or_unknown_pipeline_is_a_422_listing_the_known_ones(
    db_url, engine, body, message
):
    """Leaving pipeline out among several, or naming an unknown one, is a 422; nothing written."""
    with serve(db_url, [TYPED, OTHER]) as client:
        response = client.post("/runs", json=body)
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]
    assert count_runs(engine) == 0


def test_get_pipelines_lists_phases_retries_and_schema(db_url):
    """GET /pipelines shows each pipeline's description, phases with retries and params schema."""
    with serve(db_url, [TYPED, OTHER]) as client:
        items = client.get("/pipelines").json()["items"]
    assert [p["name"] for p in items] == ["typed", "other"]
    typed, other = items
    assert typed["description"] == "typed one"
    assert typed["phases"] == [{"num": 1, "label": "Only", "retries": 0}]
    assert typed["params_schema"]["properties"]["size"]["maximum"] == 10
    assert other["params_schema"] is None


def test_list_runs_filters_by_pipeline(db_url):
    """GET /runs?pipeline= lists only that pipeline's runs; a malformed name is a 422."""
    with serve(db_url, [TYPED, OTHER]) as client:
        typed = client.post("/runs", json={"pipeline": "typed"}).json()["id"]
        other = client.post("/runs", json={"pipeline": "other"}).json()["id"]
        assert [r["id"] for r in client.get("/runs?pipeline=typed").json()["items"]] == [typed]
        assert [r["id"] for r in client.get("/runs?pipeline=other").json()["items"]] == [other]
        assert client.get("/runs?pipeline=Bad!").status_code == 422
        done = {typed, other}
        wait_for(
            lambda: all(client.get(f"/runs/{r}").json()["status"] == "completed" for r in done)
        )


def test_openapi_describes_pipeline_and_params_of_post_runs(db_url):
    """The OpenAPI document's POST /runs body names both pipeline and params."""
    with serve(db_url, [TYPED, OTHER]) as client:
        spec = client.get("/openapi.json").json()
    schema = spec["paths"]["/runs"]["post"]["requestBody"]["content"]["application/json"]
    assert set(schema["schema"]["properties"]) == {"pipeline", "params"}


# -- claims by pipeline -----------------------------------------------------------------


def test_a_run_of_an_unknown_pipeline_stays_queued(db_url, engine):
    """An executor never claims (nor fails) a run of a pipeline it has not loaded."""
    with db.write(engine) as conn:
        stranger = runs.create_run(conn, params={}, pipeline="stranger").id
        mine = runs.create_run(conn, params={}, pipeline="other").id
    executor = Executor(db_url, [OTHER])
    try:
        executor.wake()
        wait_for(lambda: read_run(engine, mine).status is runs.RunStatus.COMPLETED)
    finally:
        assert executor.shutdown(timeout=30)
    assert read_run(engine, stranger).status is runs.RunStatus.QUEUED


def test_resume_compares_with_the_runs_own_pipeline(db_url, engine):
    """Resume checks a run's recorded phases against its own pipeline's, not another's."""
    with db.write(engine) as conn:
        run_id = runs.create_run(conn, params={}, pipeline="other").id
    executor = Executor(db_url, [OTHER])
    try:
        executor.wake()
        wait_for(lambda: read_run(engine, run_id).status is runs.RunStatus.COMPLETED)
    finally:
        assert executor.shutdown(timeout=30)
    with db.write(engine) as conn:
        conn.execute(
            sa.text("UPDATE analysis_runs SET status = 'failed' WHERE id = :i"), {"i": run_id}
        )
        phases = {"typed": [(1, "Only")], "other": [(1, "Else")]}
        assert runs.resume(conn, run_id=run_id, phases=phases) is runs.Outcome.DONE
    with db.write(engine) as conn:
        conn.execute(
            sa.text("UPDATE analysis_runs SET status = 'failed' WHERE id = :i"), {"i": run_id}
        )
        with pytest.raises(runs.PhasesChanged):
            runs.resume(conn, run_id=run_id, phases={"other": [(1, "Changed")]})


def old_database_with_one_run(tmp_path: Any) -> tuple[str, Any]:
    """A database at 0003 holding one queued run; returns its URL and alembic config."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    config = db.alembic_config(url)
    command.upgrade(config, "0003")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO analysis_runs (status, params, progress_current, created_at) "
                "VALUES ('queued', '{}', 0, '2026-01-01 00:00:00')"
            )
        )
    engine.dispose()
    return url, config


def test_migration_names_existing_runs_after_the_default_pipeline(tmp_path, monkeypatch):
    """Runs made before 0004 get 'phases', what the default example loads as, and still run."""
    monkeypatch.delenv("PIPELINE_PHASES", raising=False)
    url, config = old_database_with_one_run(tmp_path)
    command.upgrade(config, "head")
    engine = db.create_engine(url)
    try:
        with db.read(engine) as conn:
            (run,) = runs.list_runs(conn)[0]
        assert run.pipeline == "phases"
        assert [p.name for p in load_pipelines("pipeline.example:PIPELINE")] == ["phases"]
        executor = Executor(url, load_pipelines("pipeline.example:PHASES"))
        try:
            executor.wake()
            wait_for(lambda: read_run(engine, run.id).status.terminal, timeout=60)
        finally:
            assert executor.shutdown(timeout=60)
        assert read_run(engine, run.id).status is runs.RunStatus.COMPLETED
    finally:
        engine.dispose()


def test_migration_names_existing_runs_after_the_configured_pipeline(tmp_path, monkeypatch, module):
    """With PIPELINE_PHASES naming one pipeline, runs made before 0004 get its name."""
    monkeypatch.setenv("PIPELINE_PHASES", "pipelines_under_test:TYPED")
    url, config = old_database_with_one_run(tmp_path)
    command.upgrade(config, "head")
    engine = db.create_engine(url)
    try:
        with db.read(engine) as conn:
            (run,) = runs.list_runs(conn)[0]
        assert run.pipeline == "typed"
    finally:
        engine.dispose()


# -- Idempotency-Key ---------------------------------------------------------------------


def test_a_repeated_idempotency_key_returns_the_first_run(db_url, engine):
    """The same key and body is a 200 with the first run and its Location; nothing new."""
    with serve(db_url, [TYPED, OTHER]) as client:
        body = {"pipeline": "other", "params": {"a": 1}}
        first = client.post("/runs", json=body, headers={"Idempotency-Key": "k-1"})
        again = client.post("/runs", json=body, headers={"Idempotency-Key": "k-1"})
        assert first.status_code == 201, first.text
        assert again.status_code == 200, again.text
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["location"] == first.headers["location"]
        other = client.post("/runs", json=body, headers={"Idempotency-Key": "k-2"})
        assert other.status_code == 201
        wait_for(
            lambda: all(
                client.get(f"/runs/{r.json()['id']}").json()["status"] == "completed"
                for r in (first, other)
            )
        )
    assert count_runs(engine) == 2


def test_a_key_reused_with_another_body_is_a_422(db_url, engine):
    """The same key with a different body is a 422 that says so; nothing new is created."""
    with serve(db_url, [TYPED, OTHER]) as client:
        headers = {"Idempotency-Key": "same"}
        assert client.post("/runs", json={"pipeline": "other"}, headers=headers).status_code == 201
        response = client.post(
            "/runs", json={"pipeline": "other", "params": {"b": 2}}, headers=headers
        )
        assert response.status_code == 422
        assert "different body" in response.json()["detail"]
        wait_for(lambda: client.get("/runs?status=completed").json()["items"])
    assert count_runs(engine) == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there"])
def test_a_malformed_idempotency_key_is_a_422(db_url, engine, key):
    """An empty, too long or non-printable-ASCII key is a 422 and creates nothing."""
    with serve(db_url, [TYPED, OTHER]) as client:
        response = client.post(
            "/runs", json={"pipeline": "other"}, headers={"Idempotency-Key": key.encode()}
        )
    assert response.status_code == 422, response.text
    assert count_runs(engine) == 0


def test_twenty_concurrent_posts_with_one_key_create_one_run(db_url, engine):
    """20 POSTs with one key at the same instant create one run, and all answer with it."""
    with serve(db_url, [TYPED, OTHER]) as client:
        barrier = threading.Barrier(20)
        answers: list[Any] = []
        lock = threading.Lock()

        def post() -> None:
            barrier.wait()
            response = client.post(
                "/runs",
                json={"pipeline": "other", "params": {"n": 1}},
                headers={"Idempotency-Key": "together"},
            )
            with lock:
                answers.append(response)

        threads = [threading.Thread(target=post) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        codes = sorted(r.status_code for r in answers)
        assert codes == [200] * 19 + [201], [r.text for r in answers]
        assert len({r.json()["id"] for r in answers}) == 1
        wait_for(lambda: client.get("/runs?status=completed").json()["items"])
    assert count_runs(engine) == 1
