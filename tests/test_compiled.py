"""The compiled hot path (``pipeline.compiled``) agrees with SQLAlchemy's own execution.

Every statement the runner, the API's GET and the heartbeat run on the
DB-API cursor is defined once in Core; these tests hold that its compiled
text is the Core definition's, that it gives the same rows and values as
``conn.execute``, and that errors, transactions and listeners behave as they
do through SQLAlchemy.
"""

from __future__ import annotations

import sqlite3

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from pipeline import artifacts, db, liveness, runs
from pipeline.compiled import Compiled
from pipeline.orchestrator import Executor

from .conftest import read_run, wait_for

HOT_MODULES = (runs, artifacts, liveness)
# A run read in one statement with SQLite's JSON functions: runs.get_run uses it there only.
SQLITE_ONLY = {"pipeline.runs._GET_RUN_AT_ONCE"}
DIALECTS = (sqlite.dialect(), postgresql.psycopg.dialect())


def _hot_statements(dialect: sa.Dialect | None = None) -> dict[str, Compiled]:
    """Every compiled statement; a boundary's one-statement form only where it is used."""
    found: dict[str, Compiled] = {}
    for module in HOT_MODULES:
        for name, value in vars(module).items():
            if isinstance(value, Compiled):
                key = f"{module.__name__}.{name}"
                if key in SQLITE_ONLY and dialect is not None and dialect.name != "sqlite":
                    continue
                found[key] = value
            elif isinstance(value, runs._Boundary):
                found[f"{module.__name__}.{name}.run_row"] = value.run_row
                found[f"{module.__name__}.{name}.phase_rows"] = value.phase_rows
                if dialect is None or dialect.name == "postgresql":
                    found[f"{module.__name__}.{name}.fused"] = value.fused
    found["runs._next_queued"] = runs._next_queued(("a", "b"))
    found["runs._insert_phases"] = runs._insert_phases(3)
    return found


def test_the_hot_path_is_what_the_issue_names():
    """Boundary, claim, heartbeat, create and get are all compiled statements."""
    names = set(_hot_statements())
    for name in (
        "pipeline.runs._CROSS.run_row",
        "pipeline.runs._CROSS.phase_rows",
        "pipeline.runs._CROSS.fused",
        "pipeline.runs._FINISH.fused",
        "pipeline.runs._CLAIM.run_row",
        "pipeline.runs._CLAIM.fused",
        "runs._insert_phases",
        "pipeline.runs._CREATE_RUN",
        "pipeline.runs._GET_RUN",
        "pipeline.runs._PHASES_OF_RUN",
        "pipeline.liveness._BEAT",
        "runs._next_queued",
    ):
        assert name in names


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_every_hot_statement_compiles_to_its_core_definition(dialect):
    """Each one has a compiled form (none falls back) whose text is the Core statement's."""
    for name, compiled in _hot_statements(dialect).items():
        form = compiled.form(dialect)
        assert form is not None, f"{name} would go through conn.execute on {dialect.name}"
        assert form.sql == str(compiled.statement.compile(dialect=dialect)), name
        core = compiled.statement.compile(dialect=dialect)
        assert set(form.keys.values()) | set(form.fixed) >= {
            bind.key for bind in core.binds.values() if bind.required
        }, name


def test_statements_it_cannot_run_go_through_sqlalchemy(engine):
    """An expanding IN list has no fixed text: it is handed to conn.execute, same answer."""
    table = sa.table("analysis_runs", sa.column("id"))
    expanding = Compiled(
        sa.select(table.c.id).where(table.c.id.in_(sa.bindparam("ids", expanding=True)))
    )
    assert expanding.form(engine.dialect) is None
    with db.write(engine) as conn:
        made = [runs.create_run(conn, params={}).id for _ in range(3)]
        got = expanding.execute(conn, {"ids": made[:2]}).all()
    assert sorted(r.id for r in got) == made[:2]


def _a_finished_run(url: str) -> int:
    """A run with phases, warnings, a result and an artifact: every column has a value."""

    def first(conn, ctx):
        ctx.warn("a warning")
        ctx.artifact("table", table={"columns": ["a"], "rows": [[1]]})
        return {"answer": 42}

    def second(conn, ctx):
        return None

    executor = Executor(url, [(1, "First", first), (2, "Second", second)])
    try:
        engine = db.create_engine(url)
        with db.write(engine) as conn:
            run_id = runs.create_run(conn, params={"n": 1, "nested": {"x": [1, 2]}}).id
        executor.wake(1)
        wait_for(lambda: _status(engine, run_id) == "completed", timeout=30)
        engine.dispose()
    finally:
        executor.shutdown()
    return run_id


def _status(engine: sa.Engine, run_id: int) -> str | None:
    with db.read(engine) as conn:
        run = runs.get_run_row(conn, run_id=run_id)
    return None if run is None else run.status.value


