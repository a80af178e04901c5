"""The dashboard in a real headless Chromium, against a real uvicorn in this process.

Chromium is Debian's (``/usr/bin/chromium``); Playwright drives it and never
downloads a browser. Where that binary is missing they are skipped, except in CI
(``CI`` set), where a missing browser must fail rather than hide. They
run on SQLite only: what they prove is the page's, and the API's behaviour on
PostgreSQL is covered by the API tests.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
import pytest
from playwright.sync_api import Browser, Page, Request, Route, expect, sync_playwright
from sqlalchemy.engine import Connection

from pipeline import Pipeline
from pipeline.api import create_app
from pipeline.config import Settings
from pipeline.orchestrator import Phase, RunContext, phase

from .conftest import wait_for
from .live_server import LiveServer

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = secrets.token_urlsafe(16)

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"),
    reason="needs Debian's chromium (apt-get install chromium)",
)
expect.set_options(timeout=15_000)


# -- registries ------------------------------------------------------------------


def stepping(steps: int = 10) -> Callable[[Connection, RunContext], None]:
    """A phase of ``steps`` visible steps; params may shorten them or fail a phase."""

    def run(conn: Connection, ctx: RunContext) -> None:
        pause = float(ctx.params.get("step_seconds", 0.08))
        for i in range(1, steps + 1):
            time.sleep(pause)
            ctx.progress(i, steps)
            if ctx.params.get("fail_in") == ctx.phase_num and i == steps // 2:
                raise RuntimeError("the comments API answered 503 three times in a row")
        if ctx.phase_num == 2:
            ctx.warn("2 comments were deleted before they could be analyzed")

    return run


STEPPING: list[Phase] = [
    (1, "Fetching Reddit", stepping()),
    (2, "Analyzing comments", stepping()),
    (3, "Writing the report", stepping()),
]


def slow_phase(conn: Connection, ctx: RunContext) -> None:
    """Waits for a cancel (gives up after 20 s so a failed test cannot hang)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ctx.raise_if_cancelled()
        ctx.progress(int(20 - (deadline - time.monotonic())), 20)
        time.sleep(0.05)


