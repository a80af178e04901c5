"""The phase registry, the context a phase works with, and the runner threads.

A run executes in a non-daemon thread with its own engine and connection.
Each phase runs inside ``with conn.begin():`` together with the record that
it completed and the boundary update for the next phase, so a phase is either
wholly committed and recorded or not at all, and ``current_phase`` always
names the phase in flight (DESIGN.md, "One run's life").
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pipeline import artifacts, db, liveness, notify, runs
from pipeline.metrics import Metrics
from pipeline.params import validate_params
from pipeline.pipelines import DEFAULT_NAME, Pipeline, as_pipelines, choose_pipeline

# Where they lived before pipelines.py; kept importable from here.
from pipeline.pipelines import MAX_LABEL_LENGTH as MAX_LABEL_LENGTH
from pipeline.pipelines import Phase as Phase
from pipeline.pipelines import PhaseFn as PhaseFn
from pipeline.pipelines import Registry as Registry
from pipeline.pipelines import RegistryError as RegistryError
from pipeline.pipelines import UnknownPipeline as UnknownPipeline
from pipeline.pipelines import load_pipelines as load_pipelines
from pipeline.pipelines import load_registry as load_registry
from pipeline.pipelines import validate_registry as validate_registry
from pipeline.runs import RunStatus
from pipeline.schema import MAX_COUNTER

log = logging.getLogger("pipeline.orchestrator")
# What phases log to, through a RunLogger naming the run and phase.
run_log = logging.getLogger("pipeline.run")

T = TypeVar("T")


# -- the registry --------------------------------------------------------------


def phase_labels(registry: Registry) -> list[tuple[int, str]]:
    return [(num, label) for num, label, _ in registry]


# -- retries -------------------------------------------------------------------

# Longest wait between two attempts, whatever the declared backoff.
MAX_BACKOFF_SECONDS = 300.0
# A phase that met a database lock held by someone else for longer than the
# busy timeout is tried again this many times, declared or not: its attempt
# rolled back whole, so a new attempt is safe, and the lock is transient.
BUSY_RETRIES = 3


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often a phase is attempted again, and after how long."""

    retries: int = 0
    backoff: float = 1.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def delay(self, attempt: int) -> float:
        """Exponential from ``backoff``, capped, with full jitter on the upper half."""
        base = min(self.backoff * 2.0 ** (attempt - 1), MAX_BACKOFF_SECONDS)
        return base / 2 + random.uniform(0, base / 2)


# A phase whose connection was lost, and whose attempt did not commit (the
# runner reads that after reconnecting), is tried again this many times.
CONNECTION_RETRIES = 3

NO_RETRY = RetryPolicy()
BUSY_BACKOFF = RetryPolicy(backoff=0.2)
RECONNECT_BACKOFF = RetryPolicy(backoff=0.5)
F = TypeVar("F", bound=Callable[..., object])


def phase(
    *,
    retries: int = 0,
    backoff: float = 1.0,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
) -> Callable[[F], F]:
    """Declare a phase's retry policy: ``@phase(retries=2, backoff=0.5, retry_on=(IOError,))``.

    An attempt that raises one of ``retry_on`` rolls back whole, a warning
    records it, and the phase runs again after an exponential, jittered
    backoff (a cancel request ends the wait). Without it, no retries.
    """
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError("retries must be an integer >= 0")
    if not isinstance(backoff, int | float) or backoff < 0:
        raise ValueError("backoff must be a number of seconds >= 0")
    if not isinstance(retry_on, tuple) or not all(
        isinstance(t, type) and issubclass(t, BaseException) for t in retry_on
    ):
        raise ValueError("retry_on must be a tuple of exception types")
    policy = RetryPolicy(retries=retries, backoff=float(backoff), retry_on=retry_on)

    def declare(fn: F) -> F:
        fn.__pipeline_retry__ = policy  # type: ignore[attr-defined]
        return fn

    return declare


def retry_policy(fn: PhaseFn) -> RetryPolicy:
    policy = getattr(fn, "__pipeline_retry__", NO_RETRY)
    return policy if isinstance(policy, RetryPolicy) else NO_RETRY