def test_compiled_reads_give_what_sqlalchemy_gives(db_url, engine):
    """Same rows, same Python values and types (aware datetimes, JSON) on both paths."""
    run_id = _a_finished_run(db_url)
    reads = {
        name: compiled
        for name, compiled in _hot_statements(engine.dialect).items()
        if isinstance(compiled.statement, sa.Select)
        and name != "runs._next_queued"
        and not name.endswith(".fused")  # writes
    }
    params = {"b_run": run_id, "b_owner": None, "b_after": 0, "b_cap": 10}
    with db.read(engine) as conn:
        for name, compiled in reads.items():
            form = compiled.form(conn.dialect)
            assert form is not None
            wanted = {k: params[k] for k in form.keys.values()}
            fast = [tuple(r) for r in compiled.execute(conn, wanted).all()]
            slow = [tuple(r) for r in conn.execute(compiled.statement, wanted)]
            assert fast == slow, name
            assert [[type(v) for v in r] for r in fast] == [[type(v) for v in r] for r in slow]
        run = runs.get_run(conn, run_id=run_id)
    assert run is not None
    assert run.params == {"n": 1, "nested": {"x": [1, 2]}}
    assert run.created_at.tzinfo is not None
    assert run.completed_at is not None
    assert [p.status for p in run.phases] == ["completed", "completed"]
    assert run.phases[0].has_result
    assert [a.key for a in run.artifacts] == ["table"]
    assert [w.message for w in run.warnings] == ["a warning"]


@pytest.mark.parametrize("door", ["create_run", "below_cap", "reserved", "scheduled"])
def test_a_created_run_is_what_a_read_of_its_row_gives(engine, door):
    """A creation reads back only its id and created_at; the rest of the run it returns is
    what it wrote, and must be the row's, field for field."""
    params = {"n": 3, "nested": {"list": [1, 2.5, None, True], "pair": [1, "two"]}, "text": "é"}
    with db.write(engine) as conn:
        if door == "below_cap":
            made = runs.create_run_below_cap(conn, cap=10, params=params, pipeline="other")
        elif door == "reserved":
            made = runs.create_run(conn, params=params, owner="host:1:2:thread")
        elif door == "scheduled":
            made = runs.create_run(conn, params=params, schedule_id=7)
        else:
            made = runs.create_run(conn, params=params)
    assert made is not None
    params["n"] = 4  # the caller's dict is not the run's
    assert made == read_run(engine, made.id)
    assert made.params["n"] == 3
    assert made.params["nested"] == {"list": [1, 2.5, None, True], "pair": [1, "two"]}
    assert made.created_at.tzinfo is not None


def test_a_constraint_violation_is_sqlalchemys_integrity_error(db_url, engine):
    with db.write(engine) as conn:
        run_id = runs.create_run(conn, params={}).id
        row = {"b_run": run_id, "b_num_0": 1, "b_label_0": "One"}
        runs._insert_phases(1).execute(conn, row)
    with pytest.raises(sa.exc.IntegrityError), db.write(engine) as conn:
        runs._insert_phases(1).execute(conn, row)
    with db.read(engine) as conn:  # the failed transaction left nothing
        run = runs.get_run(conn, run_id=run_id)
    assert run is not None
    assert len(run.phases) == 1


def test_sqlite_statements_share_one_cursor_until_one_fails(sqlite_url):
    """One kept cursor serves a connection's compiled statements; a failure replaces it."""
    engine = db.create_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            dbapi = conn.connection.dbapi_connection
            assert isinstance(dbapi, db.SQLiteConnection)
            with conn.begin():
                run_id = runs.create_run(conn, params={}).id
                kept = dbapi.statement_cursor()
                runs.create_run(conn, params={})
                assert dbapi.statement_cursor() is kept
            row = {"b_run": run_id, "b_num_0": 1, "b_label_0": "One"}
            with conn.begin():
                runs._insert_phases(1).execute(conn, row)
            with pytest.raises(sa.exc.IntegrityError), conn.begin():
                runs._insert_phases(1).execute(conn, row)
            assert dbapi._kept is None  # dropped with its failed statement
            with conn.begin():  # the connection goes on, with a new cursor
                assert runs.get_run(conn, run_id=run_id) is not None
                assert dbapi.statement_cursor() is not kept
        with db.read(engine) as conn:  # what committed is there, the failed insert is not
            run = runs.get_run(conn, run_id=run_id)
        assert run is not None
        assert len(run.phases) == 1
    finally:
        engine.dispose()


def test_listeners_see_compiled_statements(engine):
    """Tracing listeners (the benchmarks', a user's) see every statement, as with conn.execute."""
    seen: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda c, cur, sql, *a: seen.append(sql))
    with db.write(engine) as conn:
        runs.create_run(conn, params={})
    assert any(sql.startswith("INSERT INTO analysis_runs") for sql in seen)


