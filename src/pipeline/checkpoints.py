"""WAL checkpoints in a thread of their own, so that no writer waits for their fsyncs.

SQLite copies the WAL back into the database file (a checkpoint) inside the
commit that brings the WAL to ``wal_autocheckpoint`` pages (1,000 by
default). At synchronous=NORMAL that checkpoint fsyncs the WAL and then the
database file, about 4 ms on this project's machines against 0.2 ms for the
copying itself, and it runs while the committing connection still holds
this process's write gate (:mod:`pipeline.db`). Runs of no-op phases spent
12-15% of their time there, every other writer of the process waiting.

Here a :class:`Checkpointer` per database file and process does the same
``PASSIVE`` checkpoint on a connection of its own, after every
``CHECKPOINT_EVERY`` write transactions of the process (about 1,000 WAL
pages for a phase boundary's four): writers go on appending to the WAL
meanwhile, and the fsyncs overlap their work instead of stopping it.

What a checkpoint racing writers cannot do is rewind the WAL: SQLite starts
it over only when a writer begins after a checkpoint copied *every* frame,
and writers appended more meanwhile. So the engines keep SQLite's own
checkpoint as a backstop at ``BACKSTOP_PAGES``: under a sustained flood the
WAL rewinds once every 4,000 pages (a quarter of the stalls there were),
and one huge transaction is checkpointed when it commits, as before. At
synchronous=FULL the checkpoint holds the gate instead (:meth:`poke`). A
process that writes little never starts the thread at all.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Protocol

log = logging.getLogger("pipeline.checkpoints")

CHECKPOINT_EVERY = 256
BACKSTOP_PAGES = 4000
IDLE_SECONDS = 2.0
GATE_TIMEOUT_SECONDS = 1.0


class Gate(Protocol):
    """The process's write gate for the file (``pipeline.db``): while held, nobody here writes."""

    def acquire(self, timeout: float, *, background: bool = False) -> bool: ...

    def release(self) -> bool: ...


class Checkpointer:
    """Checkpoints one database file when :meth:`poke` is called; its thread ends when idle."""

    def __init__(self, path: str, gate: Gate | None = None) -> None:
        self.path = path
        self.gate = gate
        self.checkpoints = 0  # done since the process started (tests and benchmarks read it)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._overlap = True
        self._thread: threading.Thread | None = None

    def poke(self, *, overlap: bool = True) -> None:
        """Ask for a checkpoint soon; cheap enough to call from a commit.

        ``overlap``: the writers commit at synchronous=NORMAL, so the
        checkpoint's fsyncs can overlap their work. At FULL every commit
        fsyncs the WAL itself and queues behind the checkpoint's fsyncs
        anyway, and the WAL grew to the backstop (a commit that grows the
        file costs about twice one that rewrites it at FULL): the FULL
        boundary went from 1.19x of plain sqlite3 to 1.56x. So there the
        checkpoint holds the gate throughout, as SQLite's own would, and the
        WAL rewinds after it (1.03x-1.14x).
        """
        self._overlap = overlap
        self._wake.set()
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._loop, name="pipeline-checkpoint", daemon=True
                    )
                    self._thread.start()

    def _loop(self) -> None:
        # Daemon: a checkpoint cut short by the process's exit is one SQLite
        # recovers from, and nothing is lost (the WAL still holds every frame).
        while True:
            if not self._wake.wait(IDLE_SECONDS):
                with self._lock:
                    if not self._wake.is_set():  # nobody poked since: end, restart on the next poke
                        self._thread = None
                        return
            self._wake.clear()
            self.checkpoint()

    def checkpoint(self) -> None:
        """One ``PASSIVE`` checkpoint: it never waits for readers (at FULL, see :meth:`poke`)."""
        try:
            # A connection per checkpoint (once per CHECKPOINT_EVERY commits):
            # none is held open between them, so the last connection to close
            # still removes the WAL as SQLite does. synchronous must be NORMAL
            # or FULL here: the checkpoint's fsyncs are what make it safe.
            # mode=rw: a file removed meanwhile is not created again, empty.
            uri = f"{Path(self.path).as_uri()}?mode=rw"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA synchronous = NORMAL")
                if self._overlap:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                elif self.gate is not None and self.gate.acquire(GATE_TIMEOUT_SECONDS):
                    # Queued with requests, as the commit that would have checkpointed
                    # was; nobody here appends meanwhile, so the WAL rewinds after it.
                    try:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    finally:
                        self.gate.release()
                else:
                    return  # the gate stayed busy: SQLite's own checkpoint is the backstop
            finally:
                conn.close()
        except sqlite3.Error as exc:  # SQLite's own checkpoint (the backstop) still runs
            log.warning("background checkpoint of %s failed: %s", self.path, exc)
            return
        self.checkpoints += 1
