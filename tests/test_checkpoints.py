"""WAL checkpoints happen in a thread of their own, and the WAL still rewinds under a flood."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline import checkpoints, db

from .conftest import wait_for

_ROWS = sa.text("INSERT INTO t (body) VALUES (:body)")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "file.db"


def _engine(path: Path) -> Engine:
    engine = db.create_engine(f"sqlite:///{path}")
    with db.write(engine) as conn:
        conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT)")
    with engine.connect() as conn:  # the table in the main file, the WAL empty
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    return engine


@pytest.fixture
def engine(path: Path) -> Iterator[Engine]:
    engine = _engine(path)
    yield engine
    engine.dispose()


def _checkpointer(path: Path) -> checkpoints.Checkpointer:
    checkpointer = db._gate_for(os.path.realpath(path)).checkpointer
    assert checkpointer is not None
    return checkpointer


def _write(engine: Engine, count: int, body: str = "x") -> None:
    for _ in range(count):
        with db.write(engine) as conn:
            conn.execute(_ROWS, {"body": body})


def _rows_in_the_database_file(path: Path, tmp_path: Path) -> int:
    """What the main file holds without its WAL: what checkpoints have copied into it."""
    copy = tmp_path / "main-file-only.db"
    shutil.copy(path, copy)
    with sqlite3.connect(copy) as conn:
        return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])


def test_a_checkpoint_copies_the_wal_in_its_own_thread(
    engine: Engine, path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoints, "CHECKPOINT_EVERY", 8)
    checkpointer = _checkpointer(path)
    threads: list[str] = []
    original = checkpoints.Checkpointer.checkpoint

    def recorded(self: checkpoints.Checkpointer) -> None:
        threads.append(threading.current_thread().name)
        original(self)

    monkeypatch.setattr(checkpoints.Checkpointer, "checkpoint", recorded)
    _write(engine, 6)  # with the CREATE TABLE: 7 write transactions, one short of a checkpoint
    assert _rows_in_the_database_file(path, tmp_path) == 0  # all in the WAL: nobody checkpointed
    _write(engine, 1)
    wait_for(lambda: checkpointer.checkpoints >= 1)
    assert _rows_in_the_database_file(path, tmp_path) == 7
    assert threads == ["pipeline-checkpoint"]


def test_writers_go_on_while_a_checkpoint_waits_for_its_fsyncs(
    engine: Engine, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoints, "CHECKPOINT_EVERY", 4)
    entered, release = threading.Event(), threading.Event()

    def slow(self: checkpoints.Checkpointer) -> None:  # a disk that takes its time
        entered.set()
        release.wait(10)

    monkeypatch.setattr(checkpoints.Checkpointer, "checkpoint", slow)
    try:
        _write(engine, 3)
        assert entered.wait(10)
        _write(engine, 40)  # would hang here if a commit waited for the checkpoint
        with db.read(engine) as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM t")).scalar() == 43
    finally:
        release.set()


def _rewinds(path: Path) -> int:
    """The WAL header's checkpoint sequence number: SQLite adds one each time it rewinds."""
    with open(f"{path}-wal", "rb") as wal:
        return int.from_bytes(wal.read(32)[12:16], "big")


def test_the_wal_still_rewinds_under_a_flood_of_writes(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Background checkpoints racing writers never copy every frame; the backstop does."""
    monkeypatch.setattr(checkpoints, "CHECKPOINT_EVERY", 8)
    monkeypatch.setattr(checkpoints, "BACKSTOP_PAGES", 100)
    engine = _engine(path)
    try:
        with engine.connect() as conn:
            page = int(conn.exec_driver_sql("PRAGMA page_size").scalar_one())
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 100
        _write(engine, 1)
        before = _rewinds(path)
        _write(engine, 1500, body="y" * 3000)  # a page or two each: 15-30 x the backstop
        assert _rewinds(path) - before >= 2
        wal = Path(f"{path}-wal").stat().st_size
        assert wal < 1500 * (page + 24) / 2, f"the WAL grew to {wal} bytes"
        assert _checkpointer(path).checkpoints > 0
    finally:
        engine.dispose()


def test_at_synchronous_full_the_checkpoint_holds_the_gate(
    engine: Engine, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every commit fsyncs at FULL: the checkpoint's fsyncs would only queue with them."""
    monkeypatch.setattr(checkpoints, "CHECKPOINT_EVERY", 8)
    gate = db._gate_for(os.path.realpath(path))
    takers: list[str] = []
    original = type(gate).acquire

    def acquire(self: db._WriteGate, timeout: float, *, background: bool = False) -> bool:
        takers.append(threading.current_thread().name)
        return original(self, timeout, background=background)

    monkeypatch.setattr(type(gate), "acquire", acquire)
    checkpointer = _checkpointer(path)
    _write(engine, 16)  # at NORMAL: checkpoints that leave the gate alone
    wait_for(lambda: checkpointer.checkpoints >= 1)
    assert "pipeline-checkpoint" not in takers

    @sa.event.listens_for(engine, "checkout")
    def full(dbapi_conn: Any, record: Any, proxy: Any) -> None:  # as bench/orchestration.py does
        dbapi_conn.execute("PRAGMA synchronous = FULL")

    done = checkpointer.checkpoints
    _write(engine, 1)
    before = _rewinds(path)
    _write(engine, 32)
    wait_for(lambda: checkpointer.checkpoints >= done + 2)
    assert "pipeline-checkpoint" in takers
    _write(engine, 1)  # the first write after a checkpoint that copied everything rewinds
    assert _rewinds(path) > before


def test_a_file_removed_meanwhile_is_not_created_again(
    engine: Engine, path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write(engine, 1)
    engine.dispose()
    for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        leftover.unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoints"):
        _checkpointer(path).checkpoint()
    assert not path.exists()
    assert "background checkpoint" in caplog.text


def test_the_thread_ends_when_idle_and_starts_again_on_the_next_poke(
    engine: Engine, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoints, "IDLE_SECONDS", 0.05)
    checkpointer = _checkpointer(path)
    checkpointer.poke()
    thread = checkpointer._thread
    assert thread is not None
    wait_for(lambda: checkpointer.checkpoints >= 1)
    wait_for(lambda: not thread.is_alive())
    assert checkpointer._thread is None
    checkpointer.poke()
    wait_for(lambda: checkpointer.checkpoints >= 2)
