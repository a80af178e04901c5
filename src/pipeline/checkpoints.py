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

What it cannot do is restart the WAL: SQLite rewinds it to its start only
when a writer begins after a checkpoint copied *every* frame, which a
checkpoint racing writers rarely does. So the engines keep SQLite's own
checkpoint as a backstop, at ``BACKSTOP_PAGES``: under a sustained flood
the WAL rewinds once every 4,000 pages (a quarter of the stalls there were),
and one huge transaction is checkpointed when it commits, as before. A
process that writes little never starts the thread at all.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger("pipeline.checkpoints")

CHECKPOINT_EVERY = 256
BACKSTOP_PAGES = 4000
IDLE_SECONDS = 2.0


class Checkpointer:
    """Checkpoints one database file when :meth:`poke` is called; its thread ends when idle."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.checkpoints = 0  # done since the process started (tests and benchmarks read it)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def poke(self) -> None:
        """Ask for a checkpoint soon; cheap enough to call from a commit."""
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
        """One ``PASSIVE`` checkpoint: copies what it can, never waits for anyone."""
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
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            finally:
                conn.close()
            self.checkpoints += 1
        except sqlite3.Error as exc:  # SQLite's own checkpoint (the backstop) still runs
            log.warning("background checkpoint of %s failed: %s", self.path, exc)
