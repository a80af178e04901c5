"""`pipeline schedule ...`, run as a user would: a real subprocess per command.

Each command works on a migrated database (SQLite, and PostgreSQL too for the
``db_url`` tests when PIPELINE_TEST_POSTGRES_URL is set). What they wrote is
read back from the database; every refusal is one line, exit 2 (what the
schedules issue asks, the code of a usage error), and writes nothing.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import zoneinfo
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from pipeline import db, runs, schedules
from pipeline.schedules import Schedule

from .conftest import execute, scalar

ROOT = Path(__file__).resolve().parents[1]
TWO = "tests.registries:OK,tests.registries:FAILS"


def environment(url: str, tmp_path: Path) -> dict[str, str]:
    """A user's environment: this database, the default pipeline, wide output."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIPELINE_")}
    return {
        **env,
        "PIPELINE_DATABASE_URL": url,
        "PIPELINE_TEST_DIR": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "COLUMNS": "250",  # no table cell is wrapped: the text stays whole
    }


@pytest.fixture
def cli_env(db_url: str, tmp_path: Path) -> dict[str, str]:
    return environment(db_url, tmp_path)


@pytest.fixture
def sqlite_env(sqlite_url: str, tmp_path: Path) -> dict[str, str]:
    return environment(sqlite_url, tmp_path)


@pytest.fixture
def sqlite_engine(sqlite_url: str):
    engine = db.create_engine(sqlite_url)
    yield engine
    engine.dispose()


