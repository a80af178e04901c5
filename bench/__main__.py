"""The benchmark suite: ``python -m bench [--quick] [--json PATH] [--only NAME ...]``.

Prints one table (Markdown, readable in a terminal) and writes the same
figures, with every sample, to JSON (``bench/results.json`` by default).
It never fails on a figure: the exit code is 0 unless a benchmark crashed.
See bench/README.md for what each row measures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy

from bench import fanout, orchestration, pg_scale, postgres, service_load, watching
from bench.common import ROOT, Row, Workdir, format_table

DEFAULT_JSON = Path(__file__).resolve().parent / "results.json"

BENCHMARKS: dict[str, Callable[[Workdir, bool], list[Row]]] = {
    **orchestration.BENCHMARKS,
    **service_load.BENCHMARKS,
    **fanout.BENCHMARKS,
    **watching.BENCHMARKS,
    **postgres.BENCHMARKS,
    **pg_scale.BENCHMARKS,
}


def source_version() -> str:
    """The commit measured, and whether src/ had uncommitted changes."""
    git = shutil.which("git")
    if git is None:
        return "unknown"
    try:
        head = subprocess.run(
            [git, "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            [git, "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted src changes' if dirty else ''}"


def environment(quick: bool) -> dict[str, Any]:
    return {
        "source": source_version(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "mode": "quick" if quick else "full",
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": sqlalchemy.__version__,
        "huey": orchestration._huey_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for CI (~1 min)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write figures")
    parser.add_argument(
        "--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME", help="run only these"
    )
    args = parser.parse_args(argv)
    # The figures must not depend on the caller's PIPELINE_* settings.
    for key in [k for k in os.environ if k.startswith("PIPELINE_")]:
        del os.environ[key]
    logging.getLogger("alembic").setLevel(logging.WARNING)

    env = environment(args.quick)
    print(
        f"pipeline benchmarks ({env['mode']}): Python {env['python']}, SQLite {env['sqlite']}, "
        f"SQLAlchemy {env['sqlalchemy']}, Huey {env['huey']}, {env['machine']}; "
        f"source {env['source']}",
        flush=True,
    )
    rows: list[Row] = []
    failures: dict[str, str] = {}
    timings: dict[str, float] = {}
    workdir = Workdir()
    started = time.monotonic()
    try:
        for name in args.only or list(BENCHMARKS):
            print(f"  {name} ...", end=" ", flush=True)
            began = time.monotonic()
            try:
                rows += BENCHMARKS[name](workdir, args.quick)
            except Exception:
                failures[name] = traceback.format_exc()
                print("FAILED", flush=True)
                print(failures[name], file=sys.stderr)
                continue
            timings[name] = time.monotonic() - began
            print(f"{timings[name]:.1f} s", flush=True)
    finally:
        workdir.cleanup()
    total = time.monotonic() - started

    print()
    print(format_table(rows))
    plans = [row.extra["plans"] for row in rows if "plans" in row.extra]
    if plans:
        print("\nQuery plans (SQLite: EXPLAIN QUERY PLAN; PostgreSQL: EXPLAIN), largest database:")
        for found in plans:
            for query, lines in found.items():
                print(f"  {query}:")
                for line in lines:
                    print(f"    {line}")
    print(f"\n{len(rows)} figures in {total:.0f} s; medians of the repetitions; JSON: {args.json}")
    report = {
        "environment": env,
        "seconds": {"total": total, **timings},
        "rows": [row.to_json() for row in rows],
        "failures": failures,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
