"""``GET /events``: every run's changes in one stream, fed by one watcher per process.

Real uvicorn in this process, real streaming clients (each reads its stream in
a thread of its own), SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import itertools
import json
import queue
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx2
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline import Pipeline
from pipeline.api import create_app
from pipeline.config import Settings
from pipeline.orchestrator import RunContext

from .conftest import wait_for
from .live_server import LiveServer

GO = threading.Event()
FAIL = threading.Event()


def _step(conn: Connection, ctx: RunContext) -> None:
    if ctx.params.get("fail") and FAIL.is_set():
        raise RuntimeError("failing on purpose")
    ctx.progress(1, 2)
    if ctx.params.get("hold"):
        GO.wait(20)
    ctx.progress(2, 2)


ALPHA = Pipeline("alpha", [(1, "First", _step), (2, "Second", _step)])
BETA = Pipeline("beta", [(1, "Only", _step)])


class Listener:
    """One open ``GET /events`` stream; its events (decoded Run JSON) arrive in ``events``.

    Read with ``http.client`` in a thread, so that ``close()`` can hang up at
    once (a shutdown of the socket wakes the blocked read), as a browser does.
    """

    def __init__(self, url: str, query: str = "", headers: dict[str, str] | None = None) -> None:
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.opened = threading.Event()
        self.status: int | None = None
        self.ended: Exception | None = None
        parsed = urllib.parse.urlsplit(url)
        self._conn = http.client.HTTPConnection(parsed.hostname or "", parsed.port, timeout=30)
        self._conn.request("GET", f"/events{query}", headers=headers or {})
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        assert self.opened.wait(15)

    def _read(self) -> None:
        try:
            response = self._conn.getresponse()
            self.status = response.status
            self.opened.set()
            while line := response.readline():
                if line.startswith(b"data:"):
                    self.events.put(json.loads(line[5:]))
        except Exception as exc:  # hung up by close(): http.client fails in several ways
            self.ended = exc
        finally:
            self.opened.set()

    def until(self, predicate: Any, timeout: float = 15) -> dict[str, Any]:
        """The first event (from now) for which ``predicate(run)`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=0.1)
            except queue.Empty:
                continue
            self.seen.append(event)
            if predicate(event):
                return event
        raise AssertionError(f"no such event within {timeout}s; saw {self.seen[-5:]}")

    def close(self) -> None:
        if self._conn.sock is not None:
            with contextlib.suppress(OSError):
                self._conn.sock.shutdown(socket.SHUT_RDWR)
        self._conn.close()
        self._thread.join(10)
        assert not self._thread.is_alive()


@contextmanager
def serving(db_url: str, **options: Any) -> Iterator[tuple[LiveServer, Any]]:
    settings = Settings(database_url=db_url, api_token=None, **options)
    app = create_app(settings, registry=[ALPHA, BETA])
    GO.clear()
    with LiveServer(app) as server:
        try:
            yield server, app
        finally:
            GO.set()


def post(server: LiveServer, pipeline: str, **params: Any) -> dict[str, Any]:
    response = httpx2.post(
        f"{server.url}/runs", json={"pipeline": pipeline, "params": params}, timeout=10
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def test_a_list_view_sees_every_run_created_and_every_change(db_url):
    with serving(db_url) as (server, _):
        listener = Listener(server.url)
        try:
            run = post(server, "alpha", hold=True)
            created = listener.until(lambda r: r["id"] == run["id"])
            assert created["pipeline"] == "alpha"
            assert created["status"] in ("queued", "running")
            if created["status"] == "queued":
                listener.until(lambda r: r["id"] == run["id"] and r["status"] == "running")
            GO.set()
            done = listener.until(lambda r: r["id"] == run["id"] and r["status"] == "completed")
            assert done["percent"] == 100.0
            assert done == httpx2.get(f"{server.url}/runs/{run['id']}").json()
            # Each state is sent once: no two identical events in a row for the run.
            mine = [json.dumps(e, sort_keys=True) for e in listener.seen if e["id"] == run["id"]]
            assert all(a != b for a, b in itertools.pairwise(mine))
        finally:
            listener.close()


def test_a_run_resumed_and_ended_between_two_looks_is_sent(db_url):
    """A resume is seen even when the run is done before the watcher looks again."""
    with serving(db_url) as (server, _):
        FAIL.set()
        listener = Listener(server.url)
        try:
            run = post(server, "beta", fail=True)
            listener.until(lambda r: r["id"] == run["id"] and r["status"] == "failed")
            FAIL.clear()
            resumed = httpx2.post(f"{server.url}/runs/{run['id']}/resume", timeout=10)
            assert resumed.status_code == 202
            listener.until(lambda r: r["id"] == run["id"] and r["status"] == "completed")
        finally:
            FAIL.clear()
            listener.close()


def test_a_new_subscriber_first_gets_the_runs_that_can_change(db_url):
    with serving(db_url) as (server, _):
        held = post(server, "alpha", hold=True)
        wait_for(
            lambda: httpx2.get(f"{server.url}/runs/{held['id']}").json()["status"] == "running"
        )
        listener = Listener(server.url)
        try:
            first = listener.until(lambda r: True, timeout=5)
            assert first["id"] == held["id"]
            assert first["status"] == "running"
        finally:
            listener.close()


def test_the_pipeline_filter_and_a_bad_filter(db_url):
    with serving(db_url) as (server, _):
        beta_only = Listener(server.url, "?pipeline=beta")
        everything = Listener(server.url)
        try:
            a = post(server, "alpha")
            b = post(server, "beta")
            # Two runs, in either order: each event is taken once, so wait for both at once.
            done = {a["id"], b["id"]}
            everything.until(
                lambda _: done <= {e["id"] for e in everything.seen if e["status"] == "completed"}
            )
            beta_only.until(lambda r: r["id"] == b["id"] and r["status"] == "completed")
            assert {e["pipeline"] for e in beta_only.seen} == {"beta"}
        finally:
            beta_only.close()
            everything.close()
        bad = httpx2.get(f"{server.url}/events?pipeline=Not A Slug", timeout=10)
        assert bad.status_code == 422


def test_one_watcher_reads_for_every_subscriber(db_url):
    """Thirty subscribers cost the database what one does: one look per interval."""
    with serving(db_url, max_event_streams=100, max_streams_per_client=100) as (server, app):
        statements: list[int] = []
        engine = app.state.service.engine

        def count(*args: Any) -> None:
            # The service's housekeeper (schedules, the queue, a sweep, a prune
            # soon after start) shares the engine; its statements are not looks.
            if threading.current_thread().name != "pipeline-housekeeper":
                statements.append(1)

        sa.event.listen(engine, "before_cursor_execute", count)
        listeners = [Listener(server.url) for _ in range(30)]
        try:
            run = post(server, "alpha")
            for listener in listeners:
                listener.until(lambda r: r["id"] == run["id"] and r["status"] == "completed")
            watcher = app.state.watcher
            assert watcher.subscribers == 30
            looks_before, statements_before = watcher.looks, len(statements)
            wait_for(lambda: watcher.looks >= looks_before + 4, timeout=10)
            looks = watcher.looks - looks_before
            per_look = (len(statements) - statements_before) / looks
            # One look is a few statements (the runs, their phases, warnings, results,
            # artifacts), whatever the number of subscribers.
            assert per_look <= 8, per_look
        finally:
            for listener in listeners:
                listener.close()
        wait_for(lambda: app.state.watcher.subscribers == 0, timeout=10)


def test_events_share_the_stream_caps(db_url):
    with serving(db_url, max_event_streams=2) as (server, app):
        first, second = Listener(server.url), Listener(server.url)
        try:
            refused = httpx2.get(f"{server.url}/events", timeout=10)
            assert refused.status_code == 503
            assert int(refused.headers["retry-after"]) > 0
        finally:
            first.close()
            second.close()
        wait_for(lambda: app.state.stream_slots.open == 0, timeout=10)


def test_events_need_the_token(db_url):
    token = "s3cret-token"  # noqa: S105 - a test's own token
    settings = Settings(database_url=db_url, api_token=token)
    with LiveServer(create_app(settings, registry=[ALPHA])) as server:
        assert httpx2.get(f"{server.url}/events", timeout=10).status_code == 401
        headers = {"Authorization": f"Bearer {token}"}
        with (
            httpx2.Client(base_url=server.url, timeout=10) as client,
            client.stream("GET", "/events", headers=headers) as response,
        ):
            assert response.status_code == 200


def test_a_change_made_elsewhere_reaches_the_stream_at_once_on_postgresql(db_url):
    """Another process's change is told by NOTIFY: no waiting for the watcher's poll.

    The server executes nothing and its watcher polls once a minute; a run
    cancelled through another engine (a worker, the CLI) is still sent within
    seconds, and the watcher looked a few times, not once per statement.
    """
    from pipeline import db, runs

    if sa.make_url(db_url).get_backend_name() == "sqlite":
        import pytest

        pytest.skip("LISTEN/NOTIFY is PostgreSQL's (one SQLite file has one server)")
    with serving(db_url, executor="worker") as (server, app):
        watcher = app.state.watcher
        watcher._interval = 60.0
        wait_for(lambda: app.state.service.listener.listening.is_set())
        listener = Listener(server.url)
        engine = db.create_engine(db_url)
        try:
            run = post(server, "alpha")
            listener.until(lambda r: r["id"] == run["id"] and r["status"] == "queued")
            looks = watcher.looks
            with db.write(engine) as conn:
                assert runs.request_cancel(conn, run_id=run["id"]) is runs.Outcome.DONE
            listener.until(lambda r: r["id"] == run["id"] and r["status"] == "cancelled", 10)
            assert 1 <= watcher.looks - looks <= 5
        finally:
            listener.close()
            engine.dispose()


def test_a_change_requested_here_reaches_the_stream_without_waiting_for_the_poll(db_url):
    """A run created, cancelled or resumed through this server wakes its watcher at once.

    The watcher polls once a minute and, on PostgreSQL, the NOTIFY listener
    is stopped: only the server's own word can wake it, on both backends.
    """
    with serving(db_url, executor="worker") as (server, app):
        watcher = app.state.watcher
        watcher._interval = 60.0
        listener_thread = app.state.service.listener
        if listener_thread is not None:
            wait_for(lambda: listener_thread.listening.is_set())
            listener_thread.stop()
        listener = Listener(server.url)
        try:
            started = time.monotonic()
            run = post(server, "alpha")
            listener.until(lambda r: r["id"] == run["id"] and r["status"] == "queued", 10)
            response = httpx2.post(f"{server.url}/runs/{run['id']}/cancel", timeout=10)
            assert response.status_code == 202, response.text
            listener.until(lambda r: r["id"] == run["id"] and r["status"] == "cancelled", 10)
            assert time.monotonic() - started < 30  # far from one poll, let alone two
        finally:
            listener.close()


def test_a_boundary_crossed_by_a_worker_elsewhere_reaches_the_stream_at_once(db_url):
    """PostgreSQL: the runner's process tells of its boundaries (the trigger no longer does).

    The server executes nothing and its watcher polls once a minute. A run
    executed by another executor crosses from phase 1 to phase 2, a change
    of progress with no change of status: the stream still shows it within
    seconds, through that executor's Notifier.
    """
    from pipeline.orchestrator import Executor

    if sa.make_url(db_url).get_backend_name() == "sqlite":
        import pytest

        pytest.skip("LISTEN/NOTIFY is PostgreSQL's (one SQLite file has one server)")
    first, second = threading.Event(), threading.Event()
    elsewhere = Pipeline(
        "alpha",
        [
            (1, "First", lambda conn, ctx: first.wait(20)),
            (2, "Second", lambda c, x: second.wait(20)),
        ],
    )
    with serving(db_url, executor="worker") as (server, app):
        app.state.watcher._interval = 60.0
        wait_for(lambda: app.state.service.listener.listening.is_set())
        listener = Listener(server.url)
        executor = Executor(db_url, [elsewhere], heartbeat_seconds=3600)
        try:
            run = post(server, "alpha")
            executor.wake()
            listener.until(lambda r: r["id"] == run["id"] and r["current_phase"] == 1, 10)
            first.set()
            moved = listener.until(lambda r: r["id"] == run["id"] and r["current_phase"] == 2, 10)
            assert moved["status"] == "running"
            assert moved["phases"][0]["status"] == "completed"
        finally:
            first.set()
            second.set()
            executor.shutdown()
            listener.close()


def test_the_trigger_notifies_of_a_runs_state_not_of_its_progress(db_url):
    """PostgreSQL: a NOTIFY serialises commits, so progress updates must not send one."""
    import psycopg

    from pipeline import db, notify, runs
    from pipeline.schema import analysis_runs

    if sa.make_url(db_url).get_backend_name() == "sqlite":
        import pytest

        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    engine = db.create_engine(db_url)
    with psycopg.connect(notify.conninfo(db_url), autocommit=True) as listening:
        listening.execute(f"LISTEN {notify.CHANGED}")

        def heard() -> int:
            listening.execute("SELECT 1")  # reads what arrived meanwhile
            return len(list(listening.notifies(timeout=0.2)))

        try:
            with db.write(engine) as conn:
                run_id = runs.create_run(conn, params={}).id
            assert heard() == 1
            table = analysis_runs
            with db.write(engine) as conn:
                conn.execute(
                    sa.update(table)
                    .where(table.c.id == run_id)
                    .values(
                        progress_current=1, phase_progress_current=5, heartbeat_at=sa.func.now()
                    )
                )
            assert heard() == 0
            for change in (
                {"status": "running", "owner": "x"},
                {"cancel_requested_at": sa.func.now()},
            ):
                with db.write(engine) as conn:
                    conn.execute(sa.update(table).where(table.c.id == run_id).values(**change))
                assert heard() == 1
        finally:
            engine.dispose()


def test_a_notifier_folds_many_changes_into_a_few_notifications(db_url):
    """A burst of boundaries is one NOTIFY or two, not one each; stop() sends what is pending."""
    import psycopg

    from pipeline import notify

    if sa.make_url(db_url).get_backend_name() == "sqlite":
        import pytest

        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    notifier = notify.Notifier(db_url, spacing=0.5)
    with psycopg.connect(notify.conninfo(db_url), autocommit=True) as listening:
        listening.execute(f"LISTEN {notify.CHANGED}")
        for _ in range(200):
            notifier.changed()
        notifier.stop()
        listening.execute("SELECT 1")
        heard = len(list(listening.notifies(timeout=0.5)))
    assert 1 <= notifier.sent <= 2
    assert heard == notifier.sent


def test_a_notifier_that_cannot_connect_warns_once_and_stops(caplog):
    """Nothing raises into the runner; the polls are the fallback."""
    from pipeline import notify

    notifier = notify.Notifier("postgresql+psycopg://postgres@127.0.0.1:9/none", spacing=0.01)
    with caplog.at_level("WARNING", logger="pipeline.notify"):
        for _ in range(3):
            notifier.changed()
            wait_for(lambda: not notifier._changed)
        notifier.stop()
    assert notifier.sent == 0
    assert notifier._thread is not None
    assert not notifier._thread.is_alive()
    warnings = [r for r in caplog.records if "progress failed" in r.getMessage()]
    assert len(warnings) == 1


def test_a_look_in_flight_at_shutdown_ends_before_the_engine_closes(db_url):
    """The watcher stops before the service closes its engine, after the look in flight.

    A connection checked out when ``Engine.dispose`` runs is not closed with
    the pool: it goes back to an orphaned pool, and the garbage collector
    closes it some time later (psycopg warns, as a failed CI run once showed).
    """
    at_dispose: list[int] = []
    looked = threading.Event()
    with serving(db_url) as (server, app):
        service, watcher = app.state.service, app.state.watcher
        real_look, real_dispose = watcher._look, service.engine.dispose

        def slow_look(*args: Any) -> Any:
            with service.engine.connect():  # held through the look, as the real one holds one
                looked.set()
                # Still looking when the shutdown starts, and a while after.
                wait_for(lambda: server.server.should_exit, timeout=20)
                time.sleep(0.5)
            return real_look(*args)

        def dispose(close: bool = True) -> None:
            at_dispose.append(service.engine.pool.checkedout())
            real_dispose(close)

        service.engine.dispose = dispose
        listener = Listener(server.url)
        watcher._look = slow_look
        try:
            watcher.wake()
            assert looked.wait(10)
        finally:
            listener.close()
    assert at_dispose == [0]
    assert watcher._task is None or watcher._task.done()


class _Hanging:
    """A watcher's look that hangs (a database that does not answer) until released."""

    def __init__(self, real_look: Any) -> None:
        self.looked = threading.Event()
        self.release = threading.Event()
        self._real_look = real_look

    def look(self, *args: Any) -> Any:
        self.looked.set()
        self.release.wait(30)
        return self._real_look(*args)


def _hanging_look(sqlite_url: str) -> tuple[Any, Any, _Hanging]:
    """An app's service and watcher, and a hanging look for the watcher to be given."""
    settings = Settings(database_url=sqlite_url, api_token=None)
    app = create_app(settings, registry=[ALPHA, BETA])
    watcher = app.state.watcher
    return app.state.service, watcher, _Hanging(watcher._look)


def test_a_look_that_hangs_holds_the_shutdown_for_a_bounded_time(sqlite_url, caplog):
    """A database that does not answer must not keep the server from stopping."""
    service, watcher, hanging = _hanging_look(sqlite_url)
    hanging_look, looked, release = hanging.look, hanging.looked, hanging.release

    async def scenario() -> float:
        service.start()
        try:
            await watcher.subscribe(None)
            watcher._look = hanging_look
            watcher.wake()
            await asyncio.get_running_loop().run_in_executor(None, looked.wait, 10)
            started = time.monotonic()
            await watcher.stop(timeout=0.3)
            return time.monotonic() - started
        finally:
            release.set()
            await asyncio.sleep(0.05)
            service.stop()

    with caplog.at_level("WARNING", logger="pipeline.watch"):
        waited = asyncio.run(scenario())
    assert 0.25 <= waited < 5
    assert any("did not end in 0.3 s" in r.getMessage() for r in caplog.records)


def test_a_first_look_that_hangs_does_not_hold_the_shutdown(sqlite_url):
    """A subscription whose first look hangs: stop returns, and its loop ends at once."""
    service, watcher, hanging = _hanging_look(sqlite_url)
    hanging_look, looked, release = hanging.look, hanging.looked, hanging.release

    async def scenario() -> float:
        service.start()
        watcher._look = hanging_look
        subscribing = asyncio.get_running_loop().create_task(watcher.subscribe(None))
        try:
            await asyncio.get_running_loop().run_in_executor(None, looked.wait, 10)
            started = time.monotonic()
            await watcher.stop(timeout=0.3)
            waited = time.monotonic() - started
            release.set()
            await subscribing  # the first look ends; the loop it starts ends at once
            deadline = time.monotonic() + 5
            while not (watcher._task is None or watcher._task.done()):
                assert time.monotonic() < deadline, "the loop started after the stop still runs"
                await asyncio.sleep(0.01)
            return waited
        finally:
            release.set()
            service.stop()

    assert asyncio.run(scenario()) < 5
