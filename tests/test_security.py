"""Browser defences and caps (DESIGN.md, "HTTP contract"; issue 15, points 1, 5 and 7).

A service on 127.0.0.1 without a token is reachable by every web page its
user visits. These tests play that page: through FastAPI's TestClient (whose
``Host`` is ``testserver``), through a real uvicorn (``LiveServer``), and in
a real headless Chromium where Debian's is installed (skipped elsewhere,
except in CI). The apps run in ``worker`` executor mode, so their runs stay
``queued``: what a refused request would have changed stays visible.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.engine import Connection, Engine
from starlette.responses import HTMLResponse

from pipeline import db
from pipeline.api import create_app, create_router
from pipeline.config import Settings
from pipeline.orchestrator import RunContext
from pipeline.service import Service

from .conftest import read_run, scalar, wait_for
from .live_server import LiveServer

CHROMIUM = Path("/usr/bin/chromium")
EVIL = "http://evil.example"
SELF = "http://testserver"  # TestClient's own origin


def noop(conn: Connection, ctx: RunContext) -> None:
    """The one phase of these apps (which never execute it: they only queue)."""


REGISTRY = [(1, "Only", noop)]


def settings(database_url: str, **overrides: Any) -> Settings:
    """Explicit settings, so that no PIPELINE_* variable of the environment changes the test."""
    base: dict[str, Any] = {"api_token": None, "executor": "worker", "auto_resume": False}
    return Settings(database_url=database_url, **(base | overrides))


@contextmanager
def served(database_url: str, **overrides: Any) -> Iterator[TestClient]:
    """The whole app through TestClient, lifespan included."""
    app = create_app(settings(database_url, **overrides), registry=REGISTRY)
    with TestClient(app) as client:
        yield client


def run_count(engine: Engine) -> int:
    return int(scalar(engine, "SELECT count(*) FROM analysis_runs"))


def detail(response: Any, status: int) -> str:
    """Assert a refusal: the status, a JSON body that is exactly ``{"detail": str}``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"detail"}, body
    assert isinstance(body["detail"], str), body
    return str(body["detail"])


CROSS_SITE = [
    pytest.param({"Origin": EVIL}, id="origin-evil"),
    pytest.param({"Origin": "http://127.0.0.1:9999"}, id="origin-other-port"),
    pytest.param({"Origin": "https://testserver"}, id="origin-other-scheme"),
    pytest.param({"Origin": "null"}, id="origin-null"),
    pytest.param({"Sec-Fetch-Site": "cross-site"}, id="fetch-site-cross-site"),
    pytest.param({"Sec-Fetch-Site": "same-site"}, id="fetch-site-same-site"),
    pytest.param({"Origin": SELF, "Sec-Fetch-Site": "cross-site"}, id="own-origin-but-cross-site"),
]


# -- cross-site requests ------------------------------------------------------------------


@pytest.mark.parametrize("headers", CROSS_SITE)
def test_a_cross_site_create_is_403_and_creates_nothing(
    db_url: str, engine: Engine, headers: dict[str, str]
) -> None:
    """A POST /runs whose Origin or Sec-Fetch-Site names another site is 403 and writes nothing."""
    with served(db_url) as client:
        response = client.post("/runs", json={"params": {"x": 1}}, headers=headers)
        assert "refused" in detail(response, 403)
        assert run_count(engine) == 0


@pytest.mark.parametrize("headers", CROSS_SITE)
def test_a_cross_site_cancel_or_resume_is_403_and_changes_nothing(
    db_url: str, engine: Engine, headers: dict[str, str]
) -> None:
    """Cancel and resume from another site are 403: the queued run is not cancelled or touched."""
    with served(db_url) as client:
        run_id = client.post("/runs", json={}).json()["id"]
        for action in ("cancel", "resume"):
            detail(client.post(f"/runs/{run_id}/{action}", headers=headers), 403)
        run = read_run(engine, run_id)
        assert (run.status.value, run.cancel_requested_at) == ("queued", None)


