"""The one engine factory, SQLite's transaction discipline, and migrations.

Every engine in the project (runner threads, the API, the CLI, Alembic) comes
from :func:`create_engine`, so that every connection gets the same pragmas and
the same transaction rules. The facts behind these rules were measured and are
written down in DESIGN.md ("SQLite transactions"); the short version:

* The stdlib driver begins transactions lazily and only before DML, so
  ``with conn.begin():`` would not make a SELECT-then-UPDATE atomic, and DDL
  or a CTE write would escape a rollback. We switch the driver to autocommit
  (``isolation_level = None``) and emit BEGIN ourselves, as SQLAlchemy's
  pysqlite documentation recommends.
* Write transactions use ``BEGIN IMMEDIATE``: a deferred transaction that
  reads and then writes after another connection committed fails at once with
  "database is locked" (its WAL snapshot cannot be upgraded) and never waits
  for the busy timeout. IMMEDIATE takes the write lock first and never hits
  that. Read transactions (``read_only``) use a deferred BEGIN, so that
  readers never wait for a writer (WAL lets them read the last commit).
* BEGIN is sent just before the transaction's first statement, not when
  ``begin()`` is called, so a phase that computes or fetches before it writes
  holds no lock meanwhile.
* SQLite's busy handler polls, so a thread that locks again right after each
  commit starves the others. A FIFO gate, shared by every engine of the
  process for one file, queues this process's writers in arrival order.
  Runner threads queue behind requests (``background=True``): a runner
  commits once per phase and is back at once, so in strict arrival order a
  request waited for every runner's next boundary (with 4 runners, creating
  500 runs took twice as long as with one). A request now waits for one
  transaction at most, and runners still get every fifth turn under a flood.
* WAL checkpoints (and their fsyncs) happen in a thread of the process, not
  in the commit of whichever writer crossed the threshold while it held the
  gate: :mod:`pipeline.checkpoints`, poked by the gate every few hundred
  write transactions; SQLite's own checkpoint stays as a backstop.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import Connection, Engine

from pipeline import checkpoints


class DatabaseBusy(Exception):
    """The database stayed locked for longer than the busy timeout.

    The API answers it with 503 and ``Retry-After``; the runner retries its
    own bookkeeping writes on it.
    """


class DatabaseUnavailable(DatabaseBusy):
    """The connection to the database was lost, or none could be made (PostgreSQL).

    A restarted server, a terminated backend, a network cut: like a lock, it
    passes. The API answers 503 with ``Retry-After`` (it is a
    :class:`DatabaseBusy`); the runner reconnects and reads what really
    committed before it records anything.
    """


class _WriteGate:
    """A hand-off lock: the process's SQLite writers take the write lock in turn.

    Releasing hands the gate straight to the oldest waiter (only that thread
    wakes), so a runner that commits and begins again queues behind the API.
    Background writers (runners) have a queue of their own, served when no
    request waits, or after ``FOREGROUND_RUN`` requests in a row.

    Among runners the gate is not handed over at every release: the one
    that released may take it again at once, for up to ``BACKGROUND_SLICE``
    seconds while another runner waits, and the oldest waiting runner takes
    it when it is left free (it looks every ``POLL_SECONDS``). A strict
    hand-off at every phase boundary switched threads (and the GIL) at every
    commit and left the lock idle while they switched: 4 runners of no-op
    phases ran about 40% slower than 1. A hand-over costs more than its
    switch: the next runner's connection finds its page cache stale (another
    connection wrote), and with a hand-over every 32 retakes (about 300 in
    2,000 runs) even the transactions *between* hand-overs were 15-25%
    slower than one runner's (why, I did not find: cold CPU caches are a
    guess). With a slice of 50 ms there are about 30 (interleaved, 2,000
    runs of 5 no-op phases, 4 runners: 1,257 runs/s against 1,097 with 32
    retakes; 20 ms gave 1,176, 100 ms 1,210; one runner 1,219). In full
    benchmark runs 4 runners were still 0.80x-0.92x of one: their threads
    use 8-14% more CPU a run, for reasons not found. On a later machine a
    slice of 200 ms gave 4 runners 0.97x of Huey against 0.94x with 50 ms
    (medians of 3 interleaved triples, the same minutes). A runner waits at most
    a slice for each runner ahead of it, which runs of real phases never
    meet: a runner that leaves the gate free is computing, and the next one
    takes it at its next look. Requests are handed the gate at once, as
    before.
    """

    FOREGROUND_RUN = 4
    BACKGROUND_SLICE = 0.2
    POLL_SECONDS = 0.01

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.checkpointer: checkpoints.Checkpointer | None = None
        self._writes = 0
        self._held = False
        self._waiters: deque[threading.Event] = deque()
        self._background: deque[threading.Event] = deque()
        self._in_a_row = 0
        self._barges = 0  # releases left free while a runner waited, since the last hand-over
        self._slice_started = 0.0

    def acquire(self, timeout: float, *, background: bool = False) -> bool:
        """Wait for our turn; give up (and leave the queue) after ``timeout`` seconds."""
        with self._lock:
            if not self._held:
                self._held = True
                return True
            turn = threading.Event()
            queue = self._background if background else self._waiters
            queue.append(turn)
        deadline = time.monotonic() + timeout
        try:
            while not turn.wait(min(self.POLL_SECONDS, max(deadline - time.monotonic(), 0.0))):
                with self._lock:
                    if not self._held and queue[0] is turn:  # left free, and we are next
                        queue.popleft()
                        self._held = True
                        return True
                if time.monotonic() >= deadline:
                    break
            else:
                return True  # handed over
        except BaseException:  # interrupted (a signal in the main thread): leave the queue
            with self._lock:
                if turn.is_set():
                    self._release_locked()
                else:
                    queue.remove(turn)
            raise
        with self._lock:
            if turn.is_set():  # handed over just as we gave up
                return True
            queue.remove(turn)
            return False

    def release(self) -> bool:
        """Hand over or leave free; True every CHECKPOINT_EVERY releases (a checkpoint is due)."""
        with self._lock:
            self._release_locked()
            self._writes += 1
            return self._writes % checkpoints.CHECKPOINT_EVERY == 0

    def _slice_over(self) -> bool:
        """The gate was left free to the same runners for BACKGROUND_SLICE while one waited."""
        return self._barges > 0 and time.monotonic() - self._slice_started >= self.BACKGROUND_SLICE

    def _release_locked(self) -> None:
        # Still held after a hand-off: now by the next in line.
        if self._waiters and not (self._background and self._in_a_row >= self.FOREGROUND_RUN):
            self._in_a_row += 1
            self._barges = 0
            self._waiters.popleft().set()
        elif self._background and (self._waiters or self._slice_over()):
            self._in_a_row = self._barges = 0
            self._background.popleft().set()
        elif self._background:  # left free: the releaser may take it again, or the next runner
            self._in_a_row = 0
            if self._barges == 0:
                self._slice_started = time.monotonic()
            self._barges += 1
            self._held = False
        else:
            self._in_a_row = self._barges = 0
            self._held = False


_gates: dict[str, _WriteGate] = {}
_gates_lock = threading.Lock()


def _gate_for(path: str) -> _WriteGate:
    with _gates_lock:
        gate = _gates.get(path)
        if gate is None:
            gate = _gates[path] = _WriteGate()
            gate.checkpointer = checkpoints.Checkpointer(path, gate)
        return gate


def is_sqlite(engine: Engine | Connection) -> bool:
    return engine.dialect.name == "sqlite"


def create_engine(
    url: str,
    *,
    busy_timeout_ms: int = 5000,
    lock_timeout_ms: int | None = None,
    background: bool = False,
    **kwargs: Any,
) -> Engine:
    """Build an engine; SQLite ones get the pragmas and transaction rules above.

    ``lock_timeout_ms`` (PostgreSQL) bounds how long a statement waits for a
    row lock: the API's engine sets it, so that no request waits on a phase's
    locks (it becomes a 503); runners wait as long as they must.
    ``background`` (runners): on SQLite, its writers let requests' writers go first.
    """
    sa_url = sa.make_url(url)
    # The pool hands out the connection returned last, not the one idle
    # longest: on SQLite a connection that another one wrote after finds
    # its page cache stale and reads the pages again. With 3 connections in
    # the pool, taking them in turn made a creation 17 µs (20%) dearer.
    if "poolclass" not in kwargs:  # a pool chosen by the caller may not take the option
        kwargs.setdefault("pool_use_lifo", True)
    if sa_url.get_backend_name() != "sqlite":
        if lock_timeout_ms is not None and sa_url.get_backend_name() == "postgresql":
            options = f"-c lock_timeout={int(lock_timeout_ms)}"
            kwargs.setdefault("connect_args", {}).setdefault("options", options)
        return sa.create_engine(sa_url, **kwargs)
    if sa_url.get_driver_name() != "pysqlite":
        raise ValueError(f"SQLite is used through Python's sqlite3 module, not {sa_url.drivername}")
    connect_args = kwargs.setdefault("connect_args", {})
    connect_args.setdefault("check_same_thread", False)
    connect_args["factory"] = SQLiteConnection
    database = sa_url.database or ""
    in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
    if in_memory:  # one connection per thread (SingletonThreadPool): no pool to size
        kwargs.pop("pool_size", None)
        kwargs.pop("max_overflow", None)
        kwargs.pop("pool_use_lifo", None)
    engine = sa.create_engine(sa_url.set(drivername=f"sqlite+{_DRIVER}"), **kwargs)
    gate = None if in_memory else _gate_for(os.path.realpath(database))

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: SQLiteConnection, record: Any) -> None:
        # Autocommit at the driver level: BEGIN is ours to send (see module doc).
        dbapi_conn.isolation_level = None
        dbapi_conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        # journal_mode and foreign_keys are ignored inside a transaction, so
        # they come first. WAL is a property of the file (set for good by the
        # first connection); foreign_keys is per connection.
        dbapi_conn.execute("PRAGMA journal_mode = WAL")
        dbapi_conn.execute("PRAGMA foreign_keys = ON")
        dbapi_conn.execute("PRAGMA synchronous = NORMAL")
        if gate is not None:  # this process checkpoints in a thread (pipeline.checkpoints)
            dbapi_conn.execute(f"PRAGMA wal_autocheckpoint = {checkpoints.BACKSTOP_PAGES}")
        dbapi_conn.gate = gate
        dbapi_conn.background = background
        dbapi_conn.gate_timeout = busy_timeout_ms / 1000

    return engine


class SQLiteConnection(sqlite3.Connection):
    """The driver's connection, keeping SQLite's transaction rules (module doc) itself.

    SQLAlchemy begins, commits and rolls back through its dialect, which
    calls :meth:`defer_begin`, :meth:`commit` and :meth:`rollback` here; a
    statement gets its cursor from :meth:`cursor`, which sends the deferred
    ``BEGIN`` first. So the rules cost no event dispatch per statement and
    per transaction (they were a tenth of a phase boundary as listeners),
    and their state lives with the connection it describes: closing an
    invalidated connection, or one dropped with a transaction open, frees
    the write gate too.
    """

    # Set by the engine's connect listener.
    gate: _WriteGate | None = None
    background = False
    gate_timeout = 5.0
    _begin: str | None = None  # the BEGIN the next statement sends first
    _holds_gate = False
    _kept: sqlite3.Cursor | None = None

    def statement_cursor(self) -> sqlite3.Cursor:
        """A cursor kept for ``pipeline.compiled``'s statements, after the deferred BEGIN.

        Each of those statements is run and read to its end at once, so one
        cursor serves them all; making and closing one per statement was
        about a tenth of a no-op phase boundary's Python. The caller drops it
        (:meth:`drop_statement_cursor`) after an error.
        """
        if self._begin is not None:
            self._send_begin()
        kept = self._kept
        if kept is None:
            kept = self._kept = super().cursor()
        return kept

    def drop_statement_cursor(self) -> None:
        kept, self._kept = self._kept, None
        if kept is not None:
            kept.close()

    def defer_begin(self, begin: str | None = "BEGIN IMMEDIATE") -> None:
        """The transaction begins just before its first statement, with ``begin`` (None: never)."""
        self._begin = begin

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        if self._begin is not None:
            self._send_begin()
        return super().cursor(*args, **kwargs)

    def _send_begin(self) -> None:
        begin, self._begin = self._begin, None
        assert begin is not None
        gate = self.gate
        if gate is not None and begin == "BEGIN IMMEDIATE":
            if not gate.acquire(self.gate_timeout, background=self.background):
                raise sqlite3.OperationalError("database is locked (write queue timeout)")
            self._holds_gate = True
        try:
            self.execute(begin)  # Connection.execute does not come through cursor()
        except BaseException:
            self._release_gate()
            raise

    # The gate is released after COMMIT/ROLLBACK has really happened, so the
    # next writer's BEGIN IMMEDIATE never meets our lock.
    def commit(self) -> None:
        self._begin = None
        try:
            super().commit()
        finally:
            due = self._release_gate()
        if due:
            self._checkpoint_soon()

    def _checkpoint_soon(self) -> None:
        """Poke the file's checkpointer, telling it whether its fsyncs may overlap ours."""
        assert self.gate is not None
        checkpointer = self.gate.checkpointer
        if checkpointer is None:
            return
        try:  # asked, not assumed: a connection's level can be changed after connect
            level = self.execute("PRAGMA synchronous").fetchone()[0]
        except sqlite3.Error:
            level = 1
        checkpointer.poke(overlap=level <= 1)  # OFF or NORMAL

    def rollback(self) -> None:
        self._begin = None
        try:
            super().rollback()
        finally:
            self._release_gate()

    def close(self) -> None:
        self._begin = None
        self._kept = None
        try:
            super().close()
        finally:
            self._release_gate()

    def _release_gate(self) -> bool:
        """Release the gate if held; True when a checkpoint is due (see :meth:`commit`)."""
        if self._holds_gate:
            self._holds_gate = False
            assert self.gate is not None
            return self.gate.release()
        return False


