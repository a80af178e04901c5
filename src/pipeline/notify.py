"""Wake-ups on PostgreSQL: ``LISTEN`` for runs that became claimable, or changed.

Migration 0006's trigger sends ``NOTIFY pipeline_runs_queued`` whenever a run
is created, resumed or requeued (whoever did it); migration 0009's sends
``NOTIFY pipeline_runs_changed`` whenever a statement changes a run's status,
cancel request or owner, and a :class:`Notifier` sends it, after the commit,
for the phase boundaries and heartbeats of its process's runners. A
:class:`Listener` thread in each server and worker holds one connection that
listens to the channels its process has a use for: an executor wakes at once
for a queued run, and the shared watcher of ``GET /events`` (``pipeline.watch``)
looks at once when a worker elsewhere moved a run on. The polls stay the
fallback: a lost listener connection is reconnected, and until then nothing
is missed but a second or so.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
import sqlalchemy as sa

log = logging.getLogger("pipeline.notify")

CHANNEL = "pipeline_runs_queued"
CHANGED = "pipeline_runs_changed"
# The listening thread waits on its connection's socket and on a pipe that
# stop() writes to, so it ends (and closes its connection) at once.
WAIT_SECONDS = 5.0
RECONNECT_SECONDS = (0.5, 1.0, 2.0, 5.0)
APPLICATION_NAME = "pipeline-listener"
# A Notifier tells of its process's progress at most this often: a watcher
# looks at most every 0.1 s anyway (pipeline.watch).
NOTIFY_SPACING_SECONDS = 0.1


def conninfo(url: str) -> str:
    """psycopg's connection string for a SQLAlchemy PostgreSQL URL."""
    parsed = sa.make_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


class Listener:
    """A daemon thread that calls a channel's callback when notified (and after a reconnect).

    ``channels`` maps channel names to callbacks. Notifications that arrive
    together call each callback once: what they wake (an executor, a watcher)
    looks at the database anyway.
    """

    def __init__(self, url: str, channels: Mapping[str, Callable[[], None]]) -> None:
        self._conninfo = conninfo(url)
        self._channels = dict(channels)
        self._stop = threading.Event()
        self._stop_read, self._stop_write = os.pipe()
        self._thread = threading.Thread(target=self._loop, name="pipeline-listener", daemon=True)
        self.listening = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop listening: the thread closes its connection and ends now (once)."""
        if self._stop.is_set():
            return
        self._stop.set()
        os.write(self._stop_write, b"x")
        if self._thread.is_alive():
            self._thread.join(10)
        os.close(self._stop_read)
        os.close(self._stop_write)

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self._conninfo, autocommit=True, application_name=APPLICATION_NAME
                ) as conn:
                    for channel in self._channels:
                        conn.execute(f"LISTEN {channel}")
                    self.listening.set()
                    if failures:
                        log.info("listening for changes to runs again")
                        self._wake(set(self._channels))  # what happened while we were away
                    failures = 0
                    while not self._stop.is_set():
                        # What arrived (or was read along with LISTEN's answer), then wait.
                        arrived = {n.channel for n in conn.notifies(timeout=0)}
                        if arrived:  # drained: one wake per channel for all
                            self._wake(arrived)
                        select.select([conn.fileno(), self._stop_read], [], [], WAIT_SECONDS)
            except psycopg.Error as exc:
                self.listening.clear()
                if self._stop.is_set():
                    return
                delay = RECONNECT_SECONDS[min(failures, len(RECONNECT_SECONDS) - 1)]
                if failures == 0:
                    log.warning("listening for changes to runs failed (%s); polling meanwhile", exc)
                failures += 1
                self._stop.wait(delay)

    def _wake(self, channels: set[str]) -> None:
        for channel in sorted(channels):
            try:
                self._channels[channel]()
            except Exception:
                log.exception("waking for %s failed", channel)


class Notifier:
    """Tells every server's watcher that runs here moved on: after the commit, folded.

    A NOTIFY inside a transaction takes a database-wide lock at its commit,
    so transactions that notify commit one at a time; a trigger's NOTIFY at
    every phase boundary made the runners queue behind it (migration 0009).
    The runners call :meth:`changed` after a boundary commits, the heartbeat
    after a beat; a daemon thread sends one ``NOTIFY`` for all the calls of
    the last ``spacing`` seconds, on its own autocommit connection. If that
    fails, the watchers' polls still see the change, a second or so later.
    """

    def __init__(self, url: str, *, spacing: float = NOTIFY_SPACING_SECONDS) -> None:
        self._conninfo = conninfo(url)
        self._spacing = spacing
        self._changed = False  # since the last NOTIFY
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.sent = 0

    def changed(self) -> None:
        """From any thread: a committed change that the trigger does not tell of."""
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._stop.is_set():
                    self._thread = threading.Thread(
                        target=self._loop, name="pipeline-notifier", daemon=True
                    )
                    self._thread.start()
        self._changed = True
        self._wake.set()

    def stop(self) -> None:
        """Send what is pending, then end the thread and close its connection."""
        with self._lock:
            self._stop.set()
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join(10)

    def _loop(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        failed = False
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._changed:
                    self._changed = False
                    try:
                        if conn is None:
                            conn = psycopg.connect(
                                self._conninfo, autocommit=True, application_name=APPLICATION_NAME
                            )
                        conn.execute(f"NOTIFY {CHANGED}")
                        self.sent += 1
                        failed = False
                    except psycopg.Error as exc:
                        if not failed:
                            log.warning("telling other servers of progress failed (%s)", exc)
                        failed = True
                        if conn is not None:
                            conn.close()
                        conn = None
                if self._stop.is_set():
                    return
                self._stop.wait(self._spacing)
        finally:
            if conn is not None:
                conn.close()
