"""Shared fixtures: a fresh, migrated database per test, and helpers to wait.

``db_url`` is a SQLite file in tmp_path, and also a PostgreSQL database when
PIPELINE_TEST_POSTGRES_URL names a server (``.ci/run`` sets it): the same
tests run on both. ``sqlite_url`` is for tests of SQLite's own behaviour.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline import db, runs
from pipeline.runs import Run
from pipeline.schema import analysis_runs, run_phases

T = TypeVar("T")

POSTGRES_URL = os.environ.get("PIPELINE_TEST_POSTGRES_URL")
BACKENDS = ["sqlite", "postgresql"] if POSTGRES_URL else ["sqlite"]


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Migrate once; each test copies the file (an Alembic upgrade per test is slow)."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    db.migrate(f"sqlite:///{path}")
    return path


def _postgres_admin() -> Engine:
    assert POSTGRES_URL is not None
    return sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)


def _database_url(name: str) -> str:
    assert POSTGRES_URL is not None
    return sa.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[str]:
    """A migrated PostgreSQL database that each test's database is copied from."""
    name = f"pipeline_test_template_{os.getpid()}"
    admin = _postgres_admin()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    db.migrate(_database_url(name))
    yield name
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path, migrated_template: Path) -> str:
    path = tmp_path / "pipeline.db"
    shutil.copy(migrated_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(params=BACKENDS)
def db_url(
    request: pytest.FixtureRequest, tmp_path: Path, migrated_template: Path
) -> Iterator[str]:
    """A fresh migrated database: SQLite always, PostgreSQL too when configured."""
    if request.param == "sqlite":
        path = tmp_path / "pipeline.db"
        shutil.copy(migrated_template, path)
        yield f"sqlite:///{path}"
        return
    template = request.getfixturevalue("postgres_template")
    name = f"pipeline_test_{uuid.uuid4().hex[:12]}"
    admin = _postgres_admin()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield _database_url(name)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def is_sqlite_url(url: str) -> bool:
    return url.startswith("sqlite")


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = db.create_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    """Every runner thread a test starts has ended when it ends (or the test joins it)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 30
    for thread in set(threading.enumerate()) - before:
        if thread.name.startswith("pipeline-run") and not thread.daemon:
            thread.join(max(deadline - time.monotonic(), 0))
            assert not thread.is_alive(), f"{thread.name} still running after the test"


def wait_for(
    predicate: Callable[[], T | None], *, timeout: float = 10.0, interval: float = 0.02
) -> T:
    """Poll until ``predicate`` returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")
        time.sleep(interval)


def read_run(engine: Engine, run_id: int) -> Run:
    with db.read(engine) as conn:
        run = runs.get_run(conn, run_id=run_id)
    assert run is not None
    return run


def scalar(engine: Engine, sql: str, **params: Any) -> Any:
    """One value, from SQL with ``:name`` parameters (portable across backends)."""
    with db.read(engine) as conn:
        return conn.execute(sa.text(sql), params).scalar()


def execute(engine: Engine, sql: str, **params: Any) -> None:
    """One write statement in its own transaction, with ``:name`` parameters."""
    with db.write(engine) as conn:
        conn.execute(sa.text(sql), params)


def insert_running(
    engine: Engine,
    *,
    owner: str,
    labels: list[tuple[int, str]],
    heartbeat_age: float = 0.0,
    cancel_requested: bool = False,
) -> int:
    """A run some runner claims to execute, in phase 2 (phase 1 committed), on the db's clock."""
    with db.write(engine) as conn:
        created = runs.create_run(conn, params={})
        run_id, now = created.id, created.created_at
        conn.execute(
            sa.update(analysis_runs)
            .where(analysis_runs.c.id == run_id)
            .values(
                status="running",
                started_at=now,
                current_phase=2,
                phase_label=labels[1][1],
                progress_current=1,
                progress_total=len(labels),
                owner=owner,
                heartbeat_at=now - dt.timedelta(seconds=heartbeat_age),
                cancel_requested_at=now if cancel_requested else None,
            )
        )
        conn.execute(
            sa.insert(run_phases),
            [
                {
                    "run_id": run_id,
                    "phase_num": num,
                    "label": label,
                    "attempts": 1 if num <= 2 else 0,
                    "started_at": now if num <= 2 else None,
                    "finished_at": now if num == 1 else None,
                    "status": "completed" if num == 1 else "running" if num == 2 else "pending",
                }
                for num, label in labels
            ],
        )
    return run_id