class _SQLiteDialect(SQLiteDialect_pysqlite):
    """The stdlib driver's dialect; ``BEGIN`` is deferred to the connection (above)."""

    supports_statement_cache = True

    def do_begin(self, dbapi_connection: Any) -> None:
        dbapi_connection.defer_begin()


_DRIVER = "pipeline_pysqlite"
registry.register(f"sqlite.{_DRIVER}", __name__, "_SQLiteDialect")


def read_only(conn: Connection, *, snapshot: bool = True) -> None:
    """The transaction just begun on ``conn`` only reads: on SQLite, a deferred ``BEGIN``.

    Readers then never wait for a writer (WAL lets them read the last commit).
    Without ``snapshot`` (a read of one statement) no ``BEGIN`` is sent at all.
    """
    dbapi = conn.connection.dbapi_connection
    if isinstance(dbapi, SQLiteConnection):
        dbapi.defer_begin("BEGIN" if snapshot else None)


def is_lock_error(exc: BaseException) -> bool:
    """True for "database is locked"-like errors that a later attempt may not hit."""
    orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
    if isinstance(orig, sqlite3.OperationalError):
        code = getattr(orig, "sqlite_errorcode", None)
        return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in str(orig)
    # PostgreSQL: lock_not_available (lock_timeout) and serialization/deadlock
    # failures, by SQLSTATE so that no driver import is needed here.
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return sqlstate in ("55P03", "40001", "40P01")


