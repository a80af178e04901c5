"""Prometheus metrics, through the official client library.

Each service has its own registry (several may live in one process, as in the
tests). Counters and histograms are of this process, as Prometheus expects;
the queued and running gauges are read from the database at scrape time, so
they are the same whichever process is scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Runs last seconds to hours; phases milliseconds to minutes.
RUN_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
PHASE_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _RunsNow(Collector):
    """``pipeline_runs{status=...}``: how many runs are in each state, from the database."""

    def __init__(self, count: Callable[[], Mapping[str, int]]) -> None:
        self._count = count

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("pipeline_runs", "Runs by status, now.", labels=["status"])
        for status, value in self._count().items():
            family.add_metric([status], value)
        yield family


class Metrics:
    """What a server or worker counts about runs, phases and requests."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._phase_timers: dict[str, Histogram] = {}
        self._run_ends: dict[str, tuple[Counter, Histogram]] = {}
        self.runs_created = Counter("pipeline_runs_created", "Runs created.", registry=r)
        self.runs_finished = Counter(
            "pipeline_runs_finished", "Runs finished, by final status.", ["status"], registry=r
        )
        self.run_duration = Histogram(
            "pipeline_run_duration_seconds",
            "Time a run executed in this process, by final status.",
            ["status"],
            buckets=RUN_BUCKETS,
            registry=r,
        )
        self.phase_duration = Histogram(
            "pipeline_phase_duration_seconds",
            "Time of a phase's successful attempt, by phase label.",
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.phase_retries = Counter(
            "pipeline_phase_retries",
            "Phase attempts run again, by phase label.",
            ["phase"],
            registry=r,
        )
        self.http_duration = Histogram(
            "pipeline_http_request_duration_seconds",
            "HTTP request latency, by method, route template and status code.",
            ["method", "route", "status"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )

        self.schedule_ticks_fired = Counter(
            "pipeline_schedule_ticks_fired",
            "Schedule ticks that started a run (in this process).",
            registry=r,
        )
        self.schedule_ticks_skipped = Counter(
            "pipeline_schedule_ticks_skipped",
            "Schedule ticks that started no run because of the overlap rule.",
            registry=r,
        )
        self.schedule_ticks_missed = Counter(
            "pipeline_schedule_ticks_missed",
            "Schedule ticks that passed while no firer was up (catch_up fires the latest).",
            registry=r,
        )

    def phase_timer(self, label: str) -> Histogram:
        """The phase duration series of ``label``, found once: a boundary observes it.

        ``labels()`` builds a key and takes a lock at each call, about a
        twentieth of a no-op phase boundary; the series never changes.
        """
        timer = self._phase_timers.get(label)
        if timer is None:
            timer = self._phase_timers[label] = self.phase_duration.labels(label)
        return timer

    def run_finished(self, status: str, seconds: float) -> None:
        """Count a run that ended with ``status`` after ``seconds``; its series found once."""
        series = self._run_ends.get(status)
        if series is None:
            series = self._run_ends[status] = (
                self.runs_finished.labels(status),
                self.run_duration.labels(status),
            )
        series[0].inc()
        series[1].observe(seconds)

    def watch_database(self, count: Callable[[], Mapping[str, int]]) -> None:
        """Report the runs by status at every scrape, with ``count``."""
        self.registry.register(_RunsNow(count))
