"""What every benchmark shares: databases, timing, the rows of the table, servers.

Each benchmark returns :class:`Row` objects. A row holds the samples of one
figure for the pipeline and for its reference, one sample per repetition,
measured interleaved (pipeline, reference, reference, pipeline, ...), and the
ratio of each pair. Targets are judged on the median ratio.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import db

ROOT = Path(__file__).resolve().parents[1]

# The table the bench pipelines write into (created after migrating, like any
# application table of one's own).
BENCH_DDL = (
    "CREATE TABLE IF NOT EXISTS bench_rows ("
    " run_id INTEGER NOT NULL REFERENCES analysis_runs (id) ON DELETE CASCADE,"
    " phase INTEGER NOT NULL, n INTEGER NOT NULL, value FLOAT NOT NULL,"
    " PRIMARY KEY (run_id, phase, n))"
)


# -- targets and rows ------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """``op`` is "<=" or ">="; ``on`` is "ratio" (pipeline/reference) or "value"."""

    op: str
    value: float
    on: str = "ratio"

    def met(self, figure: float) -> bool:
        return figure <= self.value if self.op == "<=" else figure >= self.value

    def __str__(self) -> str:
        suffix = "x" if self.on == "ratio" else ""
        return f"{self.op} {self.value:g}{suffix}"


@dataclass
class Row:
    bench: str
    measure: str
    unit: str
    pipeline: list[float]
    reference: list[float] = field(default_factory=list)
    ref_name: str = ""
    target: Target | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratios(self) -> list[float]:
        return [p / r for p, r in zip(self.pipeline, self.reference, strict=False) if r]

    def judged(self) -> float | None:
        """The figure the target is judged on: the median ratio, or the median value."""
        if self.target is None:
            return None
        values = self.ratios if self.target.on == "ratio" else self.pipeline
        return statistics.median(values) if values else None

    def verdict(self) -> str:
        figure = self.judged()
        if self.target is None or figure is None:
            return ""
        return "met" if self.target.met(figure) else "MISSED"

    def to_json(self) -> dict[str, Any]:
        ratios = self.ratios
        return {
            "bench": self.bench,
            "measure": self.measure,
            "unit": self.unit,
            "pipeline": summary(self.pipeline),
            "reference": summary(self.reference) if self.reference else None,
            "reference_name": self.ref_name or None,
            "ratio": summary(ratios) if ratios else None,
            "target": None
            if self.target is None
            else {"op": self.target.op, "value": self.target.value, "on": self.target.on},
            "verdict": self.verdict() or None,
            "note": self.note or None,
            "extra": self.extra,
        }


def summary(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"median": None, "min": None, "max": None, "samples": []}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "samples": list(values),
    }


def fmt(value: float | None) -> str:
    """Three significant figures, no exponent for the sizes we meet."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def format_table(rows: Sequence[Row]) -> str:
    """A Markdown table that also reads well in a terminal."""
    header = [
        "benchmark",
        "measure",
        "unit",
        "pipeline",
        "reference",
        "ratio (median)",
        "ratio (min)",
        "target",
        "verdict",
    ]
    lines = [header]
    for row in rows:
        ratios = row.ratios
        ref = f"{fmt(statistics.median(row.reference))} ({row.ref_name})" if row.reference else "-"
        lines.append(
            [
                row.bench,
                row.measure,
                row.unit,
                fmt(statistics.median(row.pipeline)) if row.pipeline else "-",
                ref,
                fmt(statistics.median(ratios)) if ratios else "-",
                fmt(min(ratios)) if ratios else "-",
                str(row.target) if row.target else "-",
                row.verdict() or "-",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [render(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [render(line) for line in lines[1:]]
    return "\n".join(out)


# -- repetitions -----------------------------------------------------------------------


def interleaved(reps: int, *runners: Callable[[], float]) -> list[list[float]]:
    """Run each runner once per repetition, rotating the order; samples per runner."""
    samples: list[list[float]] = [[] for _ in runners]
    for rep in range(reps):
        order = list(range(len(runners)))
        shift = rep % len(runners)
        order = order[shift:] + order[:shift]
        if rep % 2:
            order.reverse()
        for index in order:
            samples[index].append(runners[index]())
    return samples


# -- databases -------------------------------------------------------------------------


class Workdir:
    """A temporary directory on the real disk (fsync must cost what it costs).

    Holds one migrated template database; :meth:`fresh_db` copies it, which
    is much faster than migrating each time.
    """

    def __init__(self) -> None:
        base = os.environ.get("BENCH_TMPDIR") or None
        self.path = Path(tempfile.mkdtemp(prefix="pipeline-bench-", dir=base))
        self._template: Path | None = None
        self._serial = 0

    def template(self) -> Path:
        if self._template is None:
            path = self.path / "template.db"
            db.migrate(f"sqlite:///{path}")
            with contextlib.closing(sqlite3.connect(path)) as conn:
                conn.execute(BENCH_DDL)
                conn.commit()
                # Leave no -wal file behind: the copies start from one file.
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._template = path
        return self._template

    def fresh_db(self, name: str) -> Path:
        self._serial += 1
        path = self.path / f"{name}-{self._serial}.db"
        shutil.copyfile(self.template(), path)
        return path

    def file(self, name: str) -> Path:
        self._serial += 1
        return self.path / f"{name}-{self._serial}"

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"


def sqlite_connect(path: Path, synchronous: str = "NORMAL") -> sqlite3.Connection:
    """A plain sqlite3 connection with the pipeline's pragmas (db.create_engine's)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    return conn


def count_status(path: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return dict(conn.execute("SELECT status, count(*) FROM analysis_runs GROUP BY status"))


# -- processes -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def spawn_until_healthy(
    argv: Sequence[str], *, env: dict[str, str], log_path: Path, url: str, timeout: float
) -> subprocess.Popen[bytes]:
    """Start a server process logging to ``log_path``; return once ``url/healthz`` says 200.

    One launcher for the benchmarks, the soak and the tests' real servers. A
    process that exits early or never becomes healthy is killed and reported
    with the end of its log.
    """
    import httpx2

    with log_path.open("ab") as log:
        process = subprocess.Popen(
            list(argv), env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited early:\n{tail_of_log(log_path)}")
        with contextlib.suppress(httpx2.TransportError):
            if httpx2.get(f"{url}/healthz", timeout=1).status_code == 200:
                return process
        time.sleep(0.05)
    process.kill()
    process.wait(30)
    raise RuntimeError(f"the server did not become healthy:\n{tail_of_log(log_path)}")


def tail_of_log(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a whole process (all threads), from /proc (10 ms ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
    return found


class BenchServer:
    """``python -m bench.server`` (a real uvicorn on 127.0.0.1) in a subprocess."""

    def __init__(
        self,
        db_path: Path,
        log_path: Path,
        *,
        phases: str = "bench.phases:NOOP5",
        concurrency: int = 4,
        executor: str = "thread",
    ) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.update(
            PIPELINE_DATABASE_URL=url_of(db_path),
            PIPELINE_PHASES=phases,
            PIPELINE_MAX_CONCURRENT_RUNS=str(concurrency),
            PIPELINE_EXECUTOR=executor,
        )
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 30.0) -> None:
        self.process = spawn_until_healthy(
            [sys.executable, "-m", "bench.server", "--port", str(self.port)],
            env=self.env,
            log_path=self.log_path,
            url=self.base,
            timeout=timeout,
        )

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (runs finish), then SIGKILL if it is not gone in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def logtail_of_log(self, lines: int = 30) -> str:
        return tail_of_log(self.log_path, lines)


@contextlib.contextmanager
def running(server: BenchServer) -> Iterator[BenchServer]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]