def test_a_compiled_write_takes_sqlites_write_lock_first(sqlite_url):
    """The deferred BEGIN IMMEDIATE is sent before a compiled first statement, too."""
    engine = db.create_engine(sqlite_url, busy_timeout_ms=100)
    path = sqlite_url.removeprefix("sqlite:///")
    try:
        with db.write(engine) as conn:
            runs.create_run(conn, params={})
            other = sqlite3.connect(path, timeout=0.05, isolation_level=None)
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
            other.close()
    finally:
        engine.dispose()


def test_a_locked_sqlite_database_is_database_busy(sqlite_url):
    """Another process holds the write lock: the compiled write fails as DatabaseBusy."""
    engine = db.create_engine(sqlite_url, busy_timeout_ms=50)
    path = sqlite_url.removeprefix("sqlite:///")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(db.DatabaseBusy), db.write(engine) as conn:
            runs.create_run(conn, params={})
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with db.write(engine) as conn:  # the gate and the connection are usable again
        assert runs.create_run(conn, params={}).id
    engine.dispose()


def test_a_lost_postgresql_connection_is_invalidated_and_unavailable(db_url, engine):
    """The backend is killed mid-transaction: DatabaseUnavailable, and the connection is dropped."""
    if db.is_sqlite(engine):
        pytest.skip("a lost connection to a database server (PostgreSQL)")
    pg_engine = engine
    conn = pg_engine.connect()
    try:
        tx = conn.begin()
        _terminate(pg_engine, conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
        with pytest.raises(db.DatabaseUnavailable), db.translate_errors():
            runs.create_run(conn, params={})
        assert conn.invalidated
        tx.rollback()
    finally:
        conn.close()
    with db.write(pg_engine) as fresh:  # the pool hands out a working connection
        assert runs.create_run(fresh, params={}).id


def _terminate(engine: sa.Engine, pid: int) -> None:
    with engine.connect() as conn:
        conn.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
        conn.commit()


def _published_run(engine: sa.Engine, url: str) -> int:
    """A completed run with results, warnings (with and without a phase) and artifacts."""

    def first(conn, ctx):
        ctx.warn("first's warning, é")
        ctx.artifact("z-last", markdown="# z", title="Z")
        ctx.artifact("a-first", table={"columns": ["n"], "rows": [[1]]})
        return {"n": 1}

    def second(conn, ctx):
        return None

    def third(conn, ctx):
        ctx.warn("third's warning")
        ctx.artifact("middle", markdown="m")
        return [3]

    executor = Executor(url, [(1, "One", first), (2, "Two", second), (3, "Three", third)])
    run_id, thread = executor.start_reserved({"k": "v"})
    thread.join(30)
    executor.shutdown()
    with db.write(engine) as conn:  # a warning of no phase, as the sweep writes them
        runs.add_warnings(conn, run_id=run_id, phase=None, messages=["of the run"])
    return run_id


def test_the_one_statement_read_of_a_run_is_the_statement_per_table_one(sqlite_url):
    """On SQLite a run is read in one statement (JSON values for its other tables): the same
    Run, field for field, as a statement per table gives, for a full run and an empty one."""
    engine = db.create_engine(sqlite_url)
    try:
        full = _published_run(engine, sqlite_url)
        with db.write(engine) as conn:
            queued = runs.create_run(conn, params={}).id
        for run_id in (full, queued):
            with db.read(engine) as conn:
                at_once = runs.get_run(conn, run_id=run_id)
                row = runs._GET_RUN.execute(conn, {"b_run": run_id}).first()
                per_table = runs._with_details(conn, [row])[0]
            assert at_once == per_table
        assert at_once is not None
        assert at_once.phases == ()
        with db.read(engine) as conn:
            run = runs.get_run(conn, run_id=full)
            assert runs.get_run(conn, run_id=10**9) is None
        assert run is not None
        assert [p.has_result for p in run.phases] == [True, False, True]
        assert [w.message for w in run.warnings] == [
            "first's warning, é",
            "third's warning",
            "of the run",
        ]
        assert [a.key for a in run.artifacts] == ["z-last", "a-first", "middle"]
        assert all(p.started_at is not None and p.started_at.tzinfo is not None for p in run.phases)
    finally:
        engine.dispose()


def test_a_get_on_sqlite_is_one_statement_and_no_transaction(sqlite_url):
    """What GET /runs/{id} sends: one SELECT, no BEGIN or COMMIT (each is a step of the driver
    that lets the runners take the GIL from the event loop)."""
    from pipeline.config import Settings
    from pipeline.service import Service

    service = Service(Settings(database_url=sqlite_url), execute=False)
    try:
        run_id = service.create_run({}).id
        sent: list[str] = []
        with service.engine.connect() as conn:  # the pool's connection: the GET's too
            dbapi = conn.connection.dbapi_connection
            assert isinstance(dbapi, sqlite3.Connection)
            dbapi.set_trace_callback(sent.append)
            conn.rollback()
        assert service.get_run(run_id) is not None
        assert len(sent) == 1, sent
        assert sent[0].lstrip().upper().startswith("SELECT"), sent
    finally:
        service.stop()
