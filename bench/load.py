"""Load and soak: a real ``pipeline serve`` kept busy, then checked for lies.

    python -m bench.load [--quick] [--seconds N] [--runs N] [--json PATH] [--seed N]

For a bounded time, against a server on 127.0.0.1 and a fresh SQLite file:

* ``--runs`` runs (default 50) of the short pipeline below are kept going at
  once: a new run is started as soon as one ends;
* 8 clients poll ``GET /runs/{id}`` and ``GET /runs`` (filters, pages, and a
  few unknown ids and bad filters: 404 and 422 are expected);
* 2 clients cancel runs (mostly active ones; a 409 for a run that already
  ended is expected) and 2 resume runs (mostly failed or cancelled ones; a
  409 for one that is not is expected);
* one SSE client per active run reads ``GET /runs/{id}/events`` to its end.

Then it stops starting work, waits (bounded) until no run is queued or
running, stops the server with SIGTERM (it must exit 0), and prints the
figures: requests by status, p50/p99 latency per endpoint, SSE streams,
runs by final state, and the invariant checker's verdict
(:func:`pipeline.check.check_database` with ``expect_idle=True``, plus this
pipeline's own rule: the rows of exactly the completed phases exist).

The exit code is 1 if any request got a 5xx or a transport error, if any
invariant or contract was violated (a Run JSON contradicting itself, a
percent going backwards, an event stream that ends without a terminal
state), if runs were still busy after the drain, or if the server did not
exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from bench.common import free_port, spawn_until_healthy, tail_of_log
from pipeline import db
from pipeline.check import check_database
from pipeline.orchestrator import RunContext
from pipeline.schema import run_phases, run_warnings

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = frozenset({"completed", "failed", "cancelled"})

# -- the pipeline the server runs (PIPELINE_PHASES=bench.load:PHASES) -----------------

ROWS_PER_PHASE = 3
FAIL_MARK = "bench: planned failure"

# The bench's own table, created in the temporary database before the server
# starts (a phase may only write tables that exist).
BENCH_DDL = """
CREATE TABLE bench_items (
    run_id INTEGER NOT NULL REFERENCES analysis_runs (id) ON DELETE CASCADE,
    phase INTEGER NOT NULL,
    n INTEGER NOT NULL,
    value FLOAT NOT NULL,
    PRIMARY KEY (run_id, phase, n)
)
"""
bench_items = sa.Table(
    "bench_items",
    sa.MetaData(),
    sa.Column("run_id", sa.Integer, primary_key=True),
    sa.Column("phase", sa.Integer, primary_key=True),
    sa.Column("n", sa.Integer, primary_key=True),
    sa.Column("value", sa.Float, nullable=False),
)


def _attempts(run: dict[str, Any]) -> int:
    """How many attempts the run's phases have had: one more means a new execution began."""
    phases = run.get("phases")
    if not isinstance(phases, list):
        return 0
    return sum(p.get("attempts", 0) for p in phases if isinstance(p, dict))


class PlannedFailure(RuntimeError):
    """What a run asked to fail (``params.fail_phase``) raises, the first time only."""