@pytest.mark.parametrize("headers", CROSS_SITE)
def test_cross_site_reads_are_403_too(db_url: str, headers: dict[str, str]) -> None:
    """Every API route refuses another site, GETs and the event stream included."""
    with served(db_url) as client:
        run_id = client.post("/runs", json={}).json()["id"]
        for path in ("/runs", f"/runs/{run_id}", f"/runs/{run_id}/events", "/metrics"):
            body = detail(client.get(path, headers=headers), 403)
            assert "queued" not in body, path


def test_same_origin_and_non_browser_requests_work(db_url: str, engine: Engine) -> None:
    """The server's own Origin, Sec-Fetch-Site same-origin or none, or neither header: served."""
    own = {"Origin": SELF, "Sec-Fetch-Site": "same-origin"}
    with served(db_url) as client:
        created = client.post("/runs", json={}, headers=own)
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        assert (
            client.post("/runs", json={}, headers={"Origin": "http://TESTSERVER:80"}).status_code
            == 201
        )
        assert client.get("/runs", headers={"Sec-Fetch-Site": "none"}).status_code == 200
        assert client.get(f"/runs/{run_id}", headers=own).status_code == 200
        assert client.post(f"/runs/{run_id}/cancel", headers=own).status_code == 202
        assert client.post(f"/runs/{run_id}/resume", headers=own).status_code == 202
        assert run_count(engine) == 2


def test_the_dashboard_stays_reachable_by_navigation(db_url: str) -> None:
    """A link from another site still opens the dashboard and its static files (no data there)."""
    navigation = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    with served(db_url) as client:
        assert client.get("/", headers=navigation).status_code == 200
        assert (
            client.get("/static/app.js", headers={"Sec-Fetch-Site": "cross-site"}).status_code
            == 200
        )


# -- request bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        pytest.param(b'{"params": {}}', "text/plain", id="text-plain"),
        pytest.param(b'{"params": {}}', "text/plain;charset=UTF-8", id="text-plain-charset"),
        pytest.param(b"params=1", "application/x-www-form-urlencoded", id="form"),
        pytest.param(b"--b\r\n\r\n--b--\r\n", "multipart/form-data; boundary=b", id="multipart"),
        pytest.param(b'{"params": {}}', None, id="no-content-type"),
        pytest.param(b'{"params": {}}', "application/json; charset=latin-1", id="json-latin-1"),
        pytest.param(b"", "text/plain", id="empty-text-plain"),
    ],
)
def test_a_body_that_is_not_json_is_415_and_creates_nothing(
    db_url: str, engine: Engine, content: bytes, content_type: str | None
) -> None:
    """POST /runs with a Content-Type other than application/json (or none, with a body) is 415."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    with served(db_url) as client:
        detail(client.post("/runs", content=content, headers=headers), 415)
        assert run_count(engine) == 0


def test_cancel_and_resume_refuse_a_non_json_body(db_url: str, engine: Engine) -> None:
    """A text/plain cancel (what a page's simple request sends) is 415 and the run stays queued."""
    with served(db_url) as client:
        run_id = client.post("/runs", json={}).json()["id"]
        for action in ("cancel", "resume"):
            response = client.post(
                f"/runs/{run_id}/{action}", content=b"x", headers={"Content-Type": "text/plain"}
            )
            detail(response, 415)
        assert read_run(engine, run_id).status.value == "queued"


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        pytest.param(b"", {}, id="empty-no-type"),
        pytest.param(b"{}", {"Content-Type": "application/json"}, id="json"),
        pytest.param(b"{}", {"Content-Type": "application/json; charset=utf-8"}, id="json-utf-8"),
        pytest.param(b"{}", {"Content-Type": "Application/JSON;Charset=UTF-8"}, id="json-cased"),
    ],
)
def test_json_bodies_and_an_empty_body_are_accepted(
    db_url: str, content: bytes, headers: dict[str, str]
) -> None:
    """application/json (with or without a UTF-8 charset), or an empty untyped body: a run."""
    with served(db_url) as client:
        response = client.post("/runs", content=content, headers=headers)
        assert response.status_code == 201, response.text


