"""Who owns a run, and when a run has lost its runner.

A ``running`` run promises that a runner is executing it right now. When the
runner is gone, the run must say so (DESIGN.md, "One run's life", step 7), and
it must never be declared lost while its runner lives: a live run ended or
queued again would execute twice. This module holds the rules that decide,
and the SQL they need (heartbeats and the sweep).

* An owner is ``host:pid:process-start:thread``. The host is more than the
  hostname: containers share one (Kubernetes ``hostNetwork``, Docker
  ``--uts=host``) while each has its own pids, so it is the hostname plus the
  kernel's boot id and the pid namespace, where Linux has them. Only an owner
  of this very host can be judged by its pid.
* On this host the kernel answers: no such pid, a pid now used by a younger
  process (its start time differs), or a zombie (``Z``/``X``: killed and not
  reaped yet, the normal state of a killed process under a container's PID 1
  that reaps nothing) is dead. A live process is never touched, however slow.
* In this very process, a run is lost when no runner of the process is
  executing it (a runner thread that died, or one that could not record the
  end). Runners hold their run in :data:`EXECUTING` from inside the claiming
  transaction until they are done with it, so no sweep can see a run claimed
  here but not yet held.
* Elsewhere only the heartbeat tells: silent for longer than the lease means
  lost. Its age is read on the database's clock (``schema.db_now``), both when
  it is written and when it is judged, because machines' clocks disagree: a
  worker ten minutes behind would otherwise look dead while it works.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline import db
from pipeline.compiled import Compiled
from pipeline.runs import RunStatus, add_warnings
from pipeline.schema import analysis_runs as runs_t
from pipeline.schema import db_now
from pipeline.schema import run_phases as phases_t

log = logging.getLogger("pipeline.liveness")


# -- who we are ------------------------------------------------------------------


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def host_identity() -> str:
    """hostname/boot-id/pid-namespace (as much of it as this system tells); no ``:``."""
    parts = [socket.gethostname()]
    boot_id = _read_text("/proc/sys/kernel/random/boot_id")
    if boot_id:
        parts.append(boot_id)
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        namespace = ""
    digits = "".join(c for c in namespace if c.isdigit())
    if digits:
        parts.append(digits)
    return "/".join(parts).replace(":", "_")


HOST = host_identity()


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process, or None if there is none."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and ")"
    return fields[0], fields[19]


def process_identity(pid: int | None = None) -> str:
    """``host:pid:start`` of this process (or of ``pid`` on this host); runners add ``:thread``."""
    pid = os.getpid() if pid is None else pid
    stat = _proc_stat(pid)
    return f"{HOST}:{pid}:{stat[1] if stat else '0'}"


def process_is_gone(pid: int, started: str) -> bool:
    """True when the pid on this host is dead, a zombie, or now another (younger) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists, under another user
    stat = _proc_stat(pid)
    if stat is None:
        return os.path.isdir("/proc/self")  # no /proc entry on a system that has /proc
    state, actual_start = stat
    if state in ("Z", "X"):
        return True
    return started != "0" and actual_start != started


# -- what this process is executing ------------------------------------------------


class Executing:
    """The runs that runners of this process are executing, by database URL and id.

    Process-wide, because one process may hold several executors on one
    database (a server and a ``start_run`` call); each database URL apart,
    because run ids repeat across databases.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: set[tuple[str, int]] = set()

    def hold(self, url: str, run_id: int) -> None:
        with self._lock:
            self._runs.add((url, run_id))

    def release(self, url: str, run_id: int) -> None:
        with self._lock:
            self._runs.discard((url, run_id))

    def __contains__(self, key: tuple[str, int]) -> bool:
        with self._lock:
            return key in self._runs


EXECUTING = Executing()


def why_lost(
    owner: str,
    heartbeat_at: dt.datetime | None,
    *,
    now: dt.datetime,
    lease_seconds: float,
    executing_here: Callable[[], bool],
) -> str | None:
    """How a run's owner was lost ("interrupted", "worker lost"), or None while it may live.

    ``now`` is the database's clock; ``executing_here`` says whether a runner
    of this process holds the run (asked only when the owner is this process).
    """
    try:
        host, pid_text, started, _thread = owner.split(":", 3)
        pid = int(pid_text)
    except ValueError:
        return None
    if host == HOST:
        if pid == os.getpid() and process_identity() == f"{host}:{pid}:{started}":
            return None if executing_here() else "interrupted"
        return "interrupted" if process_is_gone(pid, started) else None
    if heartbeat_at is None:
        return None
    silent = (now - heartbeat_at).total_seconds()
    return "worker lost" if silent > lease_seconds else None


# -- heartbeats ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Beat:
    """What a runner's heartbeat writes for one run: its sub-progress."""

    run_id: int
    owner: str
    phase_num: int
    current: int | None
    total: int | None


_owned = sa.and_(
    runs_t.c.id == sa.bindparam("b_run"),
    runs_t.c.owner == sa.bindparam("b_owner"),
    runs_t.c.status == RunStatus.RUNNING.value,
)
_BEAT = Compiled(
    sa.update(runs_t)
    .where(_owned, runs_t.c.current_phase == sa.bindparam("b_phase"))
    .values(
        heartbeat_at=db_now(),
        phase_progress_current=sa.bindparam("b_current"),
        phase_progress_total=sa.bindparam("b_total"),
    )
    .returning(runs_t.c.cancel_requested_at)
)


