"""What a server process runs besides HTTP: the executor and its housekeeping.

The API calls these methods (in FastAPI's thread pool); the benchmarks call
the same ones, so what they measure is what a request does.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline import artifacts, db, notify, retention, runs, schedules
from pipeline.config import Settings
from pipeline.metrics import Metrics
from pipeline.notify import Listener
from pipeline.orchestrator import Executor
from pipeline.params import validate_params
from pipeline.pipelines import Phase, Pipeline, Registry, load_pipelines
from pipeline.runs import Outcome, Run, RunStatus
from pipeline.schedules import Clock, Schedule
from pipeline.schema import analysis_runs

log = logging.getLogger("pipeline.service")


class NotFound(LookupError):
    """No such run, phase, result or artifact; the message says which."""


class QueueFull(Exception):
    """As many runs are queued as the service takes (``PIPELINE_MAX_QUEUED_RUNS``)."""


class Service:
    """One database, one registry, one executor, and the loops that keep them honest.

    With ``execute`` (an API process in thread mode, or a worker) it runs the
    queued runs itself; without (an API process in worker mode) it only
    queues them, and still sweeps runs whose runner was lost.
    """

    def __init__(
        self,
        settings: Settings,
        registry: Registry | Pipeline | Sequence[Pipeline] | None = None,
        *,
        execute: bool | None = None,
        concurrency: int | None = None,
        clock: Clock | None = None,
    ) -> None:
        """``clock`` is what schedules fire by (tests walk it); None: the database's."""
        self.settings = settings
        self.execute = settings.executor == "thread" if execute is None else execute
        source = load_pipelines(settings.phases) if registry is None else registry
        # Requests run in FastAPI's thread pool (40 threads): keep enough
        # connections open that a burst of them does not reconnect (and re-run
        # the pragmas), and more than the pool's threads can hold, so that a
        # read on the event loop (SQLite's GET /runs/{id}) never waits for one.
        # No request may wait on a phase's locks: on PostgreSQL a lock still
        # held after the busy timeout makes the request a 503, as on SQLite.
        self.engine: Engine = db.create_engine(
            settings.database_url,
            busy_timeout_ms=settings.busy_timeout_ms,
            lock_timeout_ms=settings.busy_timeout_ms,
            pool_size=10,
            max_overflow=40,
        )
        self.metrics = Metrics()
        self.metrics.watch_database(self._count_by_status)
        self.executor = Executor(
            settings.database_url,
            source,
            max_concurrent=concurrency or settings.max_concurrent_runs,
            heartbeat_seconds=settings.heartbeat_seconds,
            busy_timeout_ms=settings.busy_timeout_ms,
            metrics=self.metrics,
        )
        self.firer = schedules.Firer(
            self.engine, self.executor.pipelines, clock=clock, metrics=self.metrics
        )
        self._stop = threading.Event()
        self._housekeeper: threading.Thread | None = None
        # Runs resumed here since the shared watcher last looked: a resumed run
        # can end before the next look, and must still be seen (pipeline.watch).
        self._resumed: set[int] = set()
        # PostgreSQL tells this process of new runs and of changed ones at once
        # (pipeline.notify), on the channels it has a use for.
        self.listener: Listener | None = None
        self._notified: dict[str, Callable[[], None]] = {}
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        if self.execute:
            # One notification may stand for many runs (PostgreSQL folds those of
            # one transaction): count what is claimable, as a poll does.
            self._notified[notify.CHANNEL] = self._wake_for_queued

    def on_runs_changed(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from any thread) when runs changed.

        For ``GET /events``' shared watcher; set before :meth:`start`. What
        this process's requests change (a run created, cancelled, resumed)
        calls it at once, on both backends: a viewer sees a new run within the
        watcher's spacing, not its poll. On PostgreSQL, a NOTIFY also calls it
        for every other process's change; on SQLite, a runner's progress and
        another process's change wait for the poll.
        """
        self._notified[notify.CHANGED] = callback

    def on_stop(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Await ``callback`` when :meth:`lifespan` ends, before the engine closes.

        For what reads the database from the event loop's side (``GET
        /events``' watcher): it must give its connection back first.
        """
        self._on_stop.append(callback)

    def _changed(self) -> None:
        """Tell the watcher; the change is committed, so a failure here must not undo the answer."""
        callback = self._notified.get(notify.CHANGED)
        if callback is None:
            return
        try:
            callback()
        except Exception:
            log.exception("telling the watcher that runs changed failed; its poll will see it")

    # -- life cycle --

    def start(self) -> None:
        """Refuse an unmigrated database, sweep interrupted runs, start queued ones."""
        db.check_schema(self.engine)
        self.sweep()
        if self._notified and not db.is_sqlite(self.engine):
            self.listener = Listener(self.settings.database_url, self._notified)
            self.listener.start()
        if self.execute:
            self._wake_for_queued()
        self._housekeeper = threading.Thread(
            target=self._housekeeping, name="pipeline-housekeeper", daemon=True
        )
        self._housekeeper.start()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop_claiming(self) -> None:
        """The first step of a graceful stop: start nothing new from now on.

        Called from the signal handler, before the HTTP server drains its
        connections, so no queued run starts during the drain.
        """
        self._stop.set()
        self.executor.stop_claiming()

    def stop(self, *, wait: bool = True) -> None:
        """Claim nothing new; with ``wait``, let the running runs finish first."""
        self.stop_claiming()
        running = self.executor.active_runs()
        if wait and running:
            log.info("waiting for %d running run(s) to finish", len(running))
        self.executor.shutdown(wait=wait)
        if self.listener is not None:
            self.listener.stop()
        if self._housekeeper is not None:
            self._housekeeper.join(5)
        self.engine.dispose()

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """For a host application's own lifespan (see the README)."""
        self.start()
        try:
            yield
        finally:
            try:
                for callback in self._on_stop:
                    await callback()
            finally:
                await anyio.to_thread.run_sync(self.stop)

    def sweep(self) -> list[int]:
        swept = self.executor.sweep(
            self.engine,
            lease_seconds=self.settings.lease_seconds,
            requeue=self.settings.auto_resume,
        )
        if swept and self.settings.auto_resume and self.execute:
            self.executor.wake()
        return swept

    def _housekeeping(self) -> None:
        """Fire due schedules; sweep lost runs now and then; pick up runs queued elsewhere.

        Schedules and the queue check are a few indexed queries per
        ``poll_seconds``; runners that finish a run claim the next one
        themselves, so the queue check only matters for an idle process.
        """
        poll = self.settings.poll_seconds
        since_sweep = 0.0
        since_prune = self.settings.prune_seconds  # prune soon after start
        while not self._stop.wait(poll):
            since_sweep += poll
            since_prune += poll
            # Each step on its own: one that fails (a database outage) neither
            # skips the others nor hides them.
            self._step("firing schedules", self.fire_schedules)
            if since_sweep >= self.settings.sweep_seconds:
                since_sweep = 0.0
                self._step("the sweep", self.sweep)
                self._step("reporting schedules", self.firer.report_orphans)
            if since_prune >= self.settings.prune_seconds:
                since_prune = 0.0
                self._step("pruning ticks", self.firer.prune)
                if self.settings.retention:
                    self._step("retention", self._prune_runs)
            if self.execute:
                self._step("the queue check", self._wake_for_queued)

    def _step(self, what: str, step: Callable[[], object]) -> None:
        try:
            step()
        except db.DatabaseBusy as exc:  # busy or gone: one line, the next pass tries again
            log.warning("housekeeping: %s waits: %s", what, exc)
        except Exception:
            log.exception("housekeeping: %s failed; will try again", what)

    def _prune_runs(self) -> None:
        assert self.settings.retention is not None
        retention.prune(self.engine, older_than=retention.parse_duration(self.settings.retention))

    def _wake_for_queued(self) -> None:
        """A runner for each queued run this process could start now (start, poll, NOTIFY)."""
        waiting = self._queued_here()
        if waiting:
            self.executor.wake(waiting)

    def fire_schedules(self) -> list[schedules.Fired]:
        """Fire the due ticks; the runs they create start here when this process executes."""
        fired = self.firer.fire_due()
        if self.execute and any(f.run_id is not None for f in fired):
            self.executor.wake()
        return fired

    def _queued_here(self) -> int:
        """How many queued runs this process could start now (at most its concurrency).

        One indexed query: the claim order's index, read no further than needed.
        """
        first = (
            sa.select(analysis_runs.c.id)
            .where(
                analysis_runs.c.status == RunStatus.QUEUED.value,
                analysis_runs.c.owner.is_(None),
                analysis_runs.c.pipeline.in_(list(self.pipelines)),
            )
            .limit(self.executor.max_concurrent)
            .subquery()
        )
        with db.read(self.engine) as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(first)).scalar_one())

    # -- what requests do (each one short transaction) --

    @property
    def pipelines(self) -> Mapping[str, Pipeline]:
        return self.executor.pipelines

    @property
    def _labels_of(self) -> dict[str, list[tuple[int, str]]]:
        return {name: p.labels for name, p in self.pipelines.items()}

    @property
    def registry(self) -> list[Phase]:
        """The first pipeline's phases (what code written for one registry reads)."""
        return self.executor.registry

    def create_run(
        self,
        params: Mapping[str, Any],
        pipeline: str | None = None,
        idempotency: tuple[str, str] | None = None,
    ) -> Run:
        """Queue a run; :class:`QueueFull` beyond ``PIPELINE_MAX_QUEUED_RUNS``.

        Raises :class:`UnknownPipeline`, :class:`pipeline.params.InvalidParams`
        or the params model's :class:`pydantic.ValidationError`, nothing written.
        """
        return self.create_or_replay(params, pipeline, idempotency)[0]

    def create_or_replay(
        self,
        params: Mapping[str, Any],
        pipeline: str | None = None,
        idempotency: tuple[str, str] | None = None,
    ) -> tuple[Run, bool]:
        """The run and whether it is new; with ``(key, body_hash)`` a repeat returns the first.

        Raises :class:`runs.IdempotencyMismatch` for a key reused with another body.
        """
        chosen = self.executor.pipeline(pipeline)
        stored, _ = chosen.check_params(validate_params(params))
        try:
            run, created = self._create(stored, chosen.name, idempotency)
        except sa.exc.IntegrityError:
            if idempotency is None:
                raise
            # Another request with this key committed first: its run is the answer.
            with db.write(self.engine) as conn:
                found = runs.idempotent_run(conn, key=idempotency[0], body_hash=idempotency[1])
            if found is None:
                raise
            return found, False
        if created:
            self.metrics.runs_created.inc()
            if self.execute:
                self.executor.wake()
            self._changed()
        return run, created

    def _create(
        self, stored: Mapping[str, Any], name: str, idempotency: tuple[str, str] | None
    ) -> tuple[Run, bool]:
        cap = self.settings.max_queued_runs
        with db.write(self.engine) as conn:
            if idempotency is not None:
                earlier = runs.idempotent_run(conn, key=idempotency[0], body_hash=idempotency[1])
                if earlier is not None:
                    return earlier, False
            run = runs.create_run_below_cap(conn, cap=cap, params=stored, pipeline=name)
            if run is None:
                raise QueueFull(f"{cap} runs are already queued (PIPELINE_MAX_QUEUED_RUNS)")
            if idempotency is not None:
                runs.remember_key(conn, key=idempotency[0], body_hash=idempotency[1], run_id=run.id)
        return run, True

    def get_run(self, run_id: int) -> Run | None:
        # The live progress is read before the row: read after, it could
        # belong to the next phase already, and the percent would drop.
        live = self.executor.live_progress(run_id)
        with db.read(self.engine, one_statement=db.is_sqlite(self.engine)) as conn:
            run = runs.get_run(conn, run_id=run_id)
        if run is None:
            return None
        return run.with_live_progress(live)

    def list_runs(
        self,
        *,
        status: RunStatus | None,
        limit: int,
        before: int | None,
        pipeline: str | None = None,
    ) -> tuple[list[Run], int | None]:
        live = {
            run_id: self.executor.live_progress(run_id) for run_id in self.executor.active_runs()
        }
        with db.read(self.engine) as conn:
            page, cursor = runs.list_runs(
                conn, status=status, limit=limit, before=before, pipeline=pipeline
            )
        return [run.with_live_progress(live.get(run.id)) for run in page], cursor

    def watched_runs(self, after_id: int | None, was_live: Sequence[int]) -> tuple[list[Run], int]:
        """One look of the shared watcher (``pipeline.watch``): see :func:`runs.watched_runs`."""
        live = {
            run_id: self.executor.live_progress(run_id) for run_id in self.executor.active_runs()
        }
        resumed, self._resumed = self._resumed, set()
        try:
            with db.read(self.engine) as conn:
                found, newest = runs.watched_runs(
                    conn, after_id=after_id, was_live=[*was_live, *resumed]
                )
        except BaseException:
            self._resumed |= resumed  # looked at next time, then
            raise
        return [run.with_live_progress(live.get(run.id)) for run in found], newest

    def cancel(self, run_id: int) -> tuple[Outcome, Run | None]:
        # A phase running here learns of it before anything that could wait
        # (SQLite's write lock, which the phase itself may hold); a running
        # run's cancel is always accepted, so telling it first is right.
        self.executor.notify_cancel(run_id)
        with db.write(self.engine) as conn:
            outcome = runs.request_cancel(conn, run_id=run_id)
        if outcome is Outcome.DONE:
            self._changed()
        return outcome, self.get_run(run_id)

    def resume(self, run_id: int) -> tuple[Outcome, Run | None]:
        """Raises :class:`runs.PhasesChanged` when the pipeline's phases changed since."""
        with db.write(self.engine) as conn:
            outcome = runs.resume(conn, run_id=run_id, phases=self._labels_of)
        if outcome is Outcome.DONE:
            self._resumed.add(run_id)
            if self.execute:
                self.executor.wake()
            self._changed()
        return outcome, self.get_run(run_id)

    def get_result(self, run_id: int, phase_num: int) -> Any:
        """A phase's result (decoded JSON); :class:`NotFound` says what is missing."""
        with db.read(self.engine) as conn:
            if runs.get_status(conn, run_id=run_id) is None:
                raise NotFound(f"no run with id {run_id}")
            text = artifacts.get_result(conn, run_id=run_id, phase_num=phase_num)
            if text is None and phase_num not in dict(runs.recorded_phases(conn, run_id=run_id)):
                raise NotFound(f"run {run_id} has no phase {phase_num}")
        if text is None:
            raise NotFound(f"phase {phase_num} of run {run_id} has no result")
        return json.loads(text)

    def list_artifacts(self, run_id: int) -> list[artifacts.Artifact]:
        """A run's artifacts without their data, in phase order."""
        with db.read(self.engine) as conn:
            if runs.get_status(conn, run_id=run_id) is None:
                raise NotFound(f"no run with id {run_id}")
            return artifacts.summaries(conn, run_ids=[run_id])[run_id]

    def get_artifact(self, run_id: int, key: str) -> artifacts.Artifact:
        with db.read(self.engine) as conn:
            if runs.get_status(conn, run_id=run_id) is None:
                raise NotFound(f"no run with id {run_id}")
            found = artifacts.get_artifact(conn, run_id=run_id, key=key)
        if found is None:
            raise NotFound(f"run {run_id} has no artifact {key[:64]!r}")
        return found

    # -- schedules (pipeline.schedules holds their rules and SQL) --

    def list_schedules(self) -> list[Schedule]:
        with db.read(self.engine) as conn:
            return schedules.list_schedules(conn)

    def get_schedule(
        self, schedule_id: int | None = None, *, name: str | None = None
    ) -> Schedule | None:
        with db.read(self.engine) as conn:
            return schedules.get_schedule(conn, schedule_id=schedule_id, name=name)

    def create_schedule(self, payload: Mapping[str, Any]) -> Schedule:
        """Raises :class:`schedules.InvalidSchedule`, the params model's ``ValidationError``
        or :class:`schedules.NameTaken`; nothing written."""
        values = schedules.check_fields(payload, self.pipelines)
        try:
            with db.write(self.engine) as conn:
                return schedules.create_schedule(conn, values, now=self.firer.now(conn))
        except sa.exc.IntegrityError:
            if self.get_schedule(name=values["name"]) is None:
                raise
            # The same name, created at the same instant by another request.
            raise schedules.NameTaken(
                f"a schedule named {values['name']!r} exists already"
            ) from None

    def update_schedule(self, schedule_id: int, payload: Mapping[str, Any]) -> Schedule | None:
        """None if there is no such schedule; raises as :meth:`create_schedule` does."""
        with db.write(self.engine) as conn:
            current = schedules.get_schedule(conn, schedule_id=schedule_id, for_update=True)
            if current is None:
                return None
            values = schedules.check_fields(payload, self.pipelines, current=current)
            return schedules.update_schedule(conn, current, values, now=self.firer.now(conn))

    def delete_schedule(self, schedule_id: int) -> bool:
        with db.write(self.engine) as conn:
            return schedules.delete_schedule(conn, schedule_id=schedule_id)

    def _count_by_status(self) -> dict[str, int]:
        with db.read(self.engine) as conn:
            return {status.value: n for status, n in runs.count_by_status(conn).items()}

    def health(self) -> str | None:
        """None when healthy, else the reason (no paths, no SQL)."""
        try:
            db.check_schema(self.engine)
        except db.SchemaNotCurrent as exc:
            return str(exc)
        except Exception as exc:
            log.warning("health check failed: %s", exc)
            return "the database does not answer"
        return None