def pipeline(
    env: dict[str, str], *args: str, phases: str | None = None
) -> subprocess.CompletedProcess[str]:
    extra = {} if phases is None else {"PIPELINE_PHASES": phases}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env={**env, **extra},
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def one_line_refusal(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The refusal's one stderr line (and nothing on stdout, no traceback)."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[0]


def read_schedule(engine: Engine, name: str) -> Schedule | None:
    with db.read(engine) as conn:
        return schedules.get_schedule(conn, name=name)


def count_schedules(engine: Engine) -> int:
    return int(scalar(engine, "SELECT count(*) FROM schedules"))


def listed_row(listing: str, name: str) -> str:
    """The table row of the schedule called ``name`` (the cells between │)."""
    rows = [line for line in listing.splitlines() if f"│ {name} " in line]
    assert len(rows) == 1, listing
    return rows[0]


def test_add_prints_the_id_and_list_shows_it_with_its_next_fire_in_words(cli_env, engine):
    """`schedule add` stores the checked schedule, prints its id; `list` shows when it fires."""
    added = ok(
        pipeline(
            cli_env,
            "schedule",
            "add",
            "weekdays",
            "--pipeline",
            "phases",
            "--cron",
            "0 6 * * MON-FRI",
            "--timezone",
            "Europe/Berlin",
            "--params",
            '{"limit": 5}',
        )
    )
    found = read_schedule(engine, "weekdays")
    assert found is not None
    assert int(added.stdout) == found.id
    assert found.pipeline == "phases"
    assert found.params == {"fetch_delay": 0.05, "limit": 5}  # validated, defaults filled in
    assert (found.cron, found.timezone, found.enabled) == ("0 6 * * MON-FRI", "Europe/Berlin", True)
    assert (found.overlap, found.catch_up) == ("skip", "latest")
    assert found.next_fire_at is not None
    local = found.next_fire_at.astimezone(zoneinfo.ZoneInfo("Europe/Berlin"))
    assert (local.hour, local.minute) == (6, 0)
    assert local.weekday() < 5
    next_fire = runs.rfc3339(found.next_fire_at)
    assert next_fire is not None
    assert len(added.stderr.splitlines()) == 1
    assert f"next fire {next_fire}" in added.stderr

    listing = ok(pipeline(cli_env, "schedule", "list")).stdout
    row = listed_row(listing, "weekdays")
    for cell in (
        str(found.id),
        "phases",
        "0 6 * * MON-FRI",
        "At 06:00 on Monday through Friday",
        "Europe/Berlin",
        "yes",
        "skip",
        next_fire,
    ):
        assert f" {cell} " in row, row


def test_add_takes_overlap_catch_up_and_disabled(sqlite_env, sqlite_engine):
    """--overlap, --catch-up and --disabled are stored; a disabled schedule has no next fire."""
    added = ok(
        pipeline(
            sqlite_env,
            "schedule",
            "add",
            "hourly",
            "--cron",
            "@hourly",
            "--overlap",
            "queue",
            "--catch-up",
            "none",
            "--disabled",
        )
    )
    assert "paused" in added.stderr
    found = read_schedule(sqlite_engine, "hourly")
    assert found is not None
    assert (found.pipeline, found.overlap, found.catch_up) == ("phases", "queue", "none")
    assert found.enabled is False
    assert found.next_fire_at is None
    row = listed_row(ok(pipeline(sqlite_env, "schedule", "list")).stdout, "hourly")
    assert "At the start of every hour" in row
    assert " no (paused) " in row
    assert " queue " in row


def test_pause_and_resume_change_enabled_and_next_fire(cli_env, engine):
    """pause: enabled false and no next fire; resume: enabled and the next tick from now."""
    ok(pipeline(cli_env, "schedule", "add", "often", "--cron", "*/5 * * * *"))
    before = read_schedule(engine, "often")
    assert before is not None
    assert before.enabled
    assert before.next_fire_at is not None

    paused = ok(pipeline(cli_env, "schedule", "pause", "often"))
    assert "paused" in paused.stderr
    after_pause = read_schedule(engine, "often")
    assert after_pause is not None
    assert after_pause.enabled is False
    assert after_pause.next_fire_at is None
    row = listed_row(ok(pipeline(cli_env, "schedule", "list")).stdout, "often")
    assert " no (paused) " in row

    resumed = ok(pipeline(cli_env, "schedule", "resume", "often"))
    after_resume = read_schedule(engine, "often")
    assert after_resume is not None
    assert after_resume.enabled is True
    assert after_resume.next_fire_at is not None
    assert after_resume.next_fire_at >= before.next_fire_at
    assert after_resume.next_fire_at.minute % 5 == 0
    assert after_resume.next_fire_at - dt.datetime.now(dt.UTC) <= dt.timedelta(minutes=6)
    assert f"next fire {runs.rfc3339(after_resume.next_fire_at)}" in resumed.stderr
    row = listed_row(ok(pipeline(cli_env, "schedule", "list")).stdout, "often")
    assert " yes " in row


def test_remove_deletes_it_and_keeps_its_runs(cli_env, engine):
    """`schedule remove` deletes the schedule; the runs it started stay."""
    schedule_id = int(ok(pipeline(cli_env, "schedule", "add", "gone", "--cron", "@daily")).stdout)
    with db.write(engine) as conn:  # a run this schedule started, as a firer records it
        run_id = runs.create_run(conn, params={}, pipeline="phases", schedule_id=schedule_id).id
    execute(engine, "UPDATE schedules SET last_run_id = :r WHERE id = :s", r=run_id, s=schedule_id)
    row = listed_row(ok(pipeline(cli_env, "schedule", "list")).stdout, "gone")
    assert f" {run_id} queued " in row

    removed = ok(pipeline(cli_env, "schedule", "remove", "gone"))
    assert "runs it started are kept" in removed.stderr
    assert read_schedule(engine, "gone") is None
    assert count_schedules(engine) == 0
    assert scalar(engine, "SELECT schedule_id FROM analysis_runs WHERE id = :r", r=run_id) == (
        schedule_id
    )
    assert "gone" not in ok(pipeline(cli_env, "schedule", "list")).stdout


def test_pipeline_may_be_left_out_only_when_one_is_loaded(sqlite_env, sqlite_engine):
    """With several pipelines loaded, --pipeline is needed, and names the one scheduled."""
    refused = pipeline(sqlite_env, "schedule", "add", "which", "--cron", "@daily", phases=TWO)
    assert "name the pipeline: this service has several" in one_line_refusal(refused)
    assert count_schedules(sqlite_engine) == 0
    ok(
        pipeline(
            sqlite_env,
            "schedule",
            "add",
            "which",
            "--cron",
            "@daily",
            "--pipeline",
            "fails",
            phases=TWO,
        )
    )
    found = read_schedule(sqlite_engine, "which")
    assert found is not None
    assert found.pipeline == "fails"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--cron", "0 6 * *"], "'cron' needs 5 fields", id="cron-fields"),
        pytest.param(["--cron", "61 6 * * *"], "'cron' '61 6 * * *' is not valid", id="cron-value"),
        pytest.param(
            ["--cron", "@daily", "--timezone", "Mars/Olympus"],
            "unknown: 'Mars/Olympus'",
            id="timezone",
        ),
        pytest.param(
            ["--cron", "@daily", "--pipeline", "nope"],
            "no pipeline named 'nope'; known: phases",
            id="unknown-pipeline",
        ),
        pytest.param(
            ["--cron", "@daily", "--params", '{"fetch_delay": 9, "limit": 0}'],
            "--params: params.fetch_delay: Input should be less than or equal to 5; params.limit",
            id="params-model",
        ),
        pytest.param(
            ["--cron", "@daily", "--params", "{nope"], "--params: not valid JSON", id="params-json"
        ),
        pytest.param(
            ["--cron", "@daily", "--params", "[1]"], "must be a JSON object", id="params-not-object"
        ),
    ],
)
def test_bad_add_is_one_line_exit_2_and_writes_nothing(sqlite_env, sqlite_engine, args, message):
    """Each mistake in `schedule add` is named in one line; no schedule is created."""
    result = pipeline(sqlite_env, "schedule", "add", "nightly", *args)
    assert message in one_line_refusal(result)
    assert count_schedules(sqlite_engine) == 0


