"""Core statements compiled once per dialect and executed on the driver's cursor.

The runner's hot path (a phase boundary, a claim, a heartbeat, creating and
reading a run) is a handful of statements executed thousands of times.
SQLAlchemy's per-statement path costs about 30 µs of Python on top of the
driver's 3; a no-op phase boundary is two statements and a commit, so that
path was most of its cost (bench "boundary cost"). :class:`Compiled` keeps
each statement *defined* once in Core, in the module that owns it, compiles
it once per dialect with SQLAlchemy's own compiler, and runs the compiled
text on the DB-API cursor with SQLAlchemy's own bind and result processors
for its types. So there is no SQL string written by hand, one definition
serves SQLite and PostgreSQL, and values go in and come out exactly as
``conn.execute`` would give them (``tests/test_compiled.py`` checks both).

What this path keeps of SQLAlchemy's, because the project relies on it:

* the transaction stays SQLAlchemy's (``with conn.begin():``), and the
  cursor comes from the connection, so SQLite's deferred ``BEGIN
  IMMEDIATE`` and its write gate (``pipeline.db.SQLiteConnection``) work
  as for any statement; ``before_cursor_execute`` listeners are called
  when there are any, so tracing listeners (the benchmarks') see every
  statement;
* a driver error becomes the same ``sqlalchemy.exc.DBAPIError`` subclass,
  and a lost connection invalidates the ``Connection`` as SQLAlchemy does,
  so ``db.translate_errors`` and the runner's reconnect logic see no
  difference.

Outside a transaction (SQLAlchemy would autobegin), and for statements it
cannot run this way (expanding ``IN`` lists, Python-side column defaults), it
hands the statement to ``conn.execute``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.compiler import SQLCompiler

from pipeline.db import SQLiteConnection

Processor = Callable[[Any], Any]
Statement = sa.Insert | sa.Update | sa.Delete | sa.Select[Any]


class Rows:
    """What a statement returned: its rows (named tuples) and the rows it changed."""

    __slots__ = ("rowcount", "rows")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def first(self) -> Any | None:
        return self.rows[0] if self.rows else None

    def one(self) -> Any:
        if not self.rows:
            raise sa.exc.NoResultFound("no row was found when one was required")
        if len(self.rows) > 1:
            raise sa.exc.MultipleResultsFound("multiple rows were found when one was required")
        return self.rows[0]

    def all(self) -> list[Any]:
        return self.rows

    def scalar(self) -> Any:
        return self.rows[0][0] if self.rows else None


class _Form:
    """One statement compiled for one dialect, with what it needs to bind and read."""

    __slots__ = (
        "binders",
        "fixed",
        "keys",
        "names",
        "positional",
        "readers",
        "row",
        "slots",
        "sql",
        "types",
    )

    def __init__(self, compiled: SQLCompiler, dialect: Dialect) -> None:
        self.sql = compiled.string
        self.positional = bool(compiled.positional)
        # The rendered name of each bind, its fixed value (a literal in the
        # statement) or the caller's key, and its type's processor.
        if compiled.escaped_bind_names:
            raise _Unsupported("bind names that need escaping")
        self.fixed: dict[str, Any] = {}
        self.keys: dict[str, str] = {}
        self.binders: dict[str, Processor] = {}
        for bind, name in compiled.bind_names.items():
            if bind.callable is not None:
                raise _Unsupported(f"bind {bind.key!r} has a callable value")
            if bind.required:
                self.keys[name] = bind.key
            else:
                self.fixed[name] = bind.effective_value
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self.binders[name] = processor
        self.names: tuple[str, ...] = tuple(
            compiled.positiontup or () if self.positional else compiled.bind_names.values()
        )
        # Per parameter sent, in order: the caller's key and its processor, or
        # the fixed value, processed once here.
        self.slots: tuple[tuple[str | None, Any, Processor | None], ...] = tuple(
            (self.keys[n], None, self.binders.get(n))
            if n in self.keys
            else (None, _processed(self.binders.get(n), self.fixed[n]), None)
            for n in self.names
        )
        columns = compiled._result_columns  # SQLAlchemy's own list of what a row holds
        self.row: Any = NamedTuple("Row", [(c.keyname, Any) for c in columns]) if columns else None
        self.types = [c.type for c in columns]
        # (position, processor) of the columns that have one, from the first
        # cursor.description (the driver's type codes are known only then).
        self.readers: tuple[tuple[int, Processor], ...] | None = None


class _Unsupported(Exception):
    """A statement :class:`Compiled` hands to ``conn.execute`` instead."""


class Compiled:
    """A Core statement, compiled once per dialect, run on the DB-API cursor.

    ``params`` are keyed as ``conn.execute`` would take them (the
    ``bindparam`` names); a list of mappings is an executemany.
    """

    __slots__ = ("_forms", "_last", "statement")

    def __init__(self, statement: Statement) -> None:
        self.statement = statement
        self._forms: dict[str, _Form | None] = {}
        # The dialect (one per engine) last asked for, and its form: a process
        # mostly asks for one, and naming it cost as much as finding it.
        self._last: tuple[Dialect, _Form | None] | None = None

    def form(self, dialect: Dialect) -> _Form | None:
        """This statement compiled for ``dialect``; None when it must go through SQLAlchemy."""
        last = self._last
        if last is not None and last[0] is dialect:
            return last[1]
        form = self._form(dialect)
        self._last = (dialect, form)
        return form

    def _form(self, dialect: Dialect) -> _Form | None:
        key = f"{dialect.name}+{dialect.driver}"
        try:
            return self._forms[key]
        except KeyError:
            pass
        compiled = self.statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        form: _Form | None
        if (
            compiled.insert_prefetch
            or compiled.update_prefetch
            or compiled.post_compile_params
            or compiled.literal_execute_params
        ):
            form = None
        else:
            try:
                form = _Form(compiled, dialect)
            except _Unsupported:
                form = None
        self._forms[key] = form
        return form

    def execute(
        self, conn: Connection, params: Mapping[str, Any] | Sequence[Mapping[str, Any]] = {}
    ) -> Rows:
        form = self.form(conn.dialect)
        if form is None or not conn.in_transaction():
            return _through_sqlalchemy(conn, self.statement, params)
        bound: Any
        # A dict is a Mapping, and checking that is fast; the ABC check is not.
        if isinstance(params, (dict, Mapping)):
            many, bound = False, _bind(form, params)
        else:
            many, bound = True, [_bind(form, p) for p in params]
        dbapi_conn = conn.connection.dbapi_connection
        assert dbapi_conn is not None
        # On SQLite, one kept cursor, after the deferred BEGIN (pipeline.db).
        kept = isinstance(dbapi_conn, SQLiteConnection)
        cursor = None
        try:
            cursor = dbapi_conn.statement_cursor() if kept else dbapi_conn.cursor()
            if conn._has_events or conn.engine._has_events:  # as SQLAlchemy itself decides
                conn.dispatch.before_cursor_execute(conn, cursor, form.sql, bound, None, many)
            if many:
                cursor.executemany(form.sql, bound)
            else:
                cursor.execute(form.sql, bound)
            rows = _fetch(form, conn.dialect, cursor) if cursor.description else []
            result = Rows(rows, cursor.rowcount)
        except BaseException as exc:
            if kept:
                dbapi_conn.drop_statement_cursor()
            elif cursor is not None:
                cursor.close()
            if isinstance(exc, conn.dialect.loaded_dbapi.Error):
                raise _wrapped(conn, exc, form.sql, bound, cursor) from exc
            raise
        if not kept:
            cursor.close()
        return result


def _processed(processor: Processor | None, value: Any) -> Any:
    return value if processor is None else processor(value)


def _bind(form: _Form, params: Mapping[str, Any]) -> Any:
    values = [
        value if key is None else params[key] if processor is None else processor(params[key])
        for key, value, processor in form.slots
    ]
    return tuple(values) if form.positional else dict(zip(form.names, values, strict=True))


def _fetch(form: _Form, dialect: Dialect, cursor: Any) -> list[Any]:
    """The rows as named tuples, each value through its type's result processor.

    Only the columns that have a processor are visited, and the tuple is made
    with ``_make`` rather than by calling the class: for a one-column
    ``RETURNING`` (a boundary's) that was 1.0 µs a row against 0.4, and for
    a run's 16 columns 2.9 µs against 1.7 (timeit).
    """
    raw = cursor.fetchall()
    readers = form.readers
    if readers is None:
        processors = [
            type_.dialect_impl(dialect).result_processor(dialect, column[1])
            for type_, column in zip(form.types, cursor.description, strict=True)
        ]
        readers = form.readers = tuple((i, p) for i, p in enumerate(processors) if p is not None)
    make = form.row._make
    if not readers:
        return [make(r) for r in raw]
    rows = []
    for r in raw:
        values = list(r)
        _read_values(values, readers)
        rows.append(make(values))
    return rows


def _read_values(values: list[Any], readers: Sequence[tuple[int, Processor]]) -> None:
    """Each value that has a reader, read in place.

    NULL stays None, as every type of the schema reads it (UTCDateTime, JSON,
    Boolean): a boundary's row is its cancel request, mostly NULL.
    """
    for i, read in readers:
        if values[i] is not None:
            values[i] = read(values[i])


def _wrapped(conn: Connection, exc: Any, sql: str, params: Any, cursor: Any) -> sa.exc.DBAPIError:
    """The error SQLAlchemy would raise, with the connection invalidated if it was lost."""
    dialect = conn.dialect
    lost = dialect.is_disconnect(exc, conn.connection.dbapi_connection, cursor)
    if lost:
        conn.invalidate(exc)
    error: sa.exc.DBAPIError = sa.exc.DBAPIError.instance(
        sql,
        params,
        exc,
        dialect.loaded_dbapi.Error,
        connection_invalidated=lost,
        dialect=dialect,
    )
    return error


def _through_sqlalchemy(
    conn: Connection,
    statement: Statement,
    params: Mapping[str, Any] | Sequence[Mapping[str, Any]],
) -> Rows:
    result = conn.execute(statement, params)
    rows = list(result) if result.returns_rows else []
    return Rows(rows, result.rowcount)


# -- several tables' rows in one statement (SQLite) ------------------------------


class JsonRows:
    """The rows of ``columns`` matching ``where``, as one JSON value of a statement (SQLite).

    ``subquery`` is a scalar subquery giving a JSON array of ``[column, ...]``
    arrays, in no particular order (``json_group_array``), so that a run and
    its phases, warnings and artifacts come back as one row: one statement,
    one step of the driver. :meth:`read` turns it back into rows, each value
    read as its column's type reads it.
    """

    def __init__(self, columns: Sequence[sa.ColumnElement[Any]], where: sa.ColumnElement[bool]):
        self.columns = tuple(columns)
        self.subquery = (
            sa.select(sa.func.json_group_array(sa.func.json_array(*self.columns)))
            .where(where)
            .scalar_subquery()
        )
        self._readers: dict[str, tuple[tuple[int, Processor], ...]] = {}

    def read(self, text: str, dialect: Dialect) -> list[list[Any]]:
        readers = self._readers.get(dialect.name)
        if readers is None:
            found = [
                (i, column.type.dialect_impl(dialect).result_processor(dialect, None))
                for i, column in enumerate(self.columns)
            ]
            readers = self._readers[dialect.name] = tuple((i, p) for i, p in found if p)
        rows: list[list[Any]] = json.loads(text)
        for row in rows:
            _read_values(row, readers)
        return rows