# SQLSTATEs of a connection that is gone or cannot be had: class 08 (connection
# exception) and the server shutting down, crashed or still starting (57P01-03).
_UNAVAILABLE_STATES = ("57P01", "57P02", "57P03")


def is_disconnect(exc: BaseException) -> bool:
    """True when the database connection was lost or could not be made (not SQLite)."""
    if not isinstance(exc, sa.exc.DBAPIError) or isinstance(exc.orig, sqlite3.Error):
        return False
    if exc.connection_invalidated:
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate is not None:
        return sqlstate.startswith("08") or sqlstate in _UNAVAILABLE_STATES
    # psycopg says "connection refused" or "server closed the connection" with no state.
    return isinstance(exc, sa.exc.OperationalError)


class _TranslateErrors:
    """``with translate_errors():`` as a plain object: a phase boundary enters it once.

    A generator-based context manager cost about 5 µs a boundary; this one
    has no state, so one instance serves every ``with``.
    """

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        if exc is None or not isinstance(exc, sa.exc.DBAPIError | sqlite3.OperationalError):
            return
        if is_lock_error(exc):
            raise DatabaseBusy("the database is busy; try again shortly") from exc
        if is_disconnect(exc):
            raise DatabaseUnavailable("the database is unavailable; try again shortly") from exc


