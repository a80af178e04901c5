"""The load and soak script, in its quick form: a real server kept busy, then checked."""

from __future__ import annotations

import json

from bench import load

from pipeline import db, runs
from pipeline.check import check_database
from pipeline.orchestrator import Executor, start_run
from pipeline.runs import RunStatus

from .conftest import read_run, wait_for


def test_quick_soak_has_no_5xx_no_violation_and_exercises_every_action(tmp_path):
    """Concurrent runs, polls, cancels, resumes and event streams: no 5xx, nothing broken.

    More runs at once than a client may open streams by default (20): the
    load's clients share one address, so its server must be sized for them.
    """
    options = load.Options.quick(seconds=8.0, runs=24, seed=7)
    report = load.run_load(options, workdir=tmp_path)
    print()
    print(load.format_report(report))
    json.dumps(report)  # the figures --json writes

    assert report["by_class"]["5xx"] == 0
    assert report["transport_errors"] == 0
    assert report["violations"] == []
    assert report["contract_errors"] == []
    assert report["server_exit_code"] == 0
    assert report["idle_before_stop"]
    assert report["ok"], report["failures"]

    actions = report["actions"]
    assert actions["runs_created"] > options.runs
    assert actions["cancels_accepted"] > 0
    assert actions["resumes_accepted"] > 0
    assert actions.get("cancel_conflicts", 0) + actions.get("resume_conflicts", 0) > 0
    assert report["sse"]["completed"] > 0
    assert report["sse"]["completed"] == report["sse"]["opened"]
    endpoints = report["endpoints"]
    for endpoint in (
        "POST /runs",
        "GET /runs",
        "GET /runs/{id}",
        "POST /runs/{id}/cancel",
        "POST /runs/{id}/resume",
        "GET /runs/{id}/events",
    ):
        assert endpoints[endpoint]["count"] > 0, endpoint
    assert report["runs_by_state"].get("completed", 0) > 0
    assert set(report["runs_by_state"]) <= {"completed", "failed", "cancelled", "queued"}


def test_main_writes_the_figures_as_json_and_exits_by_the_verdict(tmp_path, monkeypatch):
    """`python -m bench.load --json PATH` writes what it found, and its exit code is the verdict."""
    seen = []

    def fake_run_load(options):
        seen.append(options)
        return {"ok": len(seen) == 1, "by_class": {"5xx": len(seen) - 1}}

    monkeypatch.setattr(load, "run_load", fake_run_load)
    monkeypatch.setattr(load, "format_report", lambda report: "figures")
    out = tmp_path / "figures.json"
    assert load.main(["--quick", "--seconds", "3", "--runs", "5", "--json", str(out)]) == 0
    assert json.loads(out.read_text()) == {"ok": True, "by_class": {"5xx": 0}}
    assert (seen[0].seconds, seen[0].runs, seen[0].pollers) == (3.0, 5, 8)
    assert load.main([]) == 1
    assert (seen[1].seconds, seen[1].runs) == (60.0, 50)


def test_bench_pipeline_fails_once_and_its_rows_match_the_completed_phases(sqlite_url):
    """The bench's own rule (rows of exactly the completed phases) holds, and catches strays."""
    engine = db.create_engine(sqlite_url)
    try:
        with db.write(engine) as conn:
            conn.exec_driver_sql(load.BENCH_DDL)
        run_id, thread = start_run(sqlite_url, {"pause": 0, "fail_phase": 2}, load.PHASES)
        thread.join(30)
        assert read_run(engine, run_id).status is RunStatus.FAILED
        assert load.check_bench_rows(engine) == []
        with db.write(engine) as conn:
            recorded = runs.recorded_phases(conn, run_id=run_id)
            assert runs.resume(conn, run_id=run_id, phases=recorded) is runs.Outcome.DONE
        executor = Executor(sqlite_url, load.PHASES)
        try:
            executor.wake()
            wait_for(lambda: read_run(engine, run_id).status is RunStatus.COMPLETED, timeout=30)
        finally:
            assert executor.shutdown(wait=True, timeout=30)
        assert [w.message for w in read_run(engine, run_id).warnings] == [load.FAIL_MARK]
        assert load.check_bench_rows(engine) == []
        assert check_database(engine, expect_idle=True) == []

        with db.write(engine) as conn:
            conn.exec_driver_sql(
                "DELETE FROM bench_items WHERE run_id = ? AND phase = 1 AND n = 0", (run_id,)
            )
            conn.exec_driver_sql("UPDATE run_phases SET status = 'pending' WHERE phase_num = 4")
        assert load.check_bench_rows(engine) == [
            f"run {run_id} phase 1: 2 bench rows for a completed phase, expected 3",
            f"run {run_id} phase 4: 3 bench rows left by a phase that did not complete",
        ]
    finally:
        engine.dispose()


def test_what_a_client_is_told_is_checked_for_contradictions():
    """A Run JSON that contradicts itself is a contract error for the soak."""
    good = {
        "id": 1,
        "status": "completed",
        "percent": 100.0,
        "progress_current": 4,
        "progress_total": 4,
        "completed_at": "2026-01-01T00:00:00Z",
        "started_at": "2026-01-01T00:00:00Z",
    }
    assert load._check_run_json(good, "t") == []
    assert load._check_run_json({**good, "percent": 99.9}, "t") == [
        "t: run 1 (completed): percent 99.9 while completed"
    ]
    assert load._check_run_json({**good, "status": "running"}, "t") != []
    assert load._check_run_json({**good, "progress_current": 3}, "t") != []
    assert load._check_run_json([], "t") == ["t: not a Run: []"]
