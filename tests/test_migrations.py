"""Migrations: they go up and down, and agree with the Table definitions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from pipeline import db
from pipeline.schema import metadata

ROOT = Path(__file__).resolve().parents[1]


def _tables(url: str) -> set[str]:
    engine = db.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(db_url):
    """Head, then base (nothing left but alembic_version), then head again."""
    url = db_url
    assert set(metadata.tables) <= _tables(url)
    command.downgrade(db.alembic_config(url), "base")
    assert _tables(url) <= {"alembic_version"}
    db.migrate(url)
    assert set(metadata.tables) <= _tables(url)


def test_migrated_schema_matches_table_definitions(db_url):
    """Alembic's autogenerate finds no difference between the migrations and schema.py."""
    engine = db.create_engine(db_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(context, metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_migrated_database_uses_wal(sqlite_url):
    """WAL is switched on at migration time, before any runner starts."""
    path = sqlite_url.removeprefix("sqlite:///")
    import sqlite3

    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_alembic_command_line_uses_pipeline_database_url(tmp_path):
    """`alembic upgrade head` and `downgrade base` from the repository root use the setting."""
    path = tmp_path / "cli.db"
    env = {**os.environ, "PIPELINE_DATABASE_URL": f"sqlite:///{path}"}
    alembic = [sys.executable, "-m", "alembic"]
    subprocess.run([*alembic, "upgrade", "head"], cwd=ROOT, env=env, check=True)
    assert set(metadata.tables) <= _tables(f"sqlite:///{path}")
    subprocess.run([*alembic, "downgrade", "base"], cwd=ROOT, env=env, check=True)
    assert _tables(f"sqlite:///{path}") <= {"alembic_version"}


def test_pipeline_migrate_command(tmp_path):
    """`pipeline migrate` brings the configured database to the head."""
    path = tmp_path / "cmd.db"
    env = {**os.environ, "PIPELINE_DATABASE_URL": f"sqlite:///{path}"}
    subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "migrate"], cwd=tmp_path, env=env, check=True
    )
    engine = db.create_engine(f"sqlite:///{path}")
    try:
        db.check_schema(engine)
    finally:
        engine.dispose()


def test_pipeline_migrate_works_from_a_built_wheel(tmp_path):
    """A normal (non-editable) install ships the migrations: `pipeline migrate` finds them."""
    import zipfile

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(site)
    assert "pipeline/alembic/env.py" in names
    assert any(n.startswith("pipeline/alembic/versions/0001") for n in names)
    path = tmp_path / "from-wheel.db"
    code = (
        "import pipeline.db as d, sys; "
        "assert str(d.migrations_dir()).startswith(sys.argv[1]), d.migrations_dir(); "
        "from pipeline.cli import main; sys.exit(main(['migrate']))"
    )
    env = {**os.environ, "PIPELINE_DATABASE_URL": f"sqlite:///{path}", "PYTHONPATH": str(site)}
    subprocess.run(
        [sys.executable, "-c", code, str(site)], cwd=tmp_path, env=env, check=True, timeout=120
    )
    engine = db.create_engine(f"sqlite:///{path}")
    try:
        db.check_schema(engine)
    finally:
        engine.dispose()