def heartbeat(conn: Connection, *, beats: Sequence[Beat]) -> dict[int, bool]:
    """Refresh heartbeats and sub-progress; per run still ours, whether cancel was asked.

    Each run's beat has its own savepoint: a beat that fails (a value the
    column refuses) is logged and skipped, and never stops another run's.
    """
    answer: dict[int, bool] = {}
    for beat in beats:
        params = {
            "b_run": beat.run_id,
            "b_owner": beat.owner,
            "b_phase": beat.phase_num,
            "b_current": beat.current,
            "b_total": beat.total,
        }
        try:
            with conn.begin_nested():
                row = _BEAT.execute(conn, params).first()
        except Exception as exc:
            if db.is_lock_error(exc) or db.is_disconnect(exc):
                raise  # nothing else can be written either
            log.warning("heartbeat of run %s refused: %s", beat.run_id, exc)
            continue
        if row is not None:
            answer[beat.run_id] = row.cancel_requested_at is not None
    return answer


class Heartbeat:
    """A thread that beats for an executor's runs; never on a phase's thread.

    One write per run per ``interval``, whatever the phase's progress() call
    rate; its answer carries cancel requests made by other processes to the
    phases here. It gives up at once when SQLite's lock is busy (a phase is
    writing): the next tick writes instead, and the API of this process reads
    the in-memory progress meanwhile. It ends when there is nothing to beat
    for, and is started again by the next run.
    """

    def __init__(
        self,
        url: str,
        *,
        interval: float,
        beats: Callable[[], list[Beat]],
        on_cancel: Callable[[int], None],
        on_beat: Callable[[], None] = lambda: None,
    ) -> None:
        self.url = url
        self.interval = interval
        self._beats = beats
        self._on_cancel = on_cancel
        self._on_beat = on_beat  # after each beat committed: progress others may watch
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def ensure_running(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="pipeline-heartbeat", daemon=True
                )
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        engine = db.create_engine(self.url, busy_timeout_ms=0)
        try:
            while not self._stop.wait(self.interval):
                with self._lock:
                    beats = self._beats()
                    if not beats:
                        self._thread = None
                        return
                try:
                    with db.write(engine) as conn:
                        answer = heartbeat(conn, beats=beats)
                except db.DatabaseBusy:
                    continue  # includes a lost connection: the next tick reconnects
                except Exception:
                    log.exception("heartbeat failed; will try again")
                    continue
                self._on_beat()
                for run_id, cancel in answer.items():
                    if cancel:
                        self._on_cancel(run_id)
        finally:
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None
            engine.dispose()


# -- the sweep --------------------------------------------------------------------------

_SUSPECTS = sa.select(
    runs_t.c.id,
    runs_t.c.status,
    runs_t.c.owner,
    runs_t.c.heartbeat_at,
    runs_t.c.current_phase,
    runs_t.c.phase_label,
    runs_t.c.cancel_requested_at,
    db_now().label("db_now"),
).where(
    runs_t.c.status.in_([RunStatus.RUNNING.value, RunStatus.QUEUED.value]),
    runs_t.c.owner.is_not(None),
)


def sweep(
    conn: Connection,
    *,
    why_dead: Callable[[Any, dt.datetime], str | None],
    requeue: bool = False,
) -> list[int]:
    """End the runs whose runner is gone; ``why_dead(row, db_now)`` decides.

    It answers None for a live owner, else how the owner was lost. Such a run
    is marked failed, or with ``requeue`` queued again to continue from its
    first incomplete phase, unless its cancel was requested: then it ends
    cancelled (a run the user asked to stop is never started again). Queued
    runs reserved by a dead process (``pipeline run --wait`` killed before it
    started) are ended too: nobody else would ever start them.
    """
    swept = []
    for row in conn.execute(_SUSPECTS).all():
        reason = why_dead(row, row.db_now)
        if reason is not None and _end_lost(conn, row, reason, requeue=requeue):
            swept.append(row.id)
    return swept


def _end_lost(conn: Connection, row: Any, reason: str, *, requeue: bool) -> bool:
    if row.status == RunStatus.RUNNING.value:
        message = f"{reason} during phase {row.current_phase} ({row.phase_label})"
    else:
        message = f"{reason} before it started"
    values: dict[str, Any] = {"phase_progress_current": None, "phase_progress_total": None}
    if row.cancel_requested_at is not None:
        outcome = RunStatus.CANCELLED
        values.update(status=outcome.value, completed_at=db_now())
    elif requeue:
        outcome = RunStatus.QUEUED
        values.update(status=outcome.value, owner=None)
    else:
        outcome = RunStatus.FAILED
        values.update(status=outcome.value, error_message=message, completed_at=db_now())
    ended = conn.execute(
        sa.update(runs_t)
        .where(
            runs_t.c.id == row.id,
            runs_t.c.owner == row.owner,
            runs_t.c.status == row.status,
            # A heartbeat written since we looked means it is alive after all.
            runs_t.c.heartbeat_at.is_(None)
            if row.heartbeat_at is None
            else runs_t.c.heartbeat_at == row.heartbeat_at,
        )
        .values(**values)
        .returning(runs_t.c.completed_at)
    ).first()
    if ended is None:
        return False
    phase_status = {
        RunStatus.QUEUED: "pending",
        RunStatus.FAILED: "failed",
        RunStatus.CANCELLED: "cancelled",
    }[outcome]
    conn.execute(
        sa.update(phases_t)
        .where(phases_t.c.run_id == row.id, phases_t.c.status == "running")
        .values(status=phase_status, finished_at=ended.completed_at)
    )
    if outcome is not RunStatus.FAILED:
        then = {
            RunStatus.QUEUED: "queued again to continue",
            RunStatus.CANCELLED: "its cancel had been requested, so it ends cancelled",
        }[outcome]
        add_warnings(conn, run_id=row.id, phase=row.current_phase, messages=[f"{message}; {then}"])
    return True
