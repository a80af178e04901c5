"""What the `pipeline` command prints: data as text, never as markup, and no passwords.

Each test runs the real command in a subprocess, as a user (or a CI job) would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipeline import db, runs

from .conftest import POSTGRES_URL, read_run, scalar

ROOT = Path(__file__).resolve().parents[1]
MARKUP = "boom [/] [bold red]loud[/]"
WARNING = "careful [/] [red]w[/] :smile:"
SECRET = "SECRET"  # noqa: S105 (a test password)
CLOSED_PORT_URL = f"postgresql+psycopg://user:{SECRET}@127.0.0.1:1/nothing"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

# A registry module written into tmp_path (and put on PYTHONPATH): phase 1
# warns, reports sub-progress and stays a little (so that a live display draws
# its bar), phase 2 fails; labels, warning and error all look like markup.
MARKUP_PHASES = textwrap.dedent(
    f"""
    import time


    def warns(conn, ctx):
        ctx.warn({WARNING!r})
        ctx.progress(1, 2)
        time.sleep(1.0)
        ctx.progress(2, 2)


    def fails(conn, ctx):
        raise RuntimeError({MARKUP!r})


    PHASES = [(1, "Warns [/] [bold]x[/]", warns), (2, "Fails [bold]y[/]", fails)]
    """
)


@pytest.fixture
def cli_env(sqlite_url: str, tmp_path: Path) -> dict[str, str]:
    """The environment of a user of a migrated SQLite database, with wide output."""
    (tmp_path / "markup_phases.py").write_text(MARKUP_PHASES)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIPELINE_")}
    return {
        **env,
        "PIPELINE_DATABASE_URL": sqlite_url,
        "PIPELINE_PHASES": "markup_phases:PHASES",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "src"), str(ROOT)]),
        "COLUMNS": "200",  # no table cell or line is wrapped: the text stays whole
    }


def pipeline(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def failed_run(url: str, error_message: str, *, label: str | None = None) -> int:
    """A run ended failed with this message, written as any runner would have left it."""
    engine = db.create_engine(url)
    try:
        with db.write(engine) as conn:
            run_id = runs.create_run(conn, params={}).id
            conn.execute(
                sa.text(
                    "UPDATE analysis_runs SET status = 'failed', error_message = :message, "
                    "current_phase = 1, phase_label = :label, completed_at = :now WHERE id = :id"
                ),
                {"message": error_message, "label": label, "now": runs.utcnow(), "id": run_id},
            )
    finally:
        engine.dispose()
    return run_id


def test_list_prints_an_error_message_that_looks_like_markup_literally(cli_env, sqlite_url):
    """`pipeline list` shows an error message and a phase label with rich markup as typed."""
    failed_run(sqlite_url, MARKUP, label="Label [bold]x[/] :smile:")
    result = pipeline(cli_env, "list")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert MARKUP in result.stdout
    assert "Label [bold]x[/] :smile:" in result.stdout


def test_list_shows_control_characters_as_escapes(cli_env, sqlite_url):
    """An escape sequence stored in an error message reaches the terminal as visible text."""
    failed_run(sqlite_url, "clear \x1b[2J screen")
    result = pipeline(cli_env, "list")
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    assert "clear \\x1b[2J screen" in result.stdout


def test_run_wait_prints_a_failure_that_looks_like_markup_literally(cli_env, sqlite_url):
    """`pipeline run --wait` of a phase failing with markup in its message prints it and exits 1."""
    result = pipeline(cli_env, "run", "--wait")
    assert result.returncode == 1, result.stderr
    assert "MarkupError" not in result.stderr  # (the log has the phase's own traceback)
    engine = db.create_engine(sqlite_url)
    try:
        run_id = scalar(engine, "SELECT max(id) FROM analysis_runs")
        assert read_run(engine, run_id).error_message == MARKUP
    finally:
        engine.dispose()
    assert f"run {run_id} failed in phase 2: {MARKUP}" in result.stderr
    assert f"warning (phase 1): {WARNING}" in result.stderr
    assert f"run {run_id} [failed]" in result.stderr  # the bar's own brackets, not markup


def test_run_wait_live_bars_show_labels_literally(cli_env):
    """On a terminal the live progress bars show a phase label with markup as typed."""
    env = {**cli_env, "FORCE_COLOR": "1", "TTY_COMPATIBLE": "1"}
    result = pipeline(env, "run", "--wait")
    assert result.returncode == 1, result.stderr
    assert "MarkupError" not in result.stderr
    shown = ANSI.sub("", result.stderr)
    assert "phase 1/2: Warns [/] [bold]x[/]" in shown
    assert f"failed in phase 2: {MARKUP}" in shown


def test_failed_migrate_never_shows_the_password():
    """A `pipeline migrate` that cannot connect says so in one line, the password hidden."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIPELINE_")}
    result = pipeline({**env, "PIPELINE_DATABASE_URL": CLOSED_PORT_URL}, "migrate")
    assert result.returncode != 0
    assert SECRET not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "user:***@127.0.0.1:1/nothing" in lines[0]


@pytest.fixture
def postgres_url_with_password() -> Iterator[str]:
    """A fresh, empty PostgreSQL database whose URL carries a password (trust auth ignores it)."""
    if POSTGRES_URL is None:
        pytest.skip("PIPELINE_TEST_POSTGRES_URL is not set")
    name = f"pipeline_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        url = sa.make_url(POSTGRES_URL).set(database=name, password=SECRET)
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def test_successful_migrate_never_shows_the_password(postgres_url_with_password):
    """`pipeline migrate` of a PostgreSQL URL with a password reports it with `***` instead."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIPELINE_")}
    for flags in ([], ["-v"]):  # DEBUG logging shows no password either
        result = pipeline(
            {**env, "PIPELINE_DATABASE_URL": postgres_url_with_password}, *flags, "migrate"
        )
        assert result.returncode == 0, result.stderr
        assert SECRET not in result.stdout + result.stderr
        assert ":***@" in result.stderr
    engine = db.create_engine(postgres_url_with_password)
    try:
        db.check_schema(engine)  # it really migrated
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        pytest.param("PIPELINE_MAX_CONCURRENT_RUNS", "0", id="out-of-range"),
        pytest.param("PIPELINE_LOG_FORMAT", f"x{SECRET}", id="bad-choice"),
    ],
)
def test_bad_configuration_is_one_line_without_the_password(variable, value):
    """A bad PIPELINE_* value is refused in one line naming it, echoing no value or password."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIPELINE_")}
    env.update({"PIPELINE_DATABASE_URL": CLOSED_PORT_URL, variable: value})
    result = pipeline(env, "list")
    assert result.returncode == 64
    assert result.stdout == ""
    assert SECRET not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: bad configuration:")
    assert variable in lines[0]


def test_unusable_database_url_is_one_line_without_the_password():
    """A database URL SQLAlchemy cannot use is refused in one line, without its password."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIPELINE_")}
    for url in (
        f"postgresql+psycopg://user:{SECRET}@host:notaport/db",
        f"nodriver://user:{SECRET}@host/db",
    ):
        result = pipeline({**env, "PIPELINE_DATABASE_URL": url}, "list")
        assert result.returncode == 64, result.stderr
        assert SECRET not in result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "PIPELINE_DATABASE_URL" in lines[0]