SLOW: list[Phase] = [(1, "Waiting for a slow source", slow_phase), (2, "Analyzing", stepping())]


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def start_server(sqlite_url: str) -> Iterator[Callable[..., LiveServer]]:
    """Start the whole app (API, runner, dashboard) with a registry of the test's own."""
    servers: list[LiveServer] = []

    def start(registry: list[Phase] | list[Pipeline], api_token: str | None = None) -> LiveServer:
        settings = Settings(database_url=sqlite_url, api_token=api_token, max_concurrent_runs=4)
        server = LiveServer(create_app(settings, registry=registry)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def page(browser: Browser, start_server: Callable[..., LiveServer]) -> Iterator[Page]:
    """A fresh browser context; closed before the server stops, and no script error allowed."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    script_errors: list[str] = []
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    yield page
    context.close()
    assert script_errors == [], f"JavaScript errors on the page: {script_errors}"


def api(server: LiveServer, token: str | None = None) -> httpx2.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx2.Client(base_url=server.url, headers=headers, timeout=10)


def run_status(server: LiveServer, run_id: int, token: str | None = None) -> str:
    with api(server, token) as client:
        status: str = client.get(f"/runs/{run_id}").json()["status"]
        return status


PER_RUN_STREAM = re.compile(r"^/runs/[^/]+/events$")


def _status(request: Request) -> int | None:
    """The status a request was answered with; None if it got no answer (aborted)."""
    response = request.response()
    return None if response is None else response.status


def newest_run_id(page: Page) -> int:
    row = page.locator('[data-testid^="run-row-"]').first
    expect(row).to_be_visible()
    return int(row.get_attribute("data-run-id") or 0)


# -- tests ---------------------------------------------------------------------------


def test_start_a_run_and_watch_it_complete_live(start_server, page):
    """A run started from the form shows moving progress and ends completed, without a reload."""
    server = start_server(STEPPING)
    with api(server) as client:
        failed = client.post("/runs", json={"params": {"step_seconds": 0.01, "fail_in": 2}})
    failed_id = failed.json()["id"]
    wait_for(lambda: run_status(server, failed_id) == "failed")

    page.goto(server.url + "/")
    page.evaluate("window.__marker = 'no reload'")
    expect(page.get_by_test_id(f"run-status-{failed_id}")).to_have_text("failed")
    expect(page.get_by_test_id(f"run-error-{failed_id}")).to_contain_text("answered 503")
    expect(page.get_by_test_id(f"resume-{failed_id}")).to_be_visible()

    page.get_by_test_id("params-input").fill('{"subreddit": "python", "limit": 200}')
    page.get_by_test_id("start-button").click()
    run_id = failed_id + 1
    progress = page.get_by_test_id(f"run-progress-{run_id}")
    expect(progress).to_be_visible()

    # Some moment in the middle: above 0, below 100, with the phase's own sub-progress.
    midway = page.wait_for_function(
        """(id) => {
            const bar = document.querySelector(`[data-testid="run-progress-${id}"]`);
            const sub = document.querySelector(`[data-testid="run-subprogress-${id}"]`);
            const p = Number(bar && bar.dataset.percent);
            return p > 0 && p < 100 && sub && !sub.hidden
                ? {percent: p, now: bar.getAttribute("aria-valuenow")} : null;
        }""",
        arg=run_id,
    ).json_value()
    assert 0 < midway["percent"] < 100
    assert float(midway["now"]) == midway["percent"]
    expect(page.get_by_test_id(f"run-phase-{run_id}")).to_contain_text("phase ")

    expect(page.get_by_test_id(f"run-status-{run_id}")).to_have_text("completed")
    expect(progress).to_have_attribute("data-percent", "100")
    expect(progress).to_have_attribute("aria-valuenow", "100")
    expect(page.get_by_test_id(f"run-subprogress-{run_id}")).to_be_hidden()
    expect(page.get_by_test_id(f"run-warnings-{run_id}")).to_have_text("1 warning")
    assert page.evaluate("window.__marker") == "no reload"

    # The new run's details are open: its phases, warning and params.
    details = page.get_by_test_id("run-details")
    expect(details.get_by_test_id("details-title")).to_have_text(f"Run #{run_id}")
    for num in (1, 2, 3):
        expect(details.get_by_test_id(f"phase-{num}")).to_have_attribute("data-status", "completed")
    expect(details.get_by_test_id("details-warnings")).to_contain_text("phase 2")
    params = json.loads(details.get_by_test_id("details-params").inner_text())
    assert params == {"subreddit": "python", "limit": 200}

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)


def test_cancel_a_slow_run_from_the_page(start_server, page):
    """The Cancel button stops a running run: its status becomes cancelled and Resume appears."""
    server = start_server(SLOW)
    page.goto(server.url + "/")
    page.get_by_test_id("start-button").click()
    run_id = newest_run_id(page)
    expect(page.get_by_test_id(f"run-status-{run_id}")).to_have_text("running")

    page.get_by_test_id(f"cancel-{run_id}").click()
    expect(page.get_by_test_id(f"run-status-{run_id}")).to_have_text("cancelled")
    expect(page.get_by_test_id(f"cancel-{run_id}")).to_be_hidden()
    expect(page.get_by_test_id(f"resume-{run_id}")).to_be_visible()
    assert run_status(server, run_id) == "cancelled"

    # Resume brings it back to life on the page (the stream sends it again); cancel it again.
    page.get_by_test_id(f"resume-{run_id}").click()
    expect(page.get_by_test_id(f"run-status-{run_id}")).to_have_text("running")
    page.get_by_test_id(f"cancel-{run_id}").click()
    expect(page.get_by_test_id(f"run-status-{run_id}")).to_have_text("cancelled")


def test_a_conflict_is_shown_readably(start_server, page):
    """A Resume that the server refuses with 409 (resumed elsewhere meanwhile) shows its detail."""
    server = start_server(SLOW)
    with api(server) as client:
        run_id = client.post("/runs", json={}).json()["id"]
        wait_for(lambda: run_status(server, run_id) == "running")
        client.post(f"/runs/{run_id}/cancel")
        wait_for(lambda: run_status(server, run_id) == "cancelled")
    page.goto(server.url + "/")

    def resumed_elsewhere_first(route: Route) -> None:
        with api(server) as client:
            assert client.post(f"/runs/{run_id}/resume").status_code == 202
        route.continue_()

    page.route(f"**/runs/{run_id}/resume", resumed_elsewhere_first)
    page.get_by_test_id(f"resume-{run_id}").click()
    banner = page.get_by_test_id("error-banner")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text(f"Could not resume run #{run_id}")
    expect(banner).to_contain_text("only failed or cancelled runs can resume")
    # The page catches up with what really happened: the run is active again.
    expect(page.get_by_test_id(f"run-status-{run_id}")).to_have_text("running")
    page.get_by_test_id(f"cancel-{run_id}").click()
    expect(page.get_by_test_id(f"run-status-{run_id}")).to_have_text("cancelled")


def test_invalid_params_are_refused_in_the_browser(start_server, page):
    """Params that are not JSON, or not an object, get a readable error and no request at all."""
    server = start_server(STEPPING)
    posts: list[str] = []
    page.on(
        "request", lambda request: posts.append(request.url) if request.method == "POST" else None
    )
    page.goto(server.url + "/")
    expect(page.get_by_test_id("runs-empty")).to_be_visible()
    error = page.get_by_test_id("params-error")

    page.get_by_test_id("params-input").fill('{"subreddit": python}')
    page.get_by_test_id("start-button").click()
    expect(error).to_be_visible()
    expect(error).to_contain_text("not valid JSON")

    page.get_by_test_id("params-input").fill("[1, 2]")
    page.get_by_test_id("start-button").click()
    expect(error).to_contain_text("must be a JSON object")
    expect(error).to_contain_text("not a list")

    assert posts == []
    with api(server) as client:
        assert client.get("/runs").json()["items"] == []
    expect(page.locator('[data-testid^="run-row-"]')).to_have_count(0)


def test_server_rejection_is_shown_readably(start_server, page):
    """Params the browser accepts but the server refuses (too deep) show the server's detail."""
    server = start_server(STEPPING)
    page.goto(server.url + "/")
    deep: dict[str, Any] = {}
    for _ in range(40):
        deep = {"a": deep}
    page.get_by_test_id("params-input").fill(json.dumps(deep))
    page.get_by_test_id("start-button").click()
    error = page.get_by_test_id("params-error")
    expect(error).to_contain_text("The server rejected the parameters")
    expect(error).to_contain_text("nested deeper than 32")
    with api(server) as client:
        assert client.get("/runs").json()["items"] == []


def test_token_is_asked_for_once_then_sent_everywhere(start_server, page):
    """With an API token, the page asks for it, refuses a wrong one, then lists and starts runs."""
    server = start_server(STEPPING, api_token=TOKEN)
    with api(server, TOKEN) as client:
        seeded = client.post("/runs", json={"params": {"step_seconds": 0.01}}).json()["id"]
    wait_for(lambda: run_status(server, seeded, TOKEN) == "completed")
    requests: list[Request] = []
    page.on("request", lambda request: requests.append(request))

    page.goto(server.url + "/")
    form = page.get_by_test_id("token-form")
    expect(form).to_be_visible()
    expect(page.locator('[data-testid^="run-row-"]')).to_have_count(0)

    page.get_by_test_id("token-input").fill("wrong")
    page.get_by_test_id("token-submit").click()
    expect(page.get_by_test_id("token-error")).to_contain_text("not accepted")
    expect(form).to_be_visible()

    page.get_by_test_id("token-input").fill(TOKEN)
    page.get_by_test_id("token-submit").click()
    expect(form).to_be_hidden()
    expect(page.get_by_test_id(f"run-status-{seeded}")).to_have_text("completed")
    assert page.evaluate("sessionStorage.getItem('pipeline.apiToken')") == TOKEN

    page.get_by_test_id("params-input").fill('{"step_seconds": 0.02}')
    page.get_by_test_id("start-button").click()
    started = seeded + 1
    expect(page.get_by_test_id(f"run-status-{started}")).to_have_text("completed")
    expect(form).to_be_hidden()

    # The one event stream: refused (401) until the token is known, then sent with it.
    streams = [r for r in requests if urlsplit(r.url).path == "/events"]
    accepted = [r for r in streams if _status(r) == 200]
    assert accepted, "the page never opened the event stream"
    assert all(r.all_headers().get("authorization") == f"Bearer {TOKEN}" for r in accepted)
    assert all(_status(r) == 401 for r in streams if r not in accepted)
    assert not [r.url for r in requests if PER_RUN_STREAM.search(urlsplit(r.url).path)]


# -- one event stream for the whole page ----------------------------------------------


def _record_percents(page: Page) -> None:
    """Every data-percent the page gives a run's bar, kept in ``window.__percents[id]``."""
    page.evaluate(
        """() => {
            const seen = (window.__percents = {});
            const note = (bar) => {
                const match = /^run-progress-(\\d+)$/.exec(bar.getAttribute("data-testid") || "");
                if (match && bar.dataset.percent !== undefined) {
                    (seen[match[1]] = seen[match[1]] || []).push(Number(bar.dataset.percent));
                }
            };
            const list = document.querySelector('[data-testid="run-list"]');
            new MutationObserver((changes) => {
                for (const change of changes) {
                    if (change.type === "attributes") note(change.target);
                    for (const node of change.addedNodes || []) {
                        if (node.querySelectorAll) node.querySelectorAll(".bar").forEach(note);
                    }
                }
            }).observe(list, {
                subtree: true, childList: true, attributes: true, attributeFilter: ["data-percent"],
            });
        }"""
    )


def _paths(requests: list[Request], method: str = "GET") -> list[str]:
    return [urlsplit(r.url).path for r in requests if r.method == method]


def test_one_event_stream_follows_every_run(start_server, page):
    """Runs started from the page and elsewhere move and complete live over one GET /events.

    No per-run stream is opened, and the list is read only at the start and
    when the stream opens: every row's progress, status and warnings, the new
    run at the top and the selected run's details come from the one stream.
    """
    server = start_server(STEPPING)
    requests: list[Request] = []
    page.on("request", lambda request: requests.append(request))
    page.goto(server.url + "/")
    page.evaluate("window.__marker = 'no reload'")
    expect(page.get_by_test_id("runs-empty")).to_be_visible()
    expect(page.get_by_test_id("connection")).to_have_attribute("data-state", "live")
    _record_percents(page)
    rows = page.locator('[data-testid^="run-row-"]')

    page.get_by_test_id("params-input").fill('{"step_seconds": 0.05}')
    for count in (1, 2, 3):
        page.get_by_test_id("start-button").click()
        expect(rows).to_have_count(count)
    started = [int(rows.nth(i).get_attribute("data-run-id") or 0) for i in range(3)]
    assert started == sorted(started, reverse=True)
    # One started elsewhere shows up at the top, by the stream alone.
    with api(server) as client:
        elsewhere = client.post("/runs", json={"params": {"step_seconds": 0.05}}).json()["id"]
    expect(rows).to_have_count(4)
    expect(rows.first).to_have_attribute("data-run-id", str(elsewhere))

    for run_id in [*started, elsewhere]:
        expect(page.get_by_test_id(f"run-status-{run_id}")).to_have_text("completed")
        expect(page.get_by_test_id(f"run-progress-{run_id}")).to_have_attribute(
            "data-percent", "100"
        )
        expect(page.get_by_test_id(f"run-percent-{run_id}")).to_have_text("100%")
        expect(page.get_by_test_id(f"run-warnings-{run_id}")).to_have_text("1 warning")
    percents = page.evaluate("window.__percents")
    for run_id in [*started, elsewhere]:
        moving = [p for p in percents.get(str(run_id), []) if 0 < p < 100]
        assert moving, f"run {run_id} never showed progress between 0 and 100: {percents}"
    # The last run started from the page is selected: its details followed it too.
    details = page.get_by_test_id("run-details")
    expect(details.get_by_test_id("details-title")).to_have_text(f"Run #{started[0]}")
    expect(details.get_by_test_id("details-status")).to_have_text("completed")
    for num in (1, 2, 3):
        expect(details.get_by_test_id(f"phase-{num}")).to_have_attribute("data-status", "completed")
    assert page.evaluate("window.__marker") == "no reload"

    paths = _paths(requests)
    assert [p for p in paths if PER_RUN_STREAM.search(p)] == []
    assert paths.count("/events") == 1, paths
    assert paths.count("/runs") <= 2, paths  # at the start, and once the stream was open
    expect(page.get_by_test_id("connection")).to_have_attribute("data-state", "live")


def test_the_stream_comes_back_after_a_refusal_or_an_end_and_the_list_catches_up(
    start_server, page
):
    """A 503 is retried after its Retry-After; an ended stream is opened again, the list re-read.

    The first GET /events is refused (too many streams), the second accepted
    but ended at once (a server stopping). A run that is created and ends
    before the third one opens is never sent by any stream: the list read
    when it opens shows it. Live updates then come from that third stream.
    """
    server = start_server(STEPPING)
    requests: list[tuple[float, Request]] = []
    page.on("request", lambda request: requests.append((time.monotonic(), request)))
    answered: list[float] = []
    missed: list[int] = []

    def events(route: Route) -> None:
        answered.append(time.monotonic())
        if len(answered) == 1:
            route.fulfill(
                status=503,
                headers={"Retry-After": "1"},
                content_type="application/json",
                body='{"detail": "too many open event streams; retry later"}',
            )
        elif len(answered) == 2:
            route.fulfill(status=200, content_type="text/event-stream", body=": ping\n\n")
        else:
            if not missed:  # while the page has no stream: created and ended unseen
                with api(server) as client:
                    run_id = client.post("/runs", json={"params": {"step_seconds": 0.01}})
                missed.append(run_id.json()["id"])
                wait_for(lambda: run_status(server, missed[0]) == "completed")
            route.continue_()

    page.route(lambda url: urlsplit(url).path == "/events", events)
    page.goto(server.url + "/")
    connection = page.get_by_test_id("connection")
    expect(connection).to_have_attribute("data-state", "offline")
    expect(connection).to_contain_text("reconnecting")
    expect(page.get_by_test_id("runs-empty")).to_be_visible()  # the list does not need the stream

    deadline = time.monotonic() + 15
    while not missed and time.monotonic() < deadline:
        page.wait_for_timeout(50)  # the route handler runs while Playwright waits
    expect(page.get_by_test_id(f"run-status-{missed[0]}")).to_have_text("completed")
    expect(connection).to_have_attribute("data-state", "live")
    assert len(answered) == 3
    assert answered[1] - answered[0] >= 0.9, "the 503's Retry-After was not waited for"
    # The list was read again as soon as the third stream opened (not by the 5 s timer).
    third = [t for t, r in requests if urlsplit(r.url).path == "/events"][2]
    reads = [t for t, r in requests if r.method == "GET" and urlsplit(r.url).path == "/runs"]
    assert any(0 <= t - third < 2.5 for t in reads), (third, reads)

    # And the third stream carries the live updates.
    page.get_by_test_id("params-input").fill('{"step_seconds": 0.03}')
    page.get_by_test_id("start-button").click()
    rows = page.locator('[data-testid^="run-row-"]')
    expect(rows).to_have_count(2)
    live = int(rows.first.get_attribute("data-run-id") or 0)
    expect(page.get_by_test_id(f"run-status-{live}")).to_have_text("completed")
    expect(page.get_by_test_id(f"run-warnings-{live}")).to_have_text("1 warning")
    paths = _paths([r for _, r in requests])
    assert paths.count("/events") == 3, paths
    assert [p for p in paths if PER_RUN_STREAM.search(p)] == []


def test_a_run_resumed_and_ended_between_two_looks_is_caught_up(start_server, page):
    """A run that comes back to life and ends before the server's watcher looks again.

    The stream never sends it (it was never live at a look), so what the page
    knows is the resume's answer, "queued": the page reads the list again when
    the stream does not confirm such a run within a few seconds.
    """
    server = start_server(SLOW)
    with api(server) as client:
        run_id = client.post("/runs", json={}).json()["id"]
        wait_for(lambda: run_status(server, run_id) == "running")
        client.post(f"/runs/{run_id}/cancel")
        wait_for(lambda: run_status(server, run_id) == "cancelled")
    requests: list[Request] = []
    page.on("request", lambda request: requests.append(request))
    page.goto(server.url + "/")
    expect(page.get_by_test_id("connection")).to_have_attribute("data-state", "live")
    expect(page.get_by_test_id(f"run-status-{run_id}")).to_have_text("cancelled")

    def resumed_then_cancelled_at_once(route: Route) -> None:
        answer = route.fetch()
        with api(server) as client:
            assert client.post(f"/runs/{run_id}/cancel").status_code == 202
        route.fulfill(response=answer)

    page.route(f"**/runs/{run_id}/resume", resumed_then_cancelled_at_once)
    with page.expect_response(f"**/runs/{run_id}/resume") as resumed:
        page.get_by_test_id(f"resume-{run_id}").click()
    assert resumed.value.status == 202
    assert resumed.value.json()["status"] in ("queued", "running")
    expect(page.get_by_test_id(f"run-status-{run_id}")).to_have_text("cancelled")
    expect(page.get_by_test_id(f"resume-{run_id}")).to_be_visible()
    assert run_status(server, run_id) == "cancelled"
    paths = _paths(requests)
    assert paths.count("/events") == 1, paths
    assert [p for p in paths if PER_RUN_STREAM.search(p)] == []


# -- a run's report: artifacts and timeline ------------------------------------------


def _csp_errors(page: Page) -> list[str]:
    """Collects the console's Content-Security-Policy complaints (a blocked style or script)."""
    errors: list[str] = []
    page.on(
        "console",
        lambda msg: (
            errors.append(msg.text)
            if msg.type == "error" and "Content Security Policy" in msg.text
            else None
        ),
    )
    return errors


def _open_run(page: Page, server: LiveServer, run_id: int) -> Any:
    page.goto(server.url + "/")
    expect(page.get_by_test_id(f"run-status-{run_id}")).to_have_text("completed")
    page.get_by_test_id(f"run-open-{run_id}").click()
    details = page.get_by_test_id("run-details")
    expect(details.get_by_test_id("details-title")).to_have_text(f"Run #{run_id}")
    return details


def test_the_example_runs_page_shows_its_report_and_timeline(start_server, page):
    """The example's markdown, a sortable table, a bar chart of 5 bars, a line and the timeline."""
    from pipeline.example import PHASES

    csp = _csp_errors(page)
    server = start_server(PHASES)
    with api(server) as client:
        run_id = client.post("/runs", json={"params": {"fetch_delay": 0, "limit": 600}}).json()[
            "id"
        ]
    wait_for(lambda: run_status(server, run_id) == "completed", timeout=30)
    details = _open_run(page, server, run_id)

    summary = details.get_by_test_id("artifact-summary")
    expect(summary.locator("h1")).to_have_text("Sentiment report")
    expect(summary.locator("strong")).to_have_count(1)
    expect(summary.locator("li")).to_have_count(4)
    expect(summary).to_contain_text("Comments kept: 600")

    table = details.get_by_test_id("artifact-threads")
    expect(table.locator("tbody tr")).to_have_count(10)
    first_column = table.locator("tbody tr td:first-child")
    before = first_column.all_inner_texts()
    table.get_by_test_id("sort-2").click()  # mean score, ascending
    after = first_column.all_inner_texts()
    assert after != before
    assert sorted(after) == sorted(before)
    scores = [float(t) for t in table.locator("tbody tr td:nth-child(3)").all_inner_texts()]
    assert scores == sorted(scores)
    table.get_by_test_id("sort-2").click()  # again: descending
    scores = [float(t) for t in table.locator("tbody tr td:nth-child(3)").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)

    bars = details.get_by_test_id("artifact-sentiment").locator("svg [data-testid='chart-bar']")
    expect(bars).to_have_count(5)
    line = details.get_by_test_id("artifact-comments-by-hour").locator("svg polyline")
    expect(line).to_have_count(1)
    assert len((line.get_attribute("points") or "").split()) == 24
    expect(details.get_by_test_id("artifact-sentiment").locator("svg text")).not_to_have_count(0)

    timeline = details.get_by_test_id("timeline")
    for num in (1, 2, 3, 4):
        bar = timeline.get_by_test_id(f"timeline-bar-{num}")
        expect(bar).to_have_attribute("data-status", "completed")
        assert (bar.bounding_box() or {"width": 0})["width"] > 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-report.png"), full_page=True)
    assert csp == []


XSS = (
    "# Title <script>window.__pwned = 'script'</script>\n\n"
    "<img src=x onerror=\"window.__pwned = 'img'; document.title = 'pwned'\">\n\n"
    "- **bold <b onmouseover=alert(1)>x</b>**\n"
)


def hostile(conn: Connection, ctx: RunContext) -> None:
    ctx.artifact("hostile", title="<img src=x onerror=\"window.__pwned='title'\">", markdown=XSS)
    ctx.artifact(
        "hostile-table",
        table={
            "columns": ["<script>window.__pwned='th'</script>"],
            "rows": [["<img src=x onerror=\"window.__pwned='td'\">"]],
        },
    )


@phase(retries=1, backoff=0)
def retried_once(conn: Connection, ctx: RunContext) -> None:
    if ctx.run_id not in RETRIED:
        RETRIED.add(ctx.run_id)
        raise ConnectionError("first attempt fails")


RETRIED: set[int] = set()


def test_html_in_an_artifact_is_shown_as_text_and_never_executed(start_server, page):
    """Markdown with <script> and <img onerror> runs nothing and shows as text; retries show."""
    csp = _csp_errors(page)
    server = start_server([(1, "Retried", retried_once), (2, "Hostile", hostile)])
    with api(server) as client:
        run_id = client.post("/runs", json={}).json()["id"]
    wait_for(lambda: run_status(server, run_id) == "completed", timeout=30)
    details = _open_run(page, server, run_id)
    artifact = details.get_by_test_id("artifact-hostile")
    expect(artifact.locator("h1")).to_contain_text("<script>window.__pwned = 'script'</script>")
    expect(artifact).to_contain_text("<img src=x onerror=")
    expect(artifact.locator(".artifact-title")).to_contain_text("<img src=x")
    expect(details.get_by_test_id("artifact-hostile-table")).to_contain_text("<img src=x onerror")
    assert details.locator("img, script, b").count() == 0
    expect(details.get_by_test_id("timeline-retries-1")).to_have_text("\u00d72")
    page.wait_for_timeout(300)  # an image error handler would have fired by now
    assert page.evaluate("window.__pwned") is None
    assert page.title() == "Runs · analysis-pipeline"
    assert csp == []


def _quiet(conn: Connection, ctx: RunContext) -> None:
    return None


def test_the_params_form_shows_field_errors_before_a_run_is_created(start_server, page):
    """The example's form refuses fetch_delay 9 next to the field; fixed it runs; Run again too."""
    from pipeline.example import PIPELINE

    csp = _csp_errors(page)
    server = start_server([PIPELINE, Pipeline("other", [(1, "Only", _quiet)])])
    page.goto(server.url)
    expect(page.get_by_test_id("pipeline-picker")).to_be_visible()
    page.get_by_test_id("pipeline-select").select_option("phases")
    expect(page.get_by_test_id("params-input")).to_be_hidden()  # the JSON box is "advanced"
    expect(page.get_by_test_id("param-fetch_delay")).to_have_attribute("max", "5")
    expect(page.get_by_test_id("params-form")).to_contain_text("Seconds to pause per page")
    page.get_by_test_id("param-fetch_delay").fill("9")
    page.get_by_test_id("start-button").click()
    error = page.get_by_test_id("param-error-fetch_delay")
    expect(error).to_be_visible()
    expect(error).to_contain_text("less than or equal to 5")
    with api(server) as client:
        assert client.get("/runs").json()["items"] == []
    page.get_by_test_id("param-fetch_delay").fill("0")
    page.get_by_test_id("param-limit").fill("50")
    page.get_by_test_id("start-button").click()
    expect(error).to_be_hidden()
    run_id = newest_run_id(page)
    expect(page.get_by_test_id(f"run-pipeline-{run_id}")).to_have_text("phases")
    expect(page.get_by_test_id(f"run-status-{run_id}")).to_have_text("completed", timeout=30_000)
    with api(server) as client:
        assert client.get(f"/runs/{run_id}").json()["params"] == {"fetch_delay": 0, "limit": 50}

    page.get_by_test_id(f"run-open-{run_id}").click()
    page.get_by_test_id("run-again").click()
    expect(page.get_by_test_id("param-limit")).to_have_value("50")
    page.get_by_test_id("start-button").click()
    expect(page.locator('[data-testid^="run-row-"]')).to_have_count(2)
    again = newest_run_id(page)
    assert again != run_id
    expect(page.get_by_test_id(f"run-status-{again}")).to_have_text("completed", timeout=30_000)
    with api(server) as client:
        assert client.get(f"/runs/{again}").json()["params"] == {"fetch_delay": 0, "limit": 50}
    assert csp == []