# -- allowed hosts (DNS rebinding) --------------------------------------------------------------


def test_a_foreign_host_is_refused_with_no_data(db_url: str) -> None:
    """``Host: rebind.attacker.example`` gets a 400 JSON detail and none of the runs, anywhere."""
    with served(db_url) as client:
        client.post("/runs", json={"params": {"secret": "s3cret"}})
        for path in ("/runs", "/runs/1", "/", "/static/app.js", "/healthz", "/openapi.json"):
            response = client.get(path, headers={"Host": "rebind.attacker.example"})
            assert "PIPELINE_ALLOWED_HOSTS" in detail(response, 400), path
            assert "s3cret" not in response.text
            assert response.headers["x-content-type-options"] == "nosniff"


def test_loopback_names_and_the_bound_host_are_allowed(sqlite_url: str) -> None:
    """The defaults answer 127.0.0.1, localhost and [::1] (any port) and the host given as bound."""
    app = create_app(settings(sqlite_url), registry=REGISTRY, bound_host="box.lan")
    with TestClient(app) as client:
        for host in ("127.0.0.1:8000", "localhost", "LOCALHOST:1", "[::1]:8000", "box.lan:8000"):
            assert client.get("/runs", headers={"Host": host}).status_code == 200, host
        assert client.get("/runs", headers={"Host": "other.lan"}).status_code == 400


