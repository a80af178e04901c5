"""The `pipeline` command, run as a user would: a real subprocess per call."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.runs import RunStatus

from .conftest import read_run, scalar, wait_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cli_env(db_url, tmp_path):
    return {
        **os.environ,
        "PIPELINE_DATABASE_URL": db_url,
        "PIPELINE_TEST_DIR": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    }


def pipeline(env, *args, phases="tests.registries:OK", timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env={**env, "PIPELINE_PHASES": phases},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


TWO = "tests.registries:OK,tests.registries:FAILS"


def test_run_pipeline_picks_one_of_several(cli_env, engine):
    """`pipeline run --wait --pipeline NAME` runs that pipeline among several loaded."""
    result = pipeline(cli_env, "run", "--wait", "--pipeline", "fails", phases=TWO)
    assert result.returncode == 1, result.stderr
    run = read_run(engine, scalar(engine, "SELECT max(id) FROM analysis_runs"))
    assert run.pipeline == "fails"
    assert run.status is RunStatus.FAILED


def test_run_without_wait_queues_for_the_named_pipeline_with_defaults(cli_env, engine):
    """`pipeline run` with one pipeline queues a run of it, its params validated with defaults."""
    result = pipeline(
        cli_env, "run", "--params", '{"limit": 3}', phases="pipeline.example:PIPELINE"
    )
    assert result.returncode == 0, result.stderr
    run = read_run(engine, int(result.stdout.strip()))
    assert run.pipeline == "phases"
    assert run.params == {"fetch_delay": 0.05, "limit": 3}


def run_wait_cancellable(env):
    """`pipeline run --wait` of a phase that runs until cancelled (or killed)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", "--wait"],
        env={**env, "PIPELINE_PHASES": "tests.registries:CANCELLABLE"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize(
    ("phases", "code", "status"),
    [
        pytest.param("tests.registries:OK", 0, RunStatus.COMPLETED, id="completed"),
        pytest.param("tests.registries:FAILS", 1, RunStatus.FAILED, id="failed"),
    ],
)
def test_run_wait_exit_code_tells_the_outcome(cli_env, engine, phases, code, status):
    """`pipeline run --wait` executes the run here and exits 0 completed, 1 failed."""
    result = pipeline(cli_env, "run", "--wait", "--params", '{"k": 1}', phases=phases)
    assert result.returncode == code, result.stderr
    run_id = scalar(engine, "SELECT max(id) FROM analysis_runs")
    run = read_run(engine, run_id)
    assert run.status is status
    assert run.params == {"k": 1}
    if status is RunStatus.FAILED:
        assert "the analysis could not finish" in result.stderr


def test_run_wait_interrupt_cancels_and_exits_2(cli_env, engine, tmp_path):
    """Ctrl-C during `run --wait` asks the run to stop; it ends cancelled and the exit code is 2."""
    process = run_wait_cancellable(cli_env)
    try:
        wait_for(lambda: list(tmp_path.glob("running-*")), timeout=30)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 2, stderr
    run = read_run(engine, scalar(engine, "SELECT max(id) FROM analysis_runs"))
    assert run.status is RunStatus.CANCELLED
    assert run.completed_at is not None


def test_run_without_wait_queues_and_prints_the_id(cli_env, engine):
    """Without --wait the run is queued for a server and its id printed."""
    result = pipeline(cli_env, "run")
    assert result.returncode == 0, result.stderr
    run = read_run(engine, int(result.stdout.strip()))
    assert run.status is RunStatus.QUEUED


def test_example_pipeline_runs_to_completion_with_warnings(cli_env, engine):
    """The default registry processes the shipped dataset and records the malformed lines."""
    env = {key: value for key, value in cli_env.items() if key != "PIPELINE_PHASES"}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--wait", "--params", '{"fetch_delay": 0}'],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    run = read_run(engine, scalar(engine, "SELECT max(id) FROM analysis_runs"))
    assert run.status is RunStatus.COMPLETED
    assert len(run.warnings) == 7
    assert scalar(engine, "SELECT count(*) FROM example_comments") == 3000
    assert scalar(engine, "SELECT count(*) FROM example_thread_stats") == 60


def test_status_prints_the_run_json(cli_env):
    """`pipeline status ID` prints the same Run JSON as the API."""
    run_id = int(pipeline(cli_env, "run").stdout)
    result = pipeline(cli_env, "status", str(run_id))
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["id"] == run_id
    assert body["status"] == "queued"
    assert body["created_at"].endswith("Z")


def test_list_shows_recent_runs(cli_env):
    """`pipeline list` shows a table with the runs, newest first."""
    first = int(pipeline(cli_env, "run").stdout)
    second = int(pipeline(cli_env, "run").stdout)
    result = pipeline(cli_env, "list")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "queued" in line]
    assert str(second) in lines[0]
    assert str(first) in lines[1]