_TRANSLATE_ERRORS = _TranslateErrors()


def translate_errors() -> _TranslateErrors:
    """Turn driver lock and connection errors into :class:`DatabaseBusy`, in one place."""
    return _TRANSLATE_ERRORS


@contextmanager
def write(engine: Engine) -> Iterator[Connection]:
    """One short write transaction (``BEGIN IMMEDIATE`` on SQLite)."""
    with translate_errors(), engine.begin() as conn:
        yield conn


@contextmanager
def read(engine: Engine, *, one_statement: bool = False) -> Iterator[Connection]:
    """One read transaction: a consistent snapshot that never waits for writers.

    A run and its phases are several statements; under PostgreSQL's default
    READ COMMITTED each would see its own instant (a run read as queued with
    its first phase already running). REPEATABLE READ gives the transaction
    one snapshot, as SQLite's WAL does; a transaction that only reads never
    meets its serialization failures, and psycopg puts the level in its BEGIN
    (no extra round trip).

    ``one_statement``: the caller sends one statement on SQLite, which is a
    snapshot by itself, so no ``BEGIN`` and ``COMMIT`` are sent: two steps
    of the driver fewer, each of which lets another thread take the GIL (a
    ``GET /runs/{id}`` reads on the event loop, beside the runners).
    """
    with translate_errors(), engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            read_only(conn, snapshot=not one_statement)
            yield conn


# -- migrations ---------------------------------------------------------------


def migrations_dir() -> Path:
    """Where the Alembic scripts are: inside the installed package, or the repo."""
    packaged = Path(__file__).parent / "alembic"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "alembic"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(url: str) -> None:
    """``alembic upgrade head``, for ``pipeline migrate`` and tests."""
    command.upgrade(alembic_config(url), "head")


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


class SchemaNotCurrent(Exception):
    """The database is not at the migration head; the message says how to fix it."""


def check_schema(engine: Engine) -> None:
    """Refuse to work on a database that is not migrated to the head revision."""
    with read(engine) as conn:
        current = current_revision(conn)
    head = head_revision()
    if current != head:
        raise SchemaNotCurrent(
            f"the database is at migration revision {current or '(none)'}, not at the head "
            f"({head}); run `pipeline migrate` (or `alembic upgrade head`) first"
        )