def test_allowed_hosts_replace_the_defaults(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PIPELINE_ALLOWED_HOSTS (comma-separated, ``*.`` patterns) is exactly what is answered."""
    monkeypatch.setenv("PIPELINE_ALLOWED_HOSTS", "pipeline.example.com, *.corp.example")
    with served(sqlite_url) as client:
        assert client.get("/runs", headers={"Host": "pipeline.example.com"}).status_code == 200
        assert client.get("/runs", headers={"Host": "a.corp.example:443"}).status_code == 200
        assert client.get("/runs", headers={"Host": "corp.example.evil"}).status_code == 400
        assert client.get("/runs", headers={"Host": "localhost"}).status_code == 400


def test_a_real_server_refuses_a_rebound_host(sqlite_url: str) -> None:
    """Through uvicorn: the server's own address and localhost answer, a rebound name does not."""
    app = create_app(settings(sqlite_url), registry=REGISTRY)
    with LiveServer(app) as server, httpx2.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/runs").status_code == 200
        assert client.get("/runs", headers={"Host": f"localhost:{server.port}"}).status_code == 200
        rebound = client.get("/runs", headers={"Host": f"rebind.attacker.example:{server.port}"})
        detail(rebound, 400)
        assert "items" not in rebound.text


# -- response headers --------------------------------------------------------------------------


def test_security_headers(db_url: str) -> None:
    """nosniff everywhere, no-store on API JSON, and a dashboard no other site can frame."""
    with served(db_url) as client:
        run_id = client.post("/runs", json={}).json()["id"]
        answers = {
            "list": client.get("/runs"),
            "one": client.get(f"/runs/{run_id}"),
            "missing": client.get("/runs/4242"),
            "invalid": client.get("/runs?limit=0"),
            "refused": client.get("/runs", headers={"Origin": EVIL}),
            "conflict": client.post(f"/runs/{run_id}/resume"),
        }
        for name, response in answers.items():
            assert response.headers["x-content-type-options"] == "nosniff", name
            assert response.headers["cache-control"] == "no-store", name
        dashboard = client.get("/")
        assert dashboard.headers["x-content-type-options"] == "nosniff"
        assert dashboard.headers["x-frame-options"] == "DENY"
        policy = dashboard.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy
        assert "default-src 'self'" in policy
        for path in ("/static/app.js", "/static/style.css", "/healthz", "/metrics"):
            assert client.get(path).headers["x-content-type-options"] == "nosniff", path
        docs = client.get("/docs")
        assert "frame-ancestors 'none'" in docs.headers["content-security-policy"]


def test_a_host_application_keeps_the_routers_defences(db_url: str, engine: Engine) -> None:
    """Included in someone else's app, the router still refuses other sites and non-JSON bodies."""
    service = Service(settings(db_url), REGISTRY)
    host = FastAPI(title="someone else's app")

    @host.get("/hello")
    def hello() -> dict[str, str]:
        return {"hello": "world"}

    host.include_router(create_router(service), prefix="/pipeline")
    try:
        with TestClient(host) as client:
            detail(client.post("/pipeline/runs", json={}, headers={"Origin": EVIL}), 403)
            plain = {"Content-Type": "text/plain"}
            detail(client.post("/pipeline/runs", content=b"{}", headers=plain), 415)
            assert run_count(engine) == 0
            listed = client.get("/pipeline/runs")
            assert listed.headers["x-content-type-options"] == "nosniff"
            assert listed.headers["cache-control"] == "no-store"
            # The host's own routes are the host's business.
            assert client.get("/hello", headers={"Origin": EVIL}).status_code == 200
    finally:
        service.engine.dispose()


# -- caps ----------------------------------------------------------------------------------------


def test_queued_runs_are_capped_with_429(db_url: str, engine: Engine) -> None:
    """Beyond PIPELINE_MAX_QUEUED_RUNS, POST /runs is 429 with Retry-After and writes nothing."""
    with served(db_url, max_queued_runs=3) as client:
        ids = [client.post("/runs", json={}).json()["id"] for _ in range(3)]
        refused = client.post("/runs", json={"params": {"n": 4}})
        assert "queued" in detail(refused, 429)
        assert int(refused.headers["retry-after"]) > 0
        assert run_count(engine) == 3
        # A run that leaves the queue frees its place.
        assert client.post(f"/runs/{ids[0]}/cancel").status_code == 202
        assert client.post("/runs", json={}).status_code == 201
        assert run_count(engine) == 4


def test_the_queue_cap_counts_queued_runs_whatever_their_ids(engine: Engine) -> None:
    """``queue_full`` answers from the span of queued ids when it can; gaps never fool it."""
    from pipeline import runs

    def queue(n: int) -> list[int]:
        with db.write(engine) as conn:
            return [runs.create_run(conn, params={}).id for _ in range(n)]

    def full(cap: int) -> bool:
        with db.read(engine) as conn:
            return runs.queue_full(conn, cap=cap)

    assert not full(1)  # nothing queued
    first = queue(3)
    assert full(3)  # span 3: exact at the cap
    assert not full(4)
    # Finished runs between queued ones: queued ids 1, 5, 6 span 6, the queue is 3.
    middle = queue(2)
    queue(1)
    with db.write(engine) as conn:
        conn.exec_driver_sql(
            "UPDATE analysis_runs SET status = 'completed' WHERE id IN "
            f"({first[1]}, {first[2]}, {middle[0]})"
        )
    assert [full(cap) for cap in (1, 2, 3, 4, 5)] == [True, True, True, False, False]
    # A creation asks the same question inside its INSERT: refused exactly when full.
    for cap in (1, 2, 3, 4, 5):
        with engine.connect() as conn, conn.begin() as tx:
            created = runs.create_run_below_cap(conn, cap=cap, params={})
            tx.rollback()
        assert (created is None) == full(cap), cap
    assert run_count(engine) == 6  # each was rolled back; a refused one wrote nothing anyway
    with db.write(engine) as conn:
        conn.exec_driver_sql("UPDATE analysis_runs SET status = 'completed'")
    with db.write(engine) as conn:  # an empty queue is below any cap
        assert runs.create_run_below_cap(conn, cap=1, params={}) is not None


def _open_stream(stack: ExitStack, url: str, source: str, path: str) -> httpx2.Response:
    """One event stream from ``source`` (a loopback address of its own), kept open by ``stack``."""
    client = stack.enter_context(
        httpx2.Client(
            base_url=url, timeout=10, transport=httpx2.HTTPTransport(local_address=source)
        )
    )
    return stack.enter_context(client.stream("GET", path))


def _first_event(response: httpx2.Response, keep: list[Iterator[str]]) -> str:
    """The first ``data:`` line; the line iterator is kept (closing it closes the connection)."""
    lines = response.iter_lines()
    keep.append(lines)
    for line in lines:
        if line.startswith("data:"):
            return line
    raise AssertionError("the stream ended before its first event")


def test_event_streams_are_capped_overall_and_per_client(sqlite_url: str) -> None:
    """Streams past the per-client or overall cap are 503 with Retry-After; closing one frees it."""
    app = create_app(
        settings(sqlite_url, max_event_streams=3, max_streams_per_client=2), registry=REGISTRY
    )
    with LiveServer(app) as server, ExitStack() as stack:
        with httpx2.Client(base_url=server.url, timeout=10) as client:
            run_id = client.post("/runs", json={}).json()["id"]
        path = f"/runs/{run_id}/events"

        def stream(source: str) -> httpx2.Response:
            return _open_stream(stack, server.url, source, path)

        def refused(response: httpx2.Response, why: str) -> None:
            response.read()
            assert why in detail(response, 503)
            assert int(response.headers["retry-after"]) > 0

        keep: list[Iterator[str]] = []
        first = ExitStack()
        a1 = _open_stream(first, server.url, "127.0.0.1", path)
        assert a1.status_code == 200
        _first_event(a1, keep)
        a2 = stream("127.0.0.1")
        assert a2.status_code == 200
        refused(stream("127.0.0.1"), "from this client")
        b1 = stream("127.0.0.2")
        assert b1.status_code == 200
        _first_event(b1, keep)
        refused(stream("127.0.0.3"), "at most 3")
        assert app.state.stream_slots.open == 3

        first.close()  # the client goes away: its slot comes back
        wait_for(lambda: app.state.stream_slots.open == 2, timeout=10)

        def admitted() -> bool:
            with ExitStack() as attempt:
                return _open_stream(attempt, server.url, "127.0.0.3", path).status_code == 200

        assert wait_for(admitted, timeout=10)
        wait_for(lambda: app.state.stream_slots.open == 2, timeout=10)


def test_a_stream_that_ends_frees_its_slot(db_url: str) -> None:
    """The stream of a finished run ends by itself and gives its slot back (TestClient)."""
    with served(db_url, max_event_streams=1) as client:
        run_id = client.post("/runs", json={}).json()["id"]
        assert client.post(f"/runs/{run_id}/cancel").status_code == 202
        for _ in range(3):  # one slot, used again and again
            events = client.get(f"/runs/{run_id}/events")
            assert events.status_code == 200, events.text
            assert '"status":"cancelled"' in events.text
        assert client.app.state.stream_slots.open == 0  # type: ignore[attr-defined]


# -- the API docs ------------------------------------------------------------------------------


def test_the_docs_load_nothing_from_another_host(db_url: str) -> None:
    """/docs and /redoc name no URL of another host, and every asset they name answers 200."""
    with served(db_url) as client:
        for page in ("/docs", "/redoc"):
            html = client.get(page)
            assert html.status_code == 200, page
            assert "default-src 'self'" in html.headers["content-security-policy"], page
            foreign = [
                url
                for url in re.findall(r"""(?:https?:)?//[^\s"'<>)]+""", html.text)
                if not url.removeprefix("http:").startswith("//testserver")
            ]
            assert foreign == [], (page, foreign)
            assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html.text)
            assert assets, page
            for asset in assets:
                assert asset.startswith("/"), (page, asset)
                assert client.get(asset).status_code == 200, (page, asset)
        assert client.get("/openapi.json").status_code == 200


