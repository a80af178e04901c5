"""Operating it: Prometheus metrics, retention, structured logs."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from pipeline import db, phase, retention, runs
from pipeline.api import create_app
from pipeline.config import Settings
from pipeline.runs import RunStatus
from pipeline.schema import analysis_runs, run_phases, run_warnings

from .conftest import is_sqlite_url, read_run, scalar, wait_for

ROOT = Path(__file__).resolve().parents[1]


class Flaky(Exception):
    pass


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 when absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    key = f"{name}{{{wanted}}}" if labels else name
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        if sample == key or (labels and _same_sample(sample, name, labels)):
            return float(value)
    return 0.0


def _same_sample(sample: str, name: str, labels: dict[str, str]) -> bool:
    if not sample.startswith(name + "{"):
        return False
    pairs = dict(p.split("=", 1) for p in sample[len(name) + 1 : -1].split(","))
    return all(pairs.get(k) == f'"{v}"' for k, v in labels.items())


def test_metrics_move_as_runs_complete(db_url):
    """Created/finished counters, state gauges, durations, retries and HTTP latency all move."""
    attempts: dict[int, int] = {}  # per run: the two runs may execute at once

    @phase(retries=1, backoff=0.01, retry_on=(Flaky,))
    def flaky_once(conn, ctx):
        attempts[ctx.run_id] = attempts.get(ctx.run_id, 0) + 1
        if ctx.params.get("fail"):
            raise RuntimeError("broken")
        if attempts[ctx.run_id] == 1:
            raise Flaky("first attempt")

    def quick(conn, ctx):
        return None

    app = create_app(
        Settings(database_url=db_url, api_token="t0ken"),  # noqa: S106 - a test token
        registry=[(1, "Flaky", flaky_once), (2, "Quick", quick)],
    )
    auth = {"Authorization": "Bearer t0ken"}
    with TestClient(app) as client:
        assert client.get("/metrics").status_code == 401
        before = client.get("/metrics", headers=auth).text
        assert metric(before, "pipeline_runs_created_total") == 0
        ok = client.post("/runs", json={}, headers=auth).json()["id"]
        bad = client.post("/runs", json={"params": {"fail": True}}, headers=auth).json()["id"]

        def both_finished() -> bool:
            found = [client.get(f"/runs/{r}", headers=auth).json()["status"] for r in (ok, bad)]
            return found == ["completed", "failed"]

        wait_for(both_finished)
        after = client.get("/metrics", headers=auth)
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    assert metric(text, "pipeline_runs_created_total") == 2
    assert metric(text, "pipeline_runs_finished_total", status="completed") == 1
    assert metric(text, "pipeline_runs_finished_total", status="failed") == 1
    assert metric(text, "pipeline_runs", status="completed") == 1
    assert metric(text, "pipeline_runs", status="failed") == 1
    assert metric(text, "pipeline_runs", status="running") == 0
    assert metric(text, "pipeline_run_duration_seconds_count", status="completed") == 1
    assert metric(text, "pipeline_phase_duration_seconds_count", phase="Quick") == 1
    assert metric(text, "pipeline_phase_retries_total", phase="Flaky") == 1
    posts = metric(
        text,
        "pipeline_http_request_duration_seconds_count",
        method="POST",
        route="/runs",
        status="201",
    )
    assert posts == 2
    unauthorized = metric(
        text,
        "pipeline_http_request_duration_seconds_count",
        method="GET",
        route="/metrics",
        status="401",
    )
    assert unauthorized == 1


def _finished_run(conn, *, status: str, ended: dt.datetime, rows: int = 2) -> int:
    run_id = runs.create_run(conn, params={}).id
    conn.execute(
        sa.update(analysis_runs)
        .where(analysis_runs.c.id == run_id)
        .values(
            status=status,
            started_at=ended,
            completed_at=ended,
            progress_total=rows,
            progress_current=rows if status == "completed" else 0,
            error_message="x" if status == "failed" else None,
        )
    )
    conn.execute(
        sa.insert(run_phases),
        [
            {
                "run_id": run_id,
                "phase_num": n,
                "label": f"P{n}",
                "status": "completed",
                "attempts": 1,
            }
            for n in range(1, rows + 1)
        ],
    )
    conn.execute(
        sa.insert(run_warnings),
        [{"run_id": run_id, "phase": 1, "message": "w", "created_at": ended}],
    )
    return run_id


def test_prune_deletes_only_old_finished_runs_and_their_rows(db_url, engine):
    """Old completed/failed/cancelled go with their phases and warnings; the rest stay."""
    now = runs.utcnow()
    old = now - dt.timedelta(days=40)
    with db.write(engine) as conn:
        gone = [
            _finished_run(conn, status=s, ended=old) for s in ("completed", "failed", "cancelled")
        ]
        recent = _finished_run(conn, status="completed", ended=now - dt.timedelta(days=1))
        queued = runs.create_run(conn, params={}).id
        conn.execute(
            sa.update(analysis_runs).where(analysis_runs.c.id == queued).values(created_at=old)
        )
    assert retention.prune(engine, older_than=dt.timedelta(days=30), dry_run=True) == 3
    assert scalar(engine, "SELECT count(*) FROM analysis_runs") == 5
    assert retention.prune(engine, older_than=dt.timedelta(days=30), batch_size=2) == 3
    with db.read(engine) as conn:
        remaining = set(conn.execute(sa.select(analysis_runs.c.id)).scalars())
    assert remaining == {recent, queued}
    for table in ("run_phases", "run_warnings"):
        leftovers = scalar(
            engine, f"SELECT count(*) FROM {table} WHERE run_id IN ({','.join(map(str, gone))})"
        )
        assert leftovers == 0, table
    if is_sqlite_url(str(engine.url)):
        with db.read(engine) as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []


def test_prune_by_status_and_never_unfinished(db_url, engine):
    """--status narrows the prune; queued and running runs are never deleted."""
    old = runs.utcnow() - dt.timedelta(days=10)
    with db.write(engine) as conn:
        failed = _finished_run(conn, status="failed", ended=old)
        completed = _finished_run(conn, status="completed", ended=old)
        running = runs.create_run(conn, params={}).id
        conn.execute(
            sa.update(analysis_runs)
            .where(analysis_runs.c.id == running)
            .values(status="running", started_at=old, completed_at=None)
        )
    deleted = retention.prune(
        engine,
        older_than=dt.timedelta(days=1),
        statuses=[RunStatus.FAILED, RunStatus.RUNNING, RunStatus.QUEUED],
    )
    assert deleted == 1
    assert read_run(engine, completed).status is RunStatus.COMPLETED
    assert read_run(engine, running).status is RunStatus.RUNNING
    with db.read(engine) as conn:
        assert runs.get_run(conn, run_id=failed) is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30d", 30 * 86400),
        ("12h", 43200),
        ("90m", 5400),
        ("45s", 45),
        ("1d12h", 129600),
        ("2w", 1209600),
    ],
)
def test_parse_duration(text, seconds):
    """Durations read as people write them."""
    assert retention.parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "30", "d", "30x", "-1d", "0d", "1.5h", "30 days"])
def test_parse_duration_refuses_nonsense(text):
    """A duration that is not one is refused with the form it should take."""
    with pytest.raises(ValueError, match="duration"):
        retention.parse_duration(text)


def test_prune_command(db_url, engine):
    """`pipeline prune --older-than 7d [--dry-run]` counts, then deletes."""
    old = runs.utcnow() - dt.timedelta(days=8)
    with db.write(engine) as conn:
        for _ in range(3):
            _finished_run(conn, status="completed", ended=old)
    env = {**os.environ, "PIPELINE_DATABASE_URL": db_url}
    command = [sys.executable, "-m", "pipeline.cli", "prune", "--older-than", "7d"]
    dry = subprocess.run([*command, "--dry-run"], env=env, capture_output=True, text=True)
    assert (dry.returncode, dry.stdout.strip()) == (0, "3"), dry.stderr
    assert scalar(engine, "SELECT count(*) FROM analysis_runs") == 3
    real = subprocess.run(command, env=env, capture_output=True, text=True)
    assert (real.returncode, real.stdout.strip()) == (0, "3"), real.stderr
    assert scalar(engine, "SELECT count(*) FROM analysis_runs") == 0
    bad = subprocess.run([*command[:-1], "soon"], env=env, capture_output=True, text=True)
    assert bad.returncode == 64
    assert "not a duration" in bad.stderr


def test_server_prunes_periodically_with_retention_set(db_url, engine):
    """PIPELINE_RETENTION makes the server prune by itself."""
    with db.write(engine) as conn:
        _finished_run(conn, status="completed", ended=runs.utcnow() - dt.timedelta(hours=2))
    settings = Settings(database_url=db_url, retention="1h", prune_seconds=0.1, poll_seconds=0.05)
    with TestClient(create_app(settings, registry=[(1, "Noop", lambda c, x: None)])):
        wait_for(lambda: scalar(engine, "SELECT count(*) FROM analysis_runs") == 0, timeout=10)


def test_large_prune_never_blocks_api_writes_for_long(sqlite_url):
    """100,000 old runs pruned while a client keeps writing: no write waits long."""
    engine = db.create_engine(sqlite_url)
    old = runs.utcnow() - dt.timedelta(days=100)
    rows = [
        {
            "status": "completed",
            "params": {},
            "progress_current": 1,
            "progress_total": 1,
            "created_at": old,
            "started_at": old,
            "completed_at": old,
        }
        for _ in range(100_000)
    ]
    with db.write(engine) as conn:
        conn.execute(sa.insert(analysis_runs), rows)
    done = threading.Event()
    waits: list[float] = []

    def writer():
        while not done.is_set():
            started = time.perf_counter()
            with db.write(engine) as conn:
                runs.create_run(conn, params={})
            waits.append(time.perf_counter() - started)

    client = threading.Thread(target=writer)
    client.start()
    started = time.perf_counter()
    try:
        deleted = retention.prune(engine, older_than=dt.timedelta(days=30))
    finally:
        done.set()
        client.join(30)
    elapsed = time.perf_counter() - started
    print(
        f"\npruned {deleted} runs in {elapsed:.2f}s; {len(waits)} writes meanwhile, "
        f"longest {max(waits) * 1000:.0f} ms"
    )
    assert deleted == 100_000
    assert len(waits) > 10
    assert max(waits) < 0.5
    engine.dispose()


def test_json_logs_one_object_per_line_with_run_id_and_traceback(db_url, tmp_path):
    """PIPELINE_LOG_FORMAT=json: every line parses; run lines carry run_id, failures a traceback."""
    env = {
        **os.environ,
        "PIPELINE_DATABASE_URL": db_url,
        "PIPELINE_PHASES": "tests.registries:FAILS",
        "PIPELINE_LOG_FORMAT": "json",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    }
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--wait"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    records = []
    for line in result.stderr.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    run_records = [r for r in records if r["logger"] == "pipeline.run"]
    assert run_records
    assert all(isinstance(r["run_id"], int) for r in run_records)
    assert {"time", "level", "logger", "message"} <= set(run_records[0])
    failure = [r for r in run_records if r["level"] == "ERROR"]
    assert failure
    assert failure[0]["phase"] == 2
    assert "RuntimeError: the analysis could not finish" in failure[0]["traceback"]
    assert failure[0]["time"].endswith("Z")
