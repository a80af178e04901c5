"""Shared fixtures: a fresh, migrated SQLite file per test, and helpers to wait."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy.engine import Engine

from pipeline import db, runs
from pipeline.runs import Run

T = TypeVar("T")


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Migrate once; each test copies the file (an Alembic upgrade per test is slow)."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    db.migrate(f"sqlite:///{path}")
    return path


@pytest.fixture
def db_url(tmp_path: Path, migrated_template: Path) -> str:
    path = tmp_path / "pipeline.db"
    shutil.copy(migrated_template, path)
    return f"sqlite:///{path}"


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


def scalar(engine: Engine, sql: str, *params: Any) -> Any:
    with db.read(engine) as conn:
        return conn.exec_driver_sql(sql, params).scalar()