@pytest.mark.parametrize("name", ["Nightly", "x" * 65])
def test_bad_name_is_refused(sqlite_env, sqlite_engine, name):
    """A name that is not a slug is refused in one line; nothing is written."""
    result = pipeline(sqlite_env, "schedule", "add", name, "--cron", "@daily")
    assert "'name' must be a slug" in one_line_refusal(result)
    assert count_schedules(sqlite_engine) == 0


def test_taken_name_is_refused_and_the_first_stays(cli_env, engine):
    """A second schedule of the same name is refused; the first is left as it was."""
    ok(pipeline(cli_env, "schedule", "add", "twice", "--cron", "@daily"))
    again = pipeline(cli_env, "schedule", "add", "twice", "--cron", "@hourly", "--disabled")
    assert "a schedule named 'twice' exists already" in one_line_refusal(again)
    assert count_schedules(engine) == 1
    found = read_schedule(engine, "twice")
    assert found is not None
    assert (found.cron, found.enabled) == ("@daily", True)


def test_unknown_name_is_one_line_and_changes_nothing(sqlite_env, sqlite_engine):
    """pause/resume/remove of a name no schedule has: one line, exit 2, nothing changed."""
    ok(pipeline(sqlite_env, "schedule", "add", "kept", "--cron", "@daily"))
    before = read_schedule(sqlite_engine, "kept")
    for action in ("pause", "resume", "remove"):
        result = pipeline(sqlite_env, "schedule", action, "missing")
        assert one_line_refusal(result) == "error: no schedule named 'missing'", action
        assert read_schedule(sqlite_engine, "kept") == before, action


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["add", "x"], "required: --cron", id="no-cron"),
        pytest.param(["add", "x", "--cron", "@daily", "--overlap", "sometimes"], "--overlap"),
        pytest.param(["rename", "x"], "invalid choice: 'rename'", id="no-such-action"),
    ],
)
def test_usage_mistakes_are_one_line_exit_2(sqlite_env, sqlite_engine, args, message):
    """Arguments argparse refuses: one line, exit 2 (as for every other command)."""
    result = pipeline(sqlite_env, "schedule", *args)
    assert message in one_line_refusal(result, code=2)
    assert count_schedules(sqlite_engine) == 0


def test_an_unmigrated_database_is_refused_with_the_fix(tmp_path):
    """`schedule list` on a database not migrated says to run `pipeline migrate`."""
    env = environment(f"sqlite:///{tmp_path / 'new.db'}", tmp_path)
    line = one_line_refusal(pipeline(env, "schedule", "list"), code=64)  # as every command
    assert "pipeline migrate" in line