# -- what a phase may use -------------------------------------------------------


class RunCancelled(Exception):
    """Raised by :meth:`RunContext.raise_if_cancelled`; the phase rolls back."""


class RunLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Every record names its run and phase, in the message and as attributes."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return f"run {extra.get('run_id')} phase {extra.get('phase')}: {msg}", kwargs


class RunContext:
    """What a phase knows about its run, and how it reports back."""

    def __init__(
        self,
        run_id: int,
        params: Mapping[str, Any],
        *,
        results: Mapping[int, str] | None = None,
        artifact_keys: Mapping[str, int] | None = None,
        args: Any = None,
        pipeline: str = DEFAULT_NAME,
    ) -> None:
        self.run_id = run_id
        self.pipeline = pipeline
        self.params = params
        # The params model's instance (None for a pipeline without a model).
        self.args = args
        self._results = artifacts.Results(results)
        self._published: dict[str, int] = dict(artifact_keys or {})
        # What the attempt in flight handed over; written when it finishes.
        self._result: str | None = None
        self._staged: dict[str, artifacts.Staged] = {}
        self.phase_num = 0
        self.phase_label = ""
        self.warnings: list[str] = []
        self._logger: RunLogger | None = None
        self._phase_warnings_from = 0
        self._cancel = threading.Event()
        # (phase_num, current, total): one tuple, replaced whole, so the
        # heartbeat thread and the API read it without a lock.
        self._progress: tuple[int, int | None, int | None] = (0, None, None)
        # The next run, claimed by the runner in this run's last transaction.
        self._chained: runs.Claimed | None = None

    @property
    def logger(self) -> RunLogger:
        """A logger whose records name the run and the phase (made when first used in a phase)."""
        logger = self._logger
        if logger is None:
            extra = {"run_id": self.run_id, "phase": self.phase_num or None}
            logger = self._logger = RunLogger(run_log, extra)
        return logger

    def warn(self, message: str) -> None:
        """Record a non-fatal problem; it is kept even if the phase fails later."""
        message = str(message)
        self.warnings.append(message)
        self.logger.warning("%s", message)

    def progress(self, current: int, total: int | None = None) -> None:
        """Sub-progress inside the phase; cheap, never blocks, never raises.

        Nonsense is clamped (negative, beyond the total, beyond what the
        database stores: 2**63-1) or ignored (a total of zero or less, a value
        that is not a number), and a fraction that would go backwards is
        ignored, so the run's percent never drops.
        """
        try:
            cur = int(current)
            tot = None if total is None else min(int(total), MAX_COUNTER)
        except (TypeError, ValueError, OverflowError):
            return
        if tot is not None and tot <= 0:
            tot = None
        cur = min(max(cur, 0), MAX_COUNTER)
        if tot is not None:
            cur = min(cur, tot)
        if self._goes_backwards(cur, tot):
            return
        self._progress = (self.phase_num, cur, tot)

    def _goes_backwards(self, cur: int, tot: int | None) -> bool:
        phase, old_cur, old_tot = self._progress
        if phase != self.phase_num or not old_tot or old_cur is None:
            return False
        return tot is None or cur * old_tot < old_cur * tot

    @property
    def results(self) -> Mapping[int, Any]:
        """Earlier phases' results (their return values) by phase number; read-only.

        Loaded from the database when the run is claimed, so a resumed run
        sees them too; only what committed is there.
        """
        return self._results

    def artifact(
        self,
        key: str,
        *,
        title: str | None = None,
        markdown: str | None = None,
        table: Mapping[str, Any] | None = None,
        chart: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish something a person looks at: exactly one of markdown, table or chart.

        Checked now (``ValueError`` says what is wrong), written when the
        phase commits, with it; publishing a key again in this phase replaces
        it. A key an earlier phase published is refused.
        """
        staged = artifacts.prepare(key, title=title, markdown=markdown, table=table, chart=chart)
        earlier = self._published.get(staged.key)
        if earlier is not None and earlier != self.phase_num:
            raise ValueError(
                f"artifact key {staged.key!r} was already published by phase {earlier}"
            )
        self._staged[staged.key] = staged

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def raise_if_cancelled(self) -> None:
        """Stop now if cancel was asked: this phase's writes roll back."""
        if self._cancel.is_set():
            raise RunCancelled("cancelled")

    # -- for the runner --

    def _enter_phase(self, num: int, label: str) -> None:
        self.phase_num = num
        self.phase_label = label
        self._phase_warnings_from = len(self.warnings)
        self._progress = (num, None, None)
        self._logger = None

    def _begin_attempt(self) -> None:
        """A new attempt starts clean: nothing of a rolled-back one is kept."""
        self._result = None
        self._staged = {}

    def _committed(self) -> None:
        """The phase committed: its result is now there for later phases."""
        if self._result is not None:
            self._results._add(self.phase_num, self._result)
        for key in self._staged:
            self._published[key] = self.phase_num
        self._begin_attempt()

    def _phase_warnings(self) -> list[str]:
        if len(self.warnings) == self._phase_warnings_from:
            return []
        return [str(w) for w in self.warnings[self._phase_warnings_from :]]


# -- who runs what --------------------------------------------------------------


def describe(exc: BaseException) -> str:
    """What a client may read about an exception: its message, never SQL; never raises.

    SQLAlchemy's text carries the statement and its parameters: clients get the
    driver's own message (the log has the rest). An empty message, or one that
    cannot even be rendered, becomes the exception's type name.
    """
    shown: BaseException = exc
    if isinstance(exc, sa.exc.StatementError) and exc.orig is not None:
        shown = exc.orig
    try:
        text = str(shown)
    except Exception:
        text = ""
    if shown is not exc and text:
        return f"{type(shown).__name__}: {text}"
    return text or type(exc).__name__


# How long bookkeeping keeps trying to reach a database that went away (a
# restart takes seconds); after that the sweep settles what is left.
RECONNECT_SECONDS = 30.0


def _retry_on_lock(action: Callable[[], T], *, what: str, attempts: int = 6) -> T:
    """Bookkeeping writes wait out a transient lock or a lost connection (backoff, jitter).

    A lock is tried ``attempts`` times; a database that is unavailable, for
    up to ``RECONNECT_SECONDS``.
    """
    delay = 0.05
    deadline = time.monotonic() + RECONNECT_SECONDS
    attempt = 0
    while True:
        attempt += 1
        try:
            return action()
        except db.DatabaseUnavailable:
            if time.monotonic() > deadline:
                raise
            log.warning("%s: database unavailable, retrying (attempt %d)", what, attempt)
        except db.DatabaseBusy:
            if attempt >= attempts:
                raise
            log.warning("%s: database busy, retrying (attempt %d)", what, attempt)
        time.sleep(delay * (1 + random.random()))
        delay = min(delay * 2, 2.0)


@contextmanager
def _tx(conn: Connection) -> Iterator[Connection]:
    with db.translate_errors(), conn.begin():
        yield conn


class Executor:
    """Executes runs of its pipelines against one database, inside this process.

    ``registry`` is a plain registry (the pipeline ``"phases"``), a
    :class:`Pipeline` or a list of them; only runs of those pipelines are
    claimed.

    Up to ``max_concurrent`` runner threads claim queued runs in id order, each
    with its own engine and connection, until the queue is empty. A heartbeat
    thread keeps the owned runs' ``heartbeat_at`` and sub-progress fresh and
    learns of cancel requests made by other processes.
    """

    def __init__(
        self,
        url: str,
        registry: Registry | Pipeline | Sequence[Pipeline],
        *,
        max_concurrent: int = 4,
        heartbeat_seconds: float = 1.0,
        busy_timeout_ms: int = 5000,
        metrics: Metrics | None = None,
    ) -> None:
        self.url = url
        self.metrics = metrics or Metrics()
        self.pipelines = {p.name: p for p in as_pipelines(registry)}
        # The first pipeline's phases: what code written for one registry reads.
        self.registry = list(next(iter(self.pipelines.values())).phases)
        self.max_concurrent = max_concurrent
        self.heartbeat_seconds = heartbeat_seconds
        self.busy_timeout_ms = busy_timeout_ms
        self.identity = liveness.process_identity()
        self._lock = threading.Lock()
        self._active: dict[int, tuple[RunContext, str]] = {}
        self._threads: set[threading.Thread] = set()
        self._runners = 0
        self._recheck = False
        self._stopping = threading.Event()
        # PostgreSQL: other servers' watchers hear of boundaries and beats from
        # here, after they commit (the trigger tells only of a run's state).
        self._notifier: notify.Notifier | None = None
        if sa.make_url(url).get_backend_name() != "sqlite":
            self._notifier = notify.Notifier(url)
        self._heartbeat = liveness.Heartbeat(
            url,
            interval=heartbeat_seconds,
            beats=self._beats,
            on_cancel=self.notify_cancel,
            on_beat=self._moved,
        )
        self._serial = 0

    # -- starting runs --

    def pipeline(self, name: str | None) -> Pipeline:
        """The pipeline called ``name`` (None: the only one); :class:`UnknownPipeline` if none."""
        return choose_pipeline(self.pipelines, name)

    def start_reserved(
        self, params: Mapping[str, Any], *, pipeline: str | None = None
    ) -> tuple[int, threading.Thread]:
        """Create a run owned by this process from the start and execute it in a new thread.

        No other executor may claim it (``pipeline run --wait``, :func:`start_run`).
        Raises :class:`UnknownPipeline`, :class:`pipeline.params.InvalidParams`
        or :class:`pydantic.ValidationError` (the params model's) before writing.
        """
        chosen = self.pipeline(pipeline)
        stored, _ = chosen.check_params(validate_params(params))
        # One engine for the insert and the run: its runner thread takes it over
        # (and its open connection), instead of making its own.
        engine = db.create_engine(self.url, busy_timeout_ms=self.busy_timeout_ms)
        try:
            owner = f"{self.identity}:pipeline-run-reserved"
            run_id = _retry_on_lock(
                lambda: self._insert(engine, stored, owner=owner, pipeline=chosen.name),
                what="create a run",
            )
            thread = threading.Thread(
                target=self._runner,
                kwargs={"reserved": (run_id, owner), "engine": engine},
                name=f"pipeline-run-{run_id}",
                daemon=False,
            )
            self._start(thread)
        except BaseException:
            engine.dispose()
            raise
        return run_id, thread

    def _insert(
        self, engine: Engine, params: Mapping[str, Any], *, owner: str, pipeline: str
    ) -> int:
        """Insert a reserved run, held for this process before anyone can see it."""
        run_id = None
        try:
            with db.write(engine) as conn:
                run_id = runs.create_run(conn, params=params, owner=owner, pipeline=pipeline).id
                liveness.EXECUTING.hold(self.url, run_id)
        except BaseException:
            if run_id is not None:
                liveness.EXECUTING.release(self.url, run_id)
            raise
        return run_id

    def wake(self, count: int = 1) -> None:
        """Make sure queued runs get a runner: up to ``count`` more, within the concurrency limit.

        A process that finds many runs queued by others starts a runner for
        each of them at once (up to the limit), not one per poll.
        """
        threads = []
        with self._lock:
            if self._stopping.is_set():
                return
            self._recheck = True
            for _ in range(max(count, 1)):
                if self._runners >= self.max_concurrent:
                    break
                self._runners += 1
                self._serial += 1
                threads.append(
                    threading.Thread(
                        target=self._runner, name=f"pipeline-runner-{self._serial}", daemon=False
                    )
                )
        for thread in threads:
            self._start(thread)

    def _start(self, thread: threading.Thread) -> None:
        # Started under the lock: shutdown never finds a thread it cannot join yet.
        with self._lock:
            self._threads.add(thread)
            thread.start()

    def _next_claim(self) -> bool:
        """After an empty claim: claim again if something was queued meanwhile, else retire."""
        with self._lock:
            if self._recheck and not self._stopping.is_set():
                self._recheck = False
                return True
            self._runners -= 1
            return False

    # -- the runner thread --

    def _runner(
        self, reserved: tuple[int, str] | None = None, engine: Engine | None = None
    ) -> None:
        """A runner thread's body; it disposes of ``engine`` (its own by default) at the end."""
        thread = threading.current_thread()
        base_name = thread.name
        counted = reserved is None
        conn: Connection | None = None
        try:
            if engine is None:
                engine = db.create_engine(
                    self.url, busy_timeout_ms=self.busy_timeout_ms, background=True
                )
            conn = engine.connect()
            if reserved is not None:
                self._claim_and_execute(conn, run_id=reserved[0], owner=reserved[1])
                return
            while not self._stopping.is_set():
                with self._lock:
                    self._recheck = False
                claimed = self._claim_and_execute(conn, owner=None)
                thread.name = base_name
                if conn.closed or conn.invalidated:  # a phase closed it: start afresh
                    conn.close()
                    conn = engine.connect()
                if not claimed and not self._next_claim():
                    counted = False
                    return
        except BaseException:
            log.exception("runner thread %s crashed", thread.name)
        finally:
            with self._lock:
                if counted:
                    self._runners -= 1
                self._threads.discard(thread)
            if conn is not None:
                conn.close()
            if engine is not None:
                engine.dispose()

    def _claim_and_execute(
        self, conn: Connection, *, owner: str | None, run_id: int | None = None
    ) -> bool:
        """Claim one run and execute it; False when there was nothing to claim."""
        thread = threading.current_thread()
        owner = owner or f"{self.identity}:{thread.name}"
        labels = {name: p.labels for name, p in self.pipelines.items()}

        def claim() -> runs.Claimed | None:
            # Held inside the transaction: once the claim is visible, so is the hold.
            claimed = None
            try:
                with _tx(conn):
                    claimed = runs.claim(conn, owner=owner, phases=labels, run_id=run_id)
                    if claimed is not None:
                        liveness.EXECUTING.hold(self.url, claimed.run_id)
            except BaseException:
                if claimed is not None:
                    liveness.EXECUTING.release(self.url, claimed.run_id)
                raise
            return claimed

        claimed = None
        try:
            claimed = _retry_on_lock(claim, what="claim a run")
        finally:
            if claimed is None and run_id is not None:  # held since its creation
                liveness.EXECUTING.release(self.url, run_id)
        if claimed is None:
            return False
        # A pool runner claims its next run in the transaction that completes
        # this one (one commit fewer per run); a reserved run is its thread's only one.
        chain = (lambda: runs.claim(conn, owner=owner, phases=labels)) if run_id is None else None
        while claimed is not None:
            if run_id is None:
                thread.name = f"pipeline-run-{claimed.run_id}"
            current, claimed = claimed, None
            try:
                claimed = self._execute(conn, current, owner, chain)
            finally:  # from now on a run still running with us as owner is lost
                liveness.EXECUTING.release(self.url, current.run_id)
        return True

    def _execute(
        self,
        conn: Connection,
        claimed: runs.Claimed,
        owner: str,
        chain: Callable[[], runs.Claimed | None] | None = None,
    ) -> runs.Claimed | None:
        """Execute the run; returns the next run, claimed when this one completed (``chain``)."""
        chosen = self.pipelines[claimed.pipeline]  # claims take only runs of these
        registry = chosen.phases
        ctx = RunContext(
            claimed.run_id,
            claimed.params,
            results=claimed.results,
            artifact_keys=claimed.artifact_keys,
            args=chosen.instance(claimed.params),
            pipeline=chosen.name,
        )
        if claimed.cancel_requested:
            ctx._cancel.set()
        started = time.monotonic()
        status: RunStatus | None = None
        try:
            with self._lock:
                self._active[claimed.run_id] = (ctx, owner)
            self._heartbeat.ensure_running()
            for index in range(claimed.first_phase - 1, len(registry)):
                num, label, fn = registry[index]
                following = registry[index + 1] if index + 1 < len(registry) else None
                ctx._enter_phase(num, label)
                status = self._attempt_phase(
                    conn, ctx, fn, owner, following, chain if following is None else None
                )
                if status is RunStatus.RUNNING:
                    self._moved()
                if status is RunStatus.COMPLETED and run_log.isEnabledFor(logging.INFO):
                    ctx.logger.info("run completed")
                if status is RunStatus.CANCELLED:
                    ctx.logger.info("run cancelled at the boundary after phase %d", num)
                if status is not RunStatus.RUNNING:
                    break
            chained, ctx._chained = ctx._chained, None
            return chained
        except BaseException:
            self._drop_chained(ctx)
            raise
        finally:
            with self._lock:
                self._active.pop(claimed.run_id, None)
            if status is not None and status.terminal:
                self.metrics.run_finished(status.value, time.monotonic() - started)

    def _attempt_phase(
        self,
        conn: Connection,
        ctx: RunContext,
        fn: PhaseFn,
        owner: str,
        following: Phase | None,
        chain: Callable[[], runs.Claimed | None] | None = None,
    ) -> RunStatus | None:
        """Run the phase, again after a retryable failure.

        Returns the run's status after it: running (next phase), completed,
        cancelled or failed; None when the run is not ours any more. With
        ``chain`` (the last phase of a pool runner's run), the next run is
        claimed in the phase's transaction and left in ``ctx._chained``.
        """
        policy: RetryPolicy | None = None  # looked up at the first failure
        attempt = 1
        # Three budgets: a lock or a lost connection spends none of the phase's own.
        retried = {"busy": 0, "connection": 0, "declared": 0}
        while True:
            attempt_started = time.monotonic()
            try:
                status = self._run_phase(conn, ctx, fn, owner, following, chain)
            except BaseException as exc:
                if isinstance(exc, db.DatabaseUnavailable):
                    try:
                        committed = self._committed_after_all(conn, ctx, owner)
                    except Exception as truth:  # not ours any more, or still unreachable
                        self._drop_chained(ctx)
                        return self._record_end(conn, ctx, owner, truth)
                    if committed is not None:  # and the next run's claim with it
                        ctx._committed()
                        return committed
                self._drop_chained(ctx)  # rolled back with the phase
                if policy is None:
                    policy = retry_policy(fn)
                kind = self._retry_kind(policy, exc, retried)
                if kind is None:
                    return self._record_end(conn, ctx, owner, exc)
                retried[kind] += 1
                backoff = {"declared": policy, "busy": BUSY_BACKOFF}.get(kind, RECONNECT_BACKOFF)
                delay = backoff.delay(retried[kind])
                what = describe(exc)
                if not isinstance(exc, sa.exc.StatementError):
                    what = f"{type(exc).__name__}: {what}"
                ctx.warn(
                    f"attempt {attempt} of phase {ctx.phase_num} failed ({what}); "
                    f"retrying in {delay:.1f}s"
                )
            else:
                ctx._committed()
                elapsed = time.monotonic() - attempt_started
                self.metrics.phase_timer(ctx.phase_label).observe(elapsed)
                return status
            self.metrics.phase_retries.labels(ctx.phase_label).inc()
            if ctx._cancel.wait(delay):
                return self._record_end(conn, ctx, owner, RunCancelled("cancelled"))
            attempt += 1
            if not self._record_retry(conn, ctx, owner):
                return None
            self._moved()

    @staticmethod
    def _retry_kind(policy: RetryPolicy, exc: BaseException, retried: dict[str, int]) -> str | None:
        """Which retry budget this failure may spend, if any."""
        if isinstance(exc, RunCancelled | runs.RunLost) or not isinstance(exc, Exception):
            return None
        if isinstance(exc, db.DatabaseUnavailable):
            return "connection" if retried["connection"] < CONNECTION_RETRIES else None
        if isinstance(exc, db.DatabaseBusy) and retried["busy"] < BUSY_RETRIES:
            return "busy"
        if retried["declared"] < policy.retries and isinstance(exc, policy.retry_on):
            return "declared"
        return None

    def _record_retry(self, conn: Connection, ctx: RunContext, owner: str) -> bool:
        def write() -> bool:
            with _tx(conn):
                return runs.retry_phase(
                    conn, run_id=ctx.run_id, owner=owner, phase_num=ctx.phase_num
                )

        try:
            if _retry_on_lock(write, what="record a retry"):
                return True
            ctx.logger.error("run was taken from this runner (swept as interrupted); stopping")
        except Exception:
            ctx.logger.exception("could not record the retry; ending the run")
            self._record_end(conn, ctx, owner, RuntimeError("could not record a retry"))
        return False

    def _run_phase(
        self,
        conn: Connection,
        ctx: RunContext,
        fn: PhaseFn,
        owner: str,
        following: Phase | None,
        chain: Callable[[], runs.Claimed | None] | None = None,
    ) -> RunStatus:
        # With INFO off (Python's default when embedded; the CLI turns it on),
        # the adapter and its record are not even built.
        if run_log.isEnabledFor(logging.INFO):
            ctx.logger.info("phase started: %s", ctx.phase_label)
        ctx._begin_attempt()
        with db.translate_errors(), conn.begin() as tx:
            # A result that cannot be stored fails the phase here, rolled back.
            ctx._result = artifacts.serialize_result(fn(conn, ctx), phase_num=ctx.phase_num)
            if conn.closed or conn.invalidated or not tx.is_active:
                raise RuntimeError(
                    f"phase {ctx.phase_num} ({ctx.phase_label}) committed, rolled back or closed "
                    "the connection it was given; a phase must leave its transaction to the runner"
                )
            status = runs.finish_phase(
                conn,
                run_id=ctx.run_id,
                owner=owner,
                phase_num=ctx.phase_num,
                next_phase=None if following is None else (following[0], following[1]),
                warnings=ctx._phase_warnings(),
                cancel=ctx.cancel_requested,
                result=ctx._result,
                published=list(ctx._staged.values()) if ctx._staged else (),
            )
            if status is RunStatus.COMPLETED and chain is not None and not self._stopping.is_set():
                # Held inside the transaction, as a claim of its own is.
                ctx._chained = chain()
                if ctx._chained is not None:
                    liveness.EXECUTING.hold(self.url, ctx._chained.run_id)
            return status

    def _drop_chained(self, ctx: RunContext) -> None:
        """The transaction that claimed the next run did not commit: forget that run."""
        chained, ctx._chained = ctx._chained, None
        if chained is not None:
            liveness.EXECUTING.release(self.url, chained.run_id)

    def _record_end(
        self, conn: Connection, ctx: RunContext, owner: str, exc: BaseException
    ) -> RunStatus | None:
        """After the phase rolled back: mark the run failed (or cancelled), never raise.

        Returns the status recorded, or None if the run was not ours any more.
        """
        if isinstance(exc, runs.RunLost):
            ctx.logger.error("run was taken from this runner (swept as interrupted); stopping")
            return None
        if isinstance(exc, RunCancelled):
            status, message = RunStatus.CANCELLED, None
            ctx.logger.info(
                "run cancelled inside phase %d; its writes were rolled back", ctx.phase_num
            )
        else:
            status, message = RunStatus.FAILED, describe(exc)
            ctx.logger.error("phase failed: %s", message, exc_info=exc)
        own = conn
        try:
            if own.in_transaction():
                own.rollback()

            def write() -> bool:
                nonlocal own
                if own.closed:  # the phase closed it: use another
                    with db.translate_errors():
                        own = conn.engine.connect()
                with _tx(own):
                    return runs.end_run(
                        own,
                        run_id=ctx.run_id,
                        owner=owner,
                        phase_num=ctx.phase_num,
                        status=status,
                        error_message=message,
                        warnings=ctx._phase_warnings(),
                    )

            if _retry_on_lock(write, what=f"record the end of run {ctx.run_id}"):
                return status
            ctx.logger.error("run was no longer owned by this runner; its end was not recorded")
        except BaseException:
            ctx.logger.exception("could not record the end of the run; the sweep will end it")
        finally:
            if own is not conn:
                own.close()
        return None

    def _committed_after_all(
        self, conn: Connection, ctx: RunContext, owner: str
    ) -> RunStatus | None:
        """After a lost connection: the run's status if the phase committed, else None.

        The connection may have dropped while the COMMIT was on its way, or
        with its answer: only the database knows whether the phase's
        transaction committed. Reconnect (for a while) and read it before
        anything is recorded, so a committed phase is never failed, and never
        run again. Raises :class:`runs.RunLost` if the run is not ours now.
        """

        def read() -> RunStatus | None:
            with _tx(conn):
                return runs.phase_committed(
                    conn, run_id=ctx.run_id, owner=owner, phase_num=ctx.phase_num
                )

        status = _retry_on_lock(read, what=f"read whether run {ctx.run_id}'s phase committed")
        if status is not None:
            ctx.logger.warning("the connection was lost at the commit; the phase had committed")
        return status

    # -- in-process views --

    def live_progress(self, run_id: int) -> tuple[int, int | None, int | None] | None:
        """The freshest sub-progress of a run executing here (the API overlays it)."""
        entry = self._active.get(run_id)
        return None if entry is None else entry[0]._progress

    def _moved(self) -> None:
        """A runner's progress committed; on PostgreSQL, tell other servers (folded)."""
        if self._notifier is not None:
            self._notifier.changed()

    def notify_cancel(self, run_id: int) -> None:
        """A cancel request made in this process reaches the phase at once."""
        entry = self._active.get(run_id)
        if entry is not None:
            entry[0]._cancel.set()

    def active_runs(self) -> list[int]:
        with self._lock:
            return list(self._active)

    # -- liveness --

    def _beats(self) -> list[liveness.Beat]:
        with self._lock:
            return [
                liveness.Beat(run_id, owner, *ctx._progress)
                for run_id, (ctx, owner) in self._active.items()
            ]

    def sweep(self, engine: Engine, *, lease_seconds: float, requeue: bool = False) -> list[int]:
        """End runs whose runner is gone (DESIGN, "One run's life", step 7)."""

        def why_dead(row: Any, now: Any) -> str | None:
            return liveness.why_lost(
                row.owner,
                row.heartbeat_at,
                now=now,
                lease_seconds=lease_seconds,
                executing_here=lambda: (self.url, row.id) in liveness.EXECUTING,
            )

        def write() -> list[int]:
            with db.write(engine) as conn:
                return liveness.sweep(conn, why_dead=why_dead, requeue=requeue)

        swept = _retry_on_lock(write, what="sweep interrupted runs")
        for run_id in swept:
            log.warning(
                "run %s lost its runner; ended or queued again", run_id, extra={"run_id": run_id}
            )
        return swept

    def stop_claiming(self) -> None:
        """No runner claims another run; the runs already running go on."""
        self._stopping.set()

    def shutdown(self, *, wait: bool = True, timeout: float | None = None) -> bool:
        """Claim nothing new; with ``wait``, let running runs finish. True if all ended."""
        self.stop_claiming()
        if not wait:
            return not self._threads
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                threads = list(self._threads)
            if not threads:
                break
            for thread in threads:
                remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
                thread.join(remaining)
            if deadline is not None and time.monotonic() >= deadline:
                break
        self._heartbeat.stop()
        if self._notifier is not None:
            self._notifier.stop()
        with self._lock:
            return not self._threads


def start_run(
    url: str,
    params: Mapping[str, Any] | None = None,
    registry: Registry | Pipeline | Sequence[Pipeline] | None = None,
    *,
    pipeline: str | None = None,
) -> tuple[int, threading.Thread]:
    """Create a run and execute it at once in a non-daemon thread named after it.

    Returns the run id and the thread (join it to wait for the outcome).
    """
    if registry is None:
        from pipeline.config import get_settings

        registry = load_pipelines(get_settings().phases)
    return Executor(url, registry).start_reserved(params or {}, pipeline=pipeline)