def _number(value: object, default: float, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return min(max(float(value), low), high)


def bench_phase(conn: Connection, ctx: RunContext) -> None:
    """Sleep (no SQL yet, so no lock held) with sub-progress, then write in one burst.

    ``params``: ``pause`` (seconds before the first statement), ``warn_phase``
    (record a warning there), ``fail_phase`` (fail there, the first time only:
    the failure leaves a warning that a resumed run finds).
    """
    pause = _number(ctx.params.get("pause"), 0.1, 0.0, 2.0)
    steps = 4
    for step in range(1, steps + 1):
        ctx.raise_if_cancelled()
        time.sleep(pause / steps)
        ctx.progress(step, steps)
    if ctx.params.get("warn_phase") == ctx.phase_num:
        ctx.warn(f"bench: a warning from phase {ctx.phase_num}")
    if ctx.params.get("fail_phase") == ctx.phase_num:
        failed_before = conn.execute(
            sa.select(sa.func.count())
            .select_from(run_warnings)
            .where(run_warnings.c.run_id == ctx.run_id, run_warnings.c.message == FAIL_MARK)
        ).scalar_one()
        if not failed_before:
            ctx.warn(FAIL_MARK)
            raise PlannedFailure(f"planned failure in phase {ctx.phase_num}")
    conn.execute(
        sa.insert(bench_items),
        [
            {"run_id": ctx.run_id, "phase": ctx.phase_num, "n": n, "value": random.random()}
            for n in range(ROWS_PER_PHASE)
        ],
    )


PHASES = [
    (1, "Fetching", bench_phase),
    (2, "Scoring", bench_phase),
    (3, "Aggregating", bench_phase),
    (4, "Reporting", bench_phase),
]


def check_bench_rows(engine: Engine) -> list[str]:
    """Invariant 1 for this pipeline: rows exist for exactly the completed phases."""
    with db.read(engine) as conn:
        rows = {
            (run_id, phase): count
            for run_id, phase, count in conn.execute(
                sa.select(bench_items.c.run_id, bench_items.c.phase, sa.func.count()).group_by(
                    bench_items.c.run_id, bench_items.c.phase
                )
            )
        }
        completed = {
            (run_id, phase)
            for run_id, phase in conn.execute(
                sa.select(run_phases.c.run_id, run_phases.c.phase_num).where(
                    run_phases.c.status == "completed"
                )
            )
        }
    problems = [
        f"run {run_id} phase {phase}: {rows.get((run_id, phase), 0)} bench rows for a "
        f"completed phase, expected {ROWS_PER_PHASE}"
        for run_id, phase in sorted(completed)
        if rows.get((run_id, phase)) != ROWS_PER_PHASE
    ]
    problems += [
        f"run {run_id} phase {phase}: {count} bench rows left by a phase that did not complete"
        for (run_id, phase), count in sorted(rows.items())
        if (run_id, phase) not in completed
    ]
    return problems


# -- options ------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    seconds: float = 60.0
    runs: int = 50  # runs kept going at once (and the server's PIPELINE_MAX_CONCURRENT_RUNS)
    pollers: int = 8
    cancellers: int = 2
    resumers: int = 2
    seed: int = 1
    fail_rate: float = 0.1
    drain_seconds: float = 60.0
    stop_seconds: float = 60.0
    request_timeout: float = 30.0

    @classmethod
    def quick(cls, **changes: Any) -> Options:
        return cls(**{"seconds": 12.0, "runs": 16, "pollers": 8, **changes})

    @property
    def max_requests_per_client(self) -> int:
        """A hard bound on each loop, whatever the clock does (at most 200 per second)."""
        return int(self.seconds * 200) + 1


# -- the server -----------------------------------------------------------------------


class Server:
    """``pipeline serve`` in a subprocess on 127.0.0.1, logging to a file."""

    def __init__(self, db_url: str, log_path: Path, *, max_concurrent: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
        pythonpath = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.env = {
            **env,
            "PYTHONPATH": pythonpath,
            "PIPELINE_DATABASE_URL": db_url,
            "PIPELINE_PHASES": "bench.load:PHASES",
            "PIPELINE_MAX_CONCURRENT_RUNS": str(max_concurrent),
            # All the load's clients share one address, where a real server
            # sees a user per address: its stream cap (20 by default) would
            # refuse the streams of the runs kept going (one each, and one more
            # for each resumed run), so it is sized for them.
            "PIPELINE_MAX_STREAMS_PER_CLIENT": str(2 * max_concurrent + 20),
            "PIPELINE_MAX_EVENT_STREAMS": str(max(200, 2 * max_concurrent + 20)),
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        self.process = spawn_until_healthy(
            [sys.executable, "-m", "pipeline.cli", "serve", "--port", str(self.port)],
            env=self.env,
            log_path=self.log_path,
            url=self.url,
            timeout=timeout,
        )

    def stop(self, timeout: float) -> int:
        """SIGTERM, then wait; a server that does not stop in time is killed (and reported)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -999

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def logtail_of_log(self, lines: int = 40) -> str:
        return tail_of_log(self.log_path, lines)


# -- the figures ----------------------------------------------------------------------


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    transport_errors: Counter[str] = field(default_factory=Counter)
    transport_samples: list[str] = field(default_factory=list)
    contract_errors: list[str] = field(default_factory=list)
    actions: Counter[str] = field(default_factory=Counter)
    sse_opened: int = 0
    sse_completed: int = 0
    sse_events: int = 0
    sse_unfinished: int = 0

    def record(self, endpoint: str, status: int, seconds: float) -> None:
        self.latencies[endpoint].append(seconds)
        self.statuses[endpoint][status] += 1

    def transport(self, endpoint: str, exc: BaseException) -> None:
        self.transport_errors[endpoint] += 1
        if len(self.transport_samples) < 20:
            self.transport_samples.append(f"{endpoint}: {type(exc).__name__}: {exc}")

    def contract(self, message: str) -> None:
        if len(self.contract_errors) < 200:
            self.contract_errors.append(message)
        else:
            self.actions["contract_errors_not_listed"] += 1


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


def _check_run_json(run: Any, where: str) -> list[str]:
    """What a client is told must not contradict itself (DESIGN.md, Invariant 3)."""
    if not isinstance(run, dict) or not isinstance(run.get("id"), int):
        return [f"{where}: not a Run: {str(run)[:200]}"]
    found = []
    status, percent = run.get("status"), run.get("percent")
    current, total = run.get("progress_current"), run.get("progress_total")
    if not isinstance(percent, int | float) or not 0 <= percent <= 100:
        found.append(f"percent {percent!r}")
    elif (percent == 100) != (status == "completed"):
        found.append(f"percent {percent} while {status}")
    if status == "completed" and (current != total or not run.get("completed_at")):
        found.append(
            f"completed with progress {current}/{total}, completed_at {run.get('completed_at')}"
        )
    if status == "failed" and not (run.get("error_message") and run.get("completed_at")):
        found.append("failed without error_message or completed_at")
    if status in TERMINAL and not run.get("completed_at"):
        found.append("ended without completed_at")
    if status in ("queued", "running") and run.get("completed_at"):
        found.append("completed_at set on a run that has not ended")
    if status == "running" and not run.get("started_at"):
        found.append("running without started_at")
    if isinstance(current, int) and isinstance(total, int) and current > total:
        found.append(f"progress {current}/{total}")
    return [f"{where}: run {run['id']} ({status}): {problem}" for problem in found]


# -- the clients ----------------------------------------------------------------------


class Load:
    """The asyncio clients; every loop stops by itself at the deadline or its count."""

    def __init__(self, client: httpx2.AsyncClient, options: Options) -> None:
        self.client = client
        self.options = options
        self.rng = random.Random(options.seed)
        self.stats = Stats()
        self.deadline = time.monotonic() + options.seconds
        self.known: list[int] = []  # every run id created
        self.watching: Counter[int] = Counter()  # runs with an open event stream
        self.resumable: list[int] = []  # runs whose stream ended failed or cancelled
        self.watchers: set[asyncio.Task[None]] = set()
        self.changed = asyncio.Event()

    def running_out(self) -> bool:
        return time.monotonic() >= self.deadline

    async def call(
        self, method: str, route: str, path: str, **kwargs: Any
    ) -> httpx2.Response | None:
        endpoint = f"{method} {route}"
        started = time.perf_counter()
        try:
            response = await self.client.request(method, path, **kwargs)
        except httpx2.HTTPError as exc:
            self.stats.transport(endpoint, exc)
            return None
        self.stats.record(endpoint, response.status_code, time.perf_counter() - started)
        return response

    def _json(self, response: httpx2.Response, where: str) -> Any:
        try:
            return response.json()
        except ValueError:
            self.stats.contract(f"{where}: the body is not JSON: {response.text[:200]}")
            return None

    def _params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"pause": round(self.rng.uniform(0.05, 0.2), 3)}
        if self.rng.random() < self.options.fail_rate:
            params["fail_phase"] = self.rng.randint(1, len(PHASES))
        if self.rng.random() < 0.2:
            params["warn_phase"] = self.rng.randint(1, len(PHASES))
        return params

    # -- runs and their event streams --

    def watch(self, run_id: int) -> None:
        self.watching[run_id] += 1
        task = asyncio.create_task(self._watch(run_id), name=f"watch-{run_id}")
        self.watchers.add(task)
        task.add_done_callback(self.watchers.discard)

    async def _watch(self, run_id: int) -> None:
        """One event stream, read to its end; each event checked, percent never backwards."""
        endpoint = "GET /runs/{id}/events"
        last_status: str | None = None
        percent = -1.0
        attempts = 0
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.options.seconds + self.options.drain_seconds):
                async with self.client.sse(f"/runs/{run_id}/events") as source:
                    response = source.response
                    self.stats.record(endpoint, response.status_code, time.perf_counter() - started)
                    if response.status_code != 200:
                        body = (await response.aread()).decode(errors="replace")
                        self.stats.contract(
                            f"events of run {run_id}: {response.status_code} {body[:200]}"
                        )
                        return
                    self.stats.sse_opened += 1
                    async for event in source:
                        if event.event != "run":
                            continue
                        self.stats.sse_events += 1
                        run = self._event_json(event.data, run_id)
                        if run is None:
                            continue
                        if last_status in TERMINAL:
                            self.stats.contract(
                                f"events of run {run_id}: an event after {last_status}"
                            )
                        previous_status, last_status = last_status, run.get("status")
                        value = run.get("percent")
                        tries = _attempts(run)
                        if (last_status == "queued" and previous_status == "running") or (
                            tries > attempts
                        ):
                            # It ended and was resumed between two reads of the
                            # stream (0.5 s apart), queued or already running
                            # again (a phase has one more attempt): a new
                            # execution, a new baseline.
                            percent = 0.0
                        attempts = max(attempts, tries)
                        if last_status not in TERMINAL and isinstance(value, int | float):
                            if value < percent:
                                self.stats.contract(
                                    f"events of run {run_id}: percent went back from {percent} "
                                    f"to {value} ({last_status})"
                                )
                            percent = value
            if last_status in TERMINAL:
                self.stats.sse_completed += 1
            else:
                self.stats.contract(f"events of run {run_id}: ended while {last_status}")
        except TimeoutError:
            self.stats.sse_unfinished += 1
        except httpx2.HTTPError as exc:
            self.stats.transport(endpoint, exc)
        finally:
            self.watching[run_id] -= 1
            if self.watching[run_id] <= 0:
                del self.watching[run_id]
            if last_status in ("failed", "cancelled"):
                self.resumable.append(run_id)
            self.changed.set()

    def _event_json(self, data: str, run_id: int) -> dict[str, Any] | None:
        try:
            run = json.loads(data)
        except ValueError:
            self.stats.contract(f"events of run {run_id}: data is not JSON: {data[:200]}")
            return None
        for problem in _check_run_json(run, "events"):
            self.stats.contract(problem)
        return run if isinstance(run, dict) else None

    async def starter(self) -> None:
        """Keep ``runs`` runs active: start one as soon as one ends."""
        for _ in range(self.options.max_requests_per_client):
            if self.running_out():
                return
            if len(self.watching) >= self.options.runs:
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.05)
                continue
            if self.rng.random() < 0.01:  # an invalid body: a 422, and nothing created
                await self.call("POST", "/runs", "/runs", json={"params": [1, 2]})
                continue
            response = await self.call("POST", "/runs", "/runs", json={"params": self._params()})
            if response is None or response.status_code != 201:
                await asyncio.sleep(0.2)
                continue
            run = self._json(response, "POST /runs")
            for problem in _check_run_json(run, "POST /runs"):
                self.stats.contract(problem)
            if isinstance(run, dict) and isinstance(run.get("id"), int):
                self.stats.actions["runs_created"] += 1
                self.known.append(run["id"])
                self.watch(run["id"])

    async def poller(self, index: int) -> None:
        rng = random.Random(self.options.seed * 1000 + index)
        for _ in range(self.options.max_requests_per_client):
            if self.running_out():
                return
            await asyncio.sleep(rng.uniform(0.01, 0.05))
            roll = rng.random()
            if not self.known or roll < 0.02:
                await self._expect("GET", "/runs/{id}", f"/runs/{2**40 + rng.randint(0, 99)}", 404)
            elif roll < 0.03:
                await self._expect("GET", "/runs", "/runs?status=paused", 422)
            elif roll < 0.6:
                run_id = rng.choice(self.known[-200:] if rng.random() < 0.8 else self.known)
                response = await self.call("GET", "/runs/{id}", f"/runs/{run_id}")
                if response is not None and response.status_code == 200:
                    for problem in _check_run_json(self._json(response, "GET"), "GET /runs/{id}"):
                        self.stats.contract(problem)
            else:
                await self._list(rng)

    async def _list(self, rng: random.Random) -> None:
        query: dict[str, Any] = {"limit": rng.choice([5, 20, 50])}
        if rng.random() < 0.4:
            query["status"] = rng.choice(["queued", "running", "completed", "failed", "cancelled"])
        if self.known and rng.random() < 0.3:
            query["before"] = rng.choice(self.known)
        response = await self.call("GET", "/runs", "/runs", params=query)
        if response is None or response.status_code != 200:
            return
        page = self._json(response, "GET /runs")
        if not isinstance(page, dict) or not isinstance(page.get("items"), list):
            self.stats.contract(f"GET /runs: not a page: {str(page)[:200]}")
            return
        ids: list[int] = [
            item["id"]
            for item in page["items"]
            if isinstance(item, dict) and isinstance(item.get("id"), int)
        ]
        if ids != sorted(ids, reverse=True) or len(ids) > query["limit"]:
            self.stats.contract(f"GET /runs {query}: ids {ids} not newest first within the limit")
        if "before" in query and any(i >= query["before"] for i in ids):
            self.stats.contract(f"GET /runs {query}: ids {ids} not all before {query['before']}")
        for item in page["items"]:
            for problem in _check_run_json(item, "GET /runs"):
                self.stats.contract(problem)
            if "status" in query and item.get("status") != query["status"]:
                self.stats.contract(f"GET /runs {query}: a {item.get('status')} run listed")

    async def _expect(self, method: str, route: str, path: str, status: int) -> None:
        response = await self.call(method, route, path)
        if response is not None and response.status_code != status:
            self.stats.contract(f"{method} {path}: {response.status_code}, expected {status}")

    async def canceller(self, index: int) -> None:
        rng = random.Random(self.options.seed * 2000 + index)
        for _ in range(self.options.max_requests_per_client):
            if self.running_out():
                return
            await asyncio.sleep(rng.uniform(0.05, 0.25))
            if self.watching and rng.random() < 0.85:
                run_id = rng.choice(list(self.watching))
            elif self.known:
                run_id = rng.choice(self.known)
            else:
                continue
            response = await self.call("POST", "/runs/{id}/cancel", f"/runs/{run_id}/cancel")
            if response is None:
                continue
            if response.status_code == 202:
                self.stats.actions["cancels_accepted"] += 1
            elif response.status_code == 409:
                self.stats.actions["cancel_conflicts"] += 1
            else:
                self.stats.contract(f"cancel of run {run_id}: {response.status_code}")

    async def resumer(self, index: int) -> None:
        rng = random.Random(self.options.seed * 3000 + index)
        for _ in range(self.options.max_requests_per_client):
            if self.running_out():
                return
            await asyncio.sleep(rng.uniform(0.05, 0.25))
            if self.resumable and rng.random() < 0.85:
                run_id = self.resumable.pop(rng.randrange(len(self.resumable)))
            elif self.known:
                run_id = rng.choice(self.known)
            else:
                continue
            response = await self.call("POST", "/runs/{id}/resume", f"/runs/{run_id}/resume")
            if response is None:
                continue
            if response.status_code == 202:
                self.stats.actions["resumes_accepted"] += 1
                self.watch(run_id)
            elif response.status_code == 409:
                self.stats.actions["resume_conflicts"] += 1
            else:
                self.stats.contract(f"resume of run {run_id}: {response.status_code}")

    async def drain(self) -> bool:
        """After the deadline: wait (bounded) until no run is queued or running."""
        deadline = time.monotonic() + self.options.drain_seconds
        idle = False
        while time.monotonic() < deadline:
            busy = 0
            for status in ("queued", "running"):
                response = await self.call(
                    "GET", "/runs", "/runs", params={"status": status, "limit": 1}
                )
                page = None if response is None else self._json(response, "GET /runs")
                if not isinstance(page, dict) or page.get("items"):
                    busy += 1
            if not busy:
                idle = True
                break
            await asyncio.sleep(0.2)
        if self.watchers:
            remaining = max(deadline - time.monotonic(), 5.0)
            _, pending = await asyncio.wait(set(self.watchers), timeout=remaining)
            for task in pending:
                task.cancel()
            self.stats.sse_unfinished += len(pending)
            await asyncio.gather(*pending, return_exceptions=True)
        return idle

    async def run(self) -> bool:
        clients = [self.starter()]
        clients += [self.poller(i) for i in range(self.options.pollers)]
        clients += [self.canceller(i) for i in range(self.options.cancellers)]
        clients += [self.resumer(i) for i in range(self.options.resumers)]
        await asyncio.gather(*clients)
        return await self.drain()


async def _drive(base_url: str, options: Options) -> tuple[Stats, bool]:
    limits = httpx2.Limits(max_connections=options.runs * 3 + 50, max_keepalive_connections=50)
    async with httpx2.AsyncClient(
        base_url=base_url, timeout=options.request_timeout, limits=limits
    ) as client:
        load = Load(client, options)
        idle = await load.run()
    return load.stats, idle


# -- putting it together ----------------------------------------------------------------


def run_load(options: Options, workdir: Path | None = None) -> dict[str, Any]:
    """Run the whole soak and return its figures (``ok`` says whether it passed)."""
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as scratch:
        directory = Path(workdir or scratch)
        path = directory / "bench.db"
        url = f"sqlite:///{path}"
        db.migrate(url)
        engine = db.create_engine(url)
        try:
            with db.write(engine) as conn:
                conn.exec_driver_sql(BENCH_DDL)
            server = Server(url, directory / "server.log", max_concurrent=options.runs)
            started = time.monotonic()
            cpu_before = _cpu_seconds()
            try:
                server.start()
                stats, idle = asyncio.run(_drive(server.url, options))
                exit_code = server.stop(options.stop_seconds)
            finally:
                server.kill()
            elapsed = time.monotonic() - started
            cpu = [after - before for before, after in zip(cpu_before, _cpu_seconds(), strict=True)]
            violations = check_database(engine, expect_idle=True) + check_bench_rows(engine)
            with db.read(engine) as conn:
                by_state: dict[str, int] = {
                    status: count
                    for status, count in conn.execute(
                        sa.text("SELECT status, count(*) FROM analysis_runs GROUP BY status")
                    )
                }
                warnings = conn.execute(sa.text("SELECT count(*) FROM run_warnings")).scalar_one()
        finally:
            engine.dispose()
        log_tail = server.logtail_of_log(60)
        log_text = server.log_path.read_text(errors="replace")
    report = _report(options, stats, idle, exit_code, elapsed, violations, by_state)
    report["warnings_recorded"] = warnings
    report["cpu_seconds"] = {"clients": round(cpu[0], 1), "server": round(cpu[1], 1)}
    report["cpus"] = os.cpu_count()
    report["server_log_busy_lines"] = sum(
        1 for line in log_text.splitlines() if "busy" in line or "locked" in line
    )
    if not report["ok"]:
        report["server_log_tail"] = log_tail
    return report


def _cpu_seconds() -> tuple[float, float]:
    """CPU time (user + system) of this process and of its waited-for children (the server)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def _report(
    options: Options,
    stats: Stats,
    idle: bool,
    exit_code: int,
    elapsed: float,
    violations: list[str],
    by_state: dict[str, int],
) -> dict[str, Any]:
    by_status: Counter[int] = Counter()
    endpoints = {}
    for endpoint in sorted(stats.latencies):
        latencies = stats.latencies[endpoint]
        by_status.update(stats.statuses[endpoint])
        endpoints[endpoint] = {
            "count": len(latencies),
            "p50_ms": round(_percentile(latencies, 50) * 1000, 1),
            "p99_ms": round(_percentile(latencies, 99) * 1000, 1),
            "max_ms": round(max(latencies) * 1000, 1),
            "statuses": {str(k): v for k, v in sorted(stats.statuses[endpoint].items())},
        }
    classes = Counter(f"{code // 100}xx" for code in by_status.elements())
    transport = sum(stats.transport_errors.values())
    requests = sum(by_status.values()) + transport
    failures = []
    if classes["5xx"]:
        failures.append(f"{classes['5xx']} responses were 5xx")
    if transport:
        failures.append(f"{transport} transport errors")
    if violations:
        failures.append(f"{len(violations)} invariant violations")
    if stats.contract_errors:
        failures.append(f"{len(stats.contract_errors)} contract errors")
    if stats.sse_unfinished:
        failures.append(f"{stats.sse_unfinished} event streams did not finish")
    if not idle:
        failures.append("runs were still queued or running after the drain")
    if exit_code != 0:
        failures.append(f"the server exited with {exit_code}")
    return {
        "ok": not failures,
        "failures": failures,
        "options": {
            "seconds": options.seconds,
            "runs": options.runs,
            "pollers": options.pollers,
            "cancellers": options.cancellers,
            "resumers": options.resumers,
            "seed": options.seed,
        },
        "elapsed_seconds": round(elapsed, 1),
        "requests": requests,
        "requests_per_second": round(requests / max(options.seconds, 0.001), 1),
        "by_class": {k: classes[k] for k in ("2xx", "4xx", "5xx")},
        "by_status": {str(k): v for k, v in sorted(by_status.items())},
        "endpoints": endpoints,
        "transport_errors": transport,
        "transport_error_samples": stats.transport_samples,
        "sse": {
            "opened": stats.sse_opened,
            "completed": stats.sse_completed,
            "events": stats.sse_events,
            "unfinished": stats.sse_unfinished,
        },
        "actions": dict(sorted(stats.actions.items())),
        "runs_by_state": dict(sorted(by_state.items())),
        "idle_before_stop": idle,
        "server_exit_code": exit_code,
        "contract_errors": stats.contract_errors,
        "violations": violations[:200],
        "violation_count": len(violations),
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"load: {report['options']} for {report['elapsed_seconds']} s in all",
        f"requests: {report['requests']} ({report['requests_per_second']}/s during the load); "
        + ", ".join(f"{k} {v}" for k, v in report["by_class"].items())
        + "; by status: "
        + ", ".join(f"{k} {v}" for k, v in report["by_status"].items()),
        f"transport errors: {report['transport_errors']}",
    ]
    lines += [f"  {sample}" for sample in report["transport_error_samples"]]
    lines.append(
        f"{'endpoint':<26} {'count':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  statuses"
    )
    for endpoint, e in report["endpoints"].items():
        statuses = " ".join(f"{k}:{v}" for k, v in e["statuses"].items())
        lines.append(
            f"{endpoint:<26} {e['count']:>7} {e['p50_ms']:>8} {e['p99_ms']:>8} "
            f"{e['max_ms']:>8}  {statuses}"
        )
    sse = report["sse"]
    lines += [
        f"SSE streams: {sse['opened']} opened, {sse['completed']} completed, "
        f"{sse['events']} events, {sse['unfinished']} unfinished",
        "actions: " + ", ".join(f"{k} {v}" for k, v in report["actions"].items()),
        "runs by final state: "
        + ", ".join(f"{k} {v}" for k, v in report["runs_by_state"].items())
        + f"; warnings recorded {report['warnings_recorded']}",
        f"CPU seconds: clients {report['cpu_seconds']['clients']}, "
        f"server {report['cpu_seconds']['server']} (on {report['cpus']} CPUs)",
        f"idle before stop: {report['idle_before_stop']}; "
        f"server exit code: {report['server_exit_code']}; "
        f"server log lines about a busy database: {report['server_log_busy_lines']}",
        f"contract errors: {len(report['contract_errors'])}",
    ]
    lines += [f"  {error}" for error in report["contract_errors"][:20]]
    lines.append(f"invariant checker (expect_idle=True): {report['violation_count']} violation(s)")
    lines += [f"  {violation}" for violation in report["violations"][:20]]
    lines.append("OK" if report["ok"] else "FAILED: " + "; ".join(report["failures"]))
    if not report["ok"] and report.get("server_log_tail"):
        lines += ["server log (tail):", report["server_log_tail"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="about 12 s with 16 runs at once")
    parser.add_argument("--seconds", type=float, help="how long to keep the load on (default 60)")
    parser.add_argument("--runs", type=int, help="runs kept going at once (default 50)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the clients' choices")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.seconds is not None and not 0 < args.seconds <= 3600:
        parser.error("--seconds must be more than 0 and at most 3600")
    if args.runs is not None and not 1 <= args.runs <= 256:
        parser.error("--runs must be between 1 and 256 (PIPELINE_MAX_CONCURRENT_RUNS' range)")
    changes: dict[str, Any] = {"seed": args.seed}
    if args.seconds is not None:
        changes["seconds"] = args.seconds
    if args.runs is not None:
        changes["runs"] = args.runs
    options = Options.quick(**changes) if args.quick else Options(**changes)
    report = run_load(options)
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
