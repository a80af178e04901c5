"""Fan-out: 1, 100 and 1,000 ``GET /events`` subscribers on one server while runs execute.

One bench server (``bench.server``: ``pipeline serve``'s app) per size. The
subscribers are asyncio connections of this process (plain HTTP/1.1 over a
socket each, reading the stream as a browser would); while they listen, a
run is created every 0.2 s and executes (three phases with sub-progress). Per
size:

* **statements/s**: what the API's engine sent the database during the
  window (the server counts them, ``/bench/statements``): one watcher per
  process, so 1,000 subscribers should cost what 1 does;
* **delivery delay**: from a run's ``POST /runs`` answer to its first event at
  each subscriber, p99 over every subscriber and run;
* **RSS per subscriber**: the server's VmRSS with the subscribers connected,
  minus before, divided by their number;
* **errors**: streams refused or ended early, events missing.
"""

from __future__ import annotations

import asyncio
import json
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx2

from bench.common import BenchServer, Row, Target, Workdir, memory_kib, percentile, running

WINDOW_SECONDS = 5.0
RUN_EVERY_SECONDS = 0.2


class Subscriber:
    """One ``GET /events`` connection; when it first heard of each run."""

    def __init__(self) -> None:
        self.first_seen: dict[int, float] = {}
        self.ok = False
        self.ended_early = False
        self._writer: asyncio.StreamWriter | None = None

    async def open(self, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self._writer = writer
        writer.write(
            b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
        )
        await writer.drain()
        status = await reader.readline()
        self.ok = b" 200 " in status
        self._reader = reader

    async def read(self) -> None:
        try:
            while line := await self._reader.readline():
                if line.startswith(b"data:"):
                    run_id = json.loads(line[5:])["id"]
                    self.first_seen.setdefault(run_id, time.time())
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        self.ended_early = True

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _measure(server: BenchServer, count: int) -> dict[str, Any]:
    client = httpx2.AsyncClient(base_url=server.base, timeout=30)
    before_kib = memory_kib(server.pid)["VmRSS"]
    subscribers = [Subscriber() for _ in range(count)]
    for start in range(0, count, 50):  # connect in batches, as viewers arrive
        await asyncio.gather(*(s.open(server.port) for s in subscribers[start : start + 50]))
    readers = [asyncio.create_task(s.read()) for s in subscribers]
    deadline = time.monotonic() + 30
    while (await client.get("/bench/statements")).json()["subscribers"] < count:
        if time.monotonic() > deadline:
            raise TimeoutError("the subscribers did not all connect")
        await asyncio.sleep(0.05)
    connected_kib = memory_kib(server.pid)["VmRSS"]
    first = (await client.get("/bench/statements")).json()["statements"]
    started = time.monotonic()
    created: dict[int, float] = {}
    while time.monotonic() - started < WINDOW_SECONDS:
        response = await client.post("/runs", json={})
        created[response.json()["id"]] = time.time()
        await asyncio.sleep(RUN_EVERY_SECONDS)
    await asyncio.sleep(1.5)  # the last run's events
    elapsed = time.monotonic() - started
    last = (await client.get("/bench/statements")).json()["statements"]
    delays = [
        s.first_seen[run_id] - at
        for s in subscribers
        for run_id, at in created.items()
        if run_id in s.first_seen
    ]
    missing = sum(run_id not in s.first_seen for s in subscribers for run_id in created)
    errors = sum(not s.ok or s.ended_early for s in subscribers) + missing
    for s in subscribers:
        s.close()
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    await client.aclose()
    return {
        "statements_per_s": (last - first) / elapsed,
        "p99_delay_s": percentile(delays, 99) if delays else float("nan"),
        "median_delay_s": statistics.median(delays) if delays else float("nan"),
        "rss_per_subscriber_kib": (connected_kib - before_kib) / count,
        "errors": errors,
        "runs": len(created),
    }


def fanout_once(workdir: Workdir, count: int) -> dict[str, Any]:
    server = BenchServer(
        workdir.fresh_db(f"fanout-{count}"),
        workdir.file(f"fanout-{count}.log"),
        phases="bench.phases:PROGRESS",
    )
    server.env.update(
        PIPELINE_MAX_EVENT_STREAMS=str(count + 10),
        PIPELINE_MAX_STREAMS_PER_CLIENT=str(count + 10),
        PIPELINE_HTTP_MAX_CONNECTIONS=str(count + 100),
    )
    with running(server):
        time.sleep(0.5)  # settle: the first requests import and allocate
        return asyncio.run(_measure(server, count))


def bench_fanout(workdir: Workdir, quick: bool) -> list[Row]:
    _raise_file_limit()
    sizes = (1, 100, 300) if quick else (1, 100, 1000)
    reps = 1 if quick else 3
    results: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
    for _ in range(reps):
        for n in sizes:
            results[n].append(fanout_once(workdir, n))

    def values(n: int, key: str) -> list[float]:
        return [float(r[key]) for r in results[n]]

    largest = sizes[-1]
    rows = [
        Row(
            bench="fanout",
            measure=f"database statements/s, {largest} vs 1 `GET /events` subscribers",
            unit="stmt/s",
            pipeline=values(largest, "statements_per_s"),
            reference=values(1, "statements_per_s"),
            ref_name="1 subscriber",
            target=Target("<=", 1.2),
            extra={"by_size": {str(n): results[n] for n in sizes}},
        )
    ]
    per: Callable[[int], str] = lambda n: f"{n} subscribers"  # noqa: E731
    for n in sizes:
        rows.append(
            Row(
                bench="fanout",
                measure=f"p99 delay from a new run to its event, {per(n)}",
                unit="s",
                pipeline=values(n, "p99_delay_s"),
                target=Target("<=", 1.0, on="value"),
            )
        )
    rows.append(
        Row(
            bench="fanout",
            measure=f"server RSS per subscriber ({largest} subscribers)",
            unit="KiB",
            pipeline=values(largest, "rss_per_subscriber_kib"),
            target=Target("<=", 64, on="value"),
        )
    )
    rows.append(
        Row(
            bench="fanout",
            measure="errors (streams refused or ended, events missing), all sizes",
            unit="count",
            pipeline=[sum(r["errors"] for n in sizes for r in results[n])],
            target=Target("<=", 0, on="value"),
        )
    )
    return rows


BENCHMARKS: dict[str, Callable[[Workdir, bool], list[Row]]] = {"fanout": bench_fanout}
