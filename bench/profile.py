"""Where the time goes: cProfile of the orchestrator's paths, in the main thread.

    python -m bench.profile boundary|throughput|get_run [--n N] [--top 15] [--sort cumulative]

The benchmarks run the runner in its own thread, where cProfile does not
look; here the same code runs in the main thread:

* ``boundary``: the runner body (``Executor._runner``) for one reserved run
  of N no-op phases;
* ``throughput``: N x ``Service.create_run`` (queue only), then the runner
  body draining the queue (5 no-op phases each);
* ``get_run``: N x what ``GET /runs/{id}`` does in the thread pool:
  ``Service.get_run``, ``Run.to_dict``, validation by the response model and
  JSON encoding.

cProfile's own overhead inflates Python-heavy paths; read the shares, not
the absolute times.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from collections.abc import Callable, Sequence

from bench.common import Workdir, url_of
from bench.orchestration import make_service
from bench.phases import NOOP5, noop_registry
from pipeline import db, runs
from pipeline.orchestrator import Executor


def _boundary(workdir: Workdir, n: int) -> Callable[[], None]:
    """The second run of the registry in this executor, as the benchmark measures it."""
    path = workdir.fresh_db("profile-boundary")
    executor = Executor(url_of(path), noop_registry(n), max_concurrent=1)
    owner = f"{executor.identity}:profile"
    engine = db.create_engine(url_of(path))
    with db.write(engine) as conn:
        warm_up = runs.create_run(conn, params={}, owner=owner).id
        run_id = runs.create_run(conn, params={}, owner=owner).id
    engine.dispose()
    executor._runner(reserved=(warm_up, owner))
    return lambda: executor._runner(reserved=(run_id, owner))


def _throughput(workdir: Workdir, n: int) -> Callable[[], None]:
    service = make_service(workdir.fresh_db("profile-throughput"), NOOP5, 1)
    service.execute = False  # queue only; the runner body below drains it

    def work() -> None:
        for _ in range(n):
            service.create_run({})
        service.executor._runner()
        service.stop()

    return work


def _get_run(workdir: Workdir, n: int) -> Callable[[], None]:
    from pipeline.api import RunOut

    service = make_service(workdir.fresh_db("profile-get"), NOOP5, 1)
    service.execute = False
    run_id = service.create_run({}).id
    service.executor._runner()

    def work() -> None:
        for _ in range(n):
            run = service.get_run(run_id)
            assert run is not None
            json.dumps(RunOut.model_validate(run.to_dict()).model_dump(mode="json"))
        service.stop()

    return work


TARGETS = {
    "boundary": (_boundary, 2000),
    "throughput": (_throughput, 1000),
    "get_run": (_get_run, 2000),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("target", choices=list(TARGETS))
    parser.add_argument("--n", type=int, help="phases, runs or requests (default per target)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--sort", default="cumulative", choices=["cumulative", "tottime"])
    args = parser.parse_args(argv)
    make, default_n = TARGETS[args.target]
    n = args.n or default_n
    workdir = Workdir()
    try:
        work = make(workdir, n)
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        work()
        profiler.disable()
        elapsed = time.perf_counter() - started
    finally:
        workdir.cleanup()
    print(f"{args.target}: n={n}, {elapsed:.2f} s under cProfile ({elapsed * 1e6 / n:.0f} µs each)")
    stats = pstats.Stats(profiler)
    stats.sort_stats(args.sort).print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