# -- in a real browser ------------------------------------------------------------------------

browser_only = pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"),
    reason="needs Debian's chromium (apt-get install chromium)",
)

ATTACK_PAGE = """<!doctype html>
<html><body>
<form id="form" method="post" action="{api}/runs" enctype="text/plain">
  <input name='{{"params": {{"from": "form"}}, "x": "' value='"}}'>
</form>
<script>
async function attack() {{
  const simple = {{ method: "POST", mode: "no-cors", body: '{{"params": {{"from": "fetch"}}}}' }};
  const untyped = {{ method: "POST", mode: "no-cors", body: new Blob(['{{}}']) }};
  for (const [path, opts] of [["/runs", simple], ["/runs", untyped],
                              ["/runs/{run_id}/cancel", {{ method: "POST", mode: "no-cors" }}]]) {{
    try {{ await fetch("{api}" + path, opts); }} catch (e) {{}}
  }}
  document.title = "fetched";
  document.getElementById("form").submit();
}}
attack();
</script>
</body></html>
"""


@browser_only
def test_a_page_on_another_origin_cannot_drive_the_api(sqlite_url: str) -> None:
    """In Chromium, a page on another port of 127.0.0.1 POSTs (no-cors fetch, a form): no effect."""
    from playwright.sync_api import sync_playwright

    api_app = create_app(settings(sqlite_url), registry=REGISTRY)
    with LiveServer(api_app) as api:
        with httpx2.Client(base_url=api.url, timeout=10) as client:
            run_id = client.post("/runs", json={}).json()["id"]
        attacker = FastAPI()
        page_html = ATTACK_PAGE.format(api=api.url, run_id=run_id)

        @attacker.get("/")
        def attack_page() -> HTMLResponse:
            return HTMLResponse(page_html)

        with LiveServer(attacker) as evil, sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
            )
            try:
                page = browser.new_page()
                statuses: list[tuple[str, int]] = []
                page.on("response", lambda r: statuses.append((r.url, r.status)))
                with page.expect_navigation(url=f"{api.url}/runs", timeout=15_000):
                    page.goto(evil.url)
            finally:
                browser.close()
        api_statuses = [status for url, status in statuses if url.startswith(api.url)]
        assert len(api_statuses) == 4, statuses  # three fetches and the form
        assert all(status in (403, 415) for status in api_statuses), statuses
        engine = db.create_engine(sqlite_url)
        try:
            assert run_count(engine) == 1
            run = read_run(engine, run_id)
        finally:
            engine.dispose()
        assert (run.status.value, run.cancel_requested_at) == ("queued", None)


@browser_only
def test_the_docs_work_offline_in_a_browser(sqlite_url: str) -> None:
    """Swagger UI and ReDoc render in Chromium while every request to another host is blocked."""
    from playwright.sync_api import Route, expect, sync_playwright

    app = create_app(settings(sqlite_url), registry=REGISTRY)
    with LiveServer(app) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page()
            elsewhere: list[str] = []

            def offline(route: Route) -> None:
                if route.request.url.startswith(server.url):
                    route.continue_()
                else:
                    elsewhere.append(route.request.url)
                    route.abort()

            page.route("**/*", offline)
            page.goto(f"{server.url}/docs")
            expect(page.locator(".opblock-summary-path").first).to_be_visible(timeout=15_000)
            expect(page.get_by_text("/runs/{run_id}/cancel").first).to_be_visible()
            page.goto(f"{server.url}/redoc")
            expect(page.get_by_text("Queue a run").first).to_be_visible(timeout=15_000)
            assert elsewhere == [], elsewhere
        finally:
            browser.close()