@pytest.mark.parametrize(
    ("args", "phases", "message"),
    [
        pytest.param(["run", "--params", "{nope"], None, "not valid JSON", id="params-not-json"),
        pytest.param(["run", "--params", "[1]"], None, "JSON object", id="params-not-object"),
        pytest.param(["status", "424242"], None, "no run with id", id="unknown-id"),
        pytest.param(["run"], "tests.registries:BROKEN", "no gaps", id="broken-registry"),
        pytest.param(["run"], "tests.registries", "package.module:NAME", id="bad-spec"),
        pytest.param(["run"], TWO, "name the pipeline: this service has several", id="several"),
        pytest.param(["run", "--pipeline", "nope"], TWO, "no pipeline named 'nope'", id="unknown"),
        pytest.param(
            ["run", "--params", '{"fetch_delay": 9, "limit": 0}'],
            "pipeline.example:PIPELINE",
            "--params: params.fetch_delay: Input should be less than or equal to 5; params.limit",
            id="params-model",
        ),
    ],
)
def test_bad_input_gets_a_clear_error_and_changes_nothing(cli_env, engine, args, phases, message):
    """Mistakes are explained in one line, exit 64, and no run is created."""
    result = pipeline(cli_env, *args, phases=phases or "tests.registries:OK")
    assert result.returncode == 64
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert scalar(engine, "SELECT count(*) FROM analysis_runs") == 0


def test_an_unmigrated_database_is_refused_with_the_fix(tmp_path):
    """Commands other than migrate explain that `pipeline migrate` is needed."""
    env = {**os.environ, "PIPELINE_DATABASE_URL": f"sqlite:///{tmp_path / 'new.db'}"}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--wait"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 64
    assert "pipeline migrate" in result.stderr


def test_second_interrupt_leaves_at_once(cli_env, engine, tmp_path):
    """A second Ctrl-C during `run --wait` exits 130 at once; the run is swept on the next start."""
    process = run_wait_cancellable(cli_env)
    try:
        wait_for(lambda: list(tmp_path.glob("running-*")), timeout=30)
        # ignore the first request: the phase stays put until killed
        (tmp_path / "ignore-cancel").touch()
        process.send_signal(signal.SIGINT)
        wait_for(lambda: read_run(engine, 1).cancel_requested_at is not None, timeout=30)
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 130


def test_show_prints_the_example_runs_summary_and_table(cli_env, engine):
    """`pipeline show` prints the example's summary (markdown), its threads table and its charts."""
    done = pipeline(
        cli_env,
        "run",
        "--wait",
        "--params",
        '{"fetch_delay": 0, "limit": 400}',
        phases="pipeline.example:PHASES",
    )
    assert done.returncode == 0, done.stderr
    run_id = int(scalar(engine, "SELECT max(id) FROM analysis_runs"))
    shown = pipeline(cli_env, "show", str(run_id), phases="pipeline.example:PHASES")
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert f"run {run_id} completed" in out
    assert "Fetching Reddit" in out
    assert "Writing report" in out
    assert "Sentiment report" in out
    assert "The overall mood is" in out
    assert "Comments kept: 400" in out
    assert "**" not in out
    assert "Most positive and most negative threads" in out
    assert "most positive" in out
    assert "most negative" in out
    assert "mean score" in out
    assert "very positive" in out
    assert "█" in out
    assert any(c in out for c in "▁▂▃▄▅▆▇")  # comments by hour as a sparkline


def test_show_prints_markup_in_artifacts_as_text(cli_env, engine, tmp_path):
    """Rich markup inside an artifact's data (title, table, markdown) is printed literally."""
    (tmp_path / "markup_artifacts.py").write_text(
        "def publish(conn, ctx):\n"
        "    ctx.artifact('md', title='[bold red]T[/]', markdown='say [bold]loud[/bold] :smile:')\n"
        "    ctx.artifact('tb', table={'columns': ['[red]c[/]'], 'rows': [['[blink]v[/]']]})\n"
        "PHASES = [(1, 'Publish', publish)]\n"
    )
    env = {**cli_env, "PYTHONPATH": f"{tmp_path}{os.pathsep}{cli_env['PYTHONPATH']}"}
    done = pipeline(env, "run", "--wait", phases="markup_artifacts:PHASES")
    assert done.returncode == 0, done.stderr
    run_id = int(scalar(engine, "SELECT max(id) FROM analysis_runs"))
    out = pipeline(env, "show", str(run_id), phases="markup_artifacts:PHASES").stdout
    for literal in ("[bold red]T[/]", "say [bold]loud[/bold] :smile:", "[red]c[/]", "[blink]v[/]"):
        assert literal in out, out
    assert "\x1b" not in out
