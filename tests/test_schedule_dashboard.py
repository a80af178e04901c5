"""The dashboard's schedules panel in a real headless Chromium (see test_dashboard.py).

Schedules fire by a clock the test holds (``create_app(..., clock=...)``), and
the housekeeping loop looks every 0.1 s, so "the next tick" is a line of the
test rather than a wait. The browser runs in New York (``timezone_id``) with
US English, so the next fire time reads the same on every machine: once in
the schedule's zone and once in the viewer's.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import pydantic
import pytest
from playwright.sync_api import Browser, Page, Request, expect
from sqlalchemy.engine import Connection

from pipeline import Pipeline
from pipeline.api import create_app
from pipeline.config import Settings
from pipeline.orchestrator import RunContext

from .conftest import wait_for
from .live_server import LiveServer
from .test_dashboard import ARTIFACTS, CHROMIUM, TOKEN, api, browser, run_status

__all__ = ["browser"]  # the module-scoped Chromium of test_dashboard, reused as a fixture

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"),
    reason="needs Debian's chromium (apt-get install chromium)",
)

BEFORE_NINE_IN_BERLIN = dt.datetime(2030, 1, 1, 7, 59, 50, tzinfo=dt.UTC)  # 08:59:50 there
JUST_AFTER_NINE_IN_BERLIN = dt.datetime(2030, 1, 1, 8, 0, 5, tzinfo=dt.UTC)


class ReportParams(pydantic.BaseModel):
    limit: int = pydantic.Field(default=10, ge=1, le=100, description="Rows in the report.")


def _report(conn: Connection, ctx: RunContext) -> None:
    ctx.progress(1, 1)


REPORTS = Pipeline("reports", [(1, "Writing the report", _report)], params=ReportParams)


class Clock:
    """What the server's schedules take for "now"; the test moves it."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    return Clock(BEFORE_NINE_IN_BERLIN)


@pytest.fixture
def server(sqlite_url: str, clock: Clock) -> Iterator[Callable[..., LiveServer]]:
    """Starts the whole app on the test's clock, firing due schedules every 0.1 s."""
    servers: list[LiveServer] = []

    def start(api_token: str | None = None) -> LiveServer:
        settings = Settings(database_url=sqlite_url, api_token=api_token, poll_seconds=0.1)
        app = create_app(settings, registry=[REPORTS], clock=clock)
        servers.append(LiveServer(app).start())
        return servers[-1]

    yield start
    for live in servers:
        live.stop()


@pytest.fixture
def page(browser: Browser, server: Callable[..., LiveServer]) -> Iterator[Page]:
    """A New York, US-English browser context; no script error allowed."""
    context = browser.new_context(
        viewport={"width": 1280, "height": 1000}, locale="en-US", timezone_id="America/New_York"
    )
    page = context.new_page()
    page.set_default_timeout(15_000)
    script_errors: list[str] = []
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    yield page
    context.close()
    assert script_errors == [], f"JavaScript errors on the page: {script_errors}"


# -- helpers -------------------------------------------------------------------------


def schedules(live: LiveServer, token: str | None = None) -> list[dict[str, Any]]:
    with api(live, token) as client:
        items: list[dict[str, Any]] = client.get("/schedules").json()["items"]
        return items


def runs_of(live: LiveServer, schedule_id: int) -> list[dict[str, Any]]:
    with api(live) as client:
        items = client.get("/runs").json()["items"]
    return [run for run in items if run["schedule_id"] == schedule_id]


def fill_schedule_form(page: Page, name: str, cron: str, timezone: str, limit: str) -> None:
    form = page.get_by_test_id("schedule-form")
    if form.is_hidden():
        page.get_by_test_id("schedule-new").click()
    expect(form).to_be_visible()
    page.get_by_test_id("schedule-name").fill(name)
    page.get_by_test_id("schedule-cron").fill(cron)
    page.get_by_test_id("schedule-timezone").fill(timezone)
    page.get_by_test_id("schedule-param-limit").fill(limit)


def wall(text: str) -> re.Pattern[str]:
    """``text`` as a pattern where a space matches any space (ICU puts U+202F before AM)."""
    return re.compile("^" + r"\s".join(re.escape(part) for part in text.split(" ")) + "$")


# -- tests ---------------------------------------------------------------------------


def test_create_a_schedule_see_its_next_fire_time_and_its_first_run(server, clock, page):
    """A schedule added from the page shows its next tick in both zones, then its first run."""
    live = server()
    page.goto(live.url + "/")
    expect(page.get_by_test_id("schedules-empty")).to_be_visible()
    expect(page.get_by_test_id("schedule-pipeline-field")).to_be_hidden()  # one pipeline only

    fill_schedule_form(page, "morning-report", "0 9 * * *", "Europe/Berlin", "7")
    expect(page.get_by_test_id("schedule-params-input")).to_be_hidden()  # the form, not JSON
    page.get_by_test_id("schedule-submit").click()
    expect(page.get_by_test_id("schedule-form")).to_be_hidden()

    [created] = schedules(live)
    sid = created["id"]
    assert created["params"] == {"limit": 7}
    assert created["timezone"] == "Europe/Berlin"
    assert created["next_fire_at"] == "2030-01-01T08:00:00Z"
    row = page.get_by_test_id(f"schedule-row-{sid}")
    expect(row.get_by_test_id(f"schedule-name-{sid}")).to_have_text("morning-report")
    expect(row.get_by_test_id(f"schedule-state-{sid}")).to_have_text("enabled")
    expect(row.get_by_test_id(f"schedule-cron-text-{sid}")).to_have_text("At 09:00 every day")
    expect(row.get_by_test_id(f"schedule-cron-{sid}")).to_have_text("0 9 * * *")
    expect(row.get_by_test_id(f"schedule-next-zone-{sid}")).to_have_text(
        wall("Tue, Jan 1, 2030, 9:00 AM in Europe/Berlin")
    )
    expect(row.get_by_test_id(f"schedule-next-local-{sid}")).to_have_text(
        wall("Tue, Jan 1, 2030, 3:00 AM EST, your time")
    )
    expect(row.get_by_test_id(f"schedule-last-run-{sid}")).to_have_text("none yet")
    expect(page.get_by_test_id("schedules-summary")).to_have_text("1 schedule")
    assert runs_of(live, sid) == []  # 08:59:50 in Berlin: not yet

    clock.now = JUST_AFTER_NINE_IN_BERLIN
    [first] = wait_for(lambda: runs_of(live, sid))
    run_id = first["id"]
    assert first["params"] == {"limit": 7}

    # The run list shows it (no reload) as started by the schedule, and it completes.
    expect(page.get_by_test_id(f"run-schedule-{run_id}")).to_have_text("schedule morning-report")
    expect(page.get_by_test_id(f"run-status-{run_id}")).to_have_text("completed")
    # The schedule's last run is that run, and its next tick is tomorrow's.
    last = row.get_by_test_id(f"schedule-last-run-{sid}")
    expect(last).to_contain_text(f"Run #{run_id}")
    expect(last.locator(".badge")).to_have_text("completed")
    expect(row.get_by_test_id(f"schedule-next-zone-{sid}")).to_have_text(
        wall("Wed, Jan 2, 2030, 9:00 AM in Europe/Berlin")
    )

    row.get_by_test_id(f"schedule-last-run-open-{sid}").click()
    details = page.get_by_test_id("run-details")
    expect(details.get_by_test_id("details-title")).to_have_text(f"Run #{run_id}")
    expect(details.get_by_test_id("details-schedule")).to_have_text("schedule morning-report")

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-schedules.png"), full_page=True)


def test_refusals_are_shown_next_to_their_fields_and_create_nothing(server, page):
    """A bad cron, an unknown zone, refused params and a taken name: the server's words, no row."""
    live = server()
    with api(live) as client:
        taken = client.post("/schedules", json={"name": "taken", "cron": "@daily"})
    assert taken.status_code == 201
    posts: list[Request] = []
    page.on("request", lambda r: posts.append(r) if r.method == "POST" else None)
    page.goto(live.url + "/")
    expect(page.get_by_test_id("schedule-row-1")).to_be_visible()

    fill_schedule_form(page, "bad-one", "0 9 * *", "UTC", "5")
    page.get_by_test_id("schedule-submit").click()
    cron_error = page.get_by_test_id("schedule-error-cron")
    expect(cron_error).to_be_visible()
    expect(cron_error).to_contain_text("'cron' needs 5 fields")
    expect(cron_error).to_contain_text("got '0 9 * *'")
    expect(page.get_by_test_id("schedule-cron")).to_have_attribute("aria-invalid", "true")
    assert [r.url.rsplit("/", 1)[-1] for r in posts] == ["schedules"]  # the server said it

    page.get_by_test_id("schedule-cron").fill("0 9 * * *")
    page.get_by_test_id("schedule-param-limit").fill("0")
    page.get_by_test_id("schedule-submit").click()
    limit_error = page.get_by_test_id("schedule-param-error-limit")
    expect(limit_error).to_contain_text("greater than or equal to 1")
    expect(cron_error).to_be_hidden()

    page.get_by_test_id("schedule-param-limit").fill("5")
    page.get_by_test_id("schedule-timezone").fill("Mars/Olympus_Mons")
    page.get_by_test_id("schedule-submit").click()
    expect(page.get_by_test_id("schedule-error-timezone")).to_contain_text(
        "unknown: 'Mars/Olympus_Mons'"
    )
    expect(limit_error).to_be_hidden()

    page.get_by_test_id("schedule-timezone").fill("UTC")
    page.get_by_test_id("schedule-name").fill("taken")
    page.get_by_test_id("schedule-submit").click()
    expect(page.get_by_test_id("schedule-error-name")).to_contain_text("exists already")

    assert [s["name"] for s in schedules(live)] == ["taken"]
    expect(page.locator('[data-testid^="schedule-row-"]')).to_have_count(1)
    expect(page.get_by_test_id("schedule-form")).to_be_visible()  # kept, to be corrected
    assert len(posts) == 4


def test_pause_resume_and_delete_a_schedule(server, clock, page):
    """Pause hides the next tick, Resume brings it back; Delete removes it and its run stays."""
    live = server()
    with api(live) as client:
        created = client.post(
            "/schedules", json={"name": "hourly", "cron": "0 * * * *", "params": {"limit": 3}}
        ).json()
    sid = created["id"]
    clock.now = JUST_AFTER_NINE_IN_BERLIN  # 08:00:05 UTC: the 08:00 tick fires
    [fired] = wait_for(lambda: runs_of(live, sid))
    run_id = fired["id"]
    wait_for(lambda: run_status(live, run_id) == "completed")

    page.goto(live.url + "/")
    row = page.get_by_test_id(f"schedule-row-{sid}")
    next_zone = row.get_by_test_id(f"schedule-next-zone-{sid}")
    next_local = row.get_by_test_id(f"schedule-next-local-{sid}")
    expect(next_zone).to_have_text(wall("Tue, Jan 1, 2030, 9:00 AM in UTC"))
    expect(next_local).to_have_text(wall("Tue, Jan 1, 2030, 4:00 AM EST, your time"))
    expect(row.get_by_test_id(f"schedule-params-{sid}")).to_have_text('params {"limit":3}')
    expect(row.get_by_test_id(f"schedule-last-run-{sid}")).to_contain_text(f"Run #{run_id}")
    expect(page.get_by_test_id(f"run-schedule-{run_id}")).to_have_text("schedule hourly")

    toggle = row.get_by_test_id(f"schedule-toggle-{sid}")
    expect(toggle).to_have_text("Pause")
    toggle.click()
    expect(row.get_by_test_id(f"schedule-state-{sid}")).to_have_text("paused")
    expect(toggle).to_have_text("Resume")
    expect(next_zone).to_have_text("paused: no next run")
    expect(next_local).to_be_hidden()
    expect(page.get_by_test_id("schedules-summary")).to_have_text("1 schedule · 1 paused")
    [paused] = schedules(live)
    assert paused["enabled"] is False
    assert paused["next_fire_at"] is None

    toggle.click()
    expect(row.get_by_test_id(f"schedule-state-{sid}")).to_have_text("enabled")
    expect(toggle).to_have_text("Pause")
    expect(next_zone).to_have_text(wall("Tue, Jan 1, 2030, 9:00 AM in UTC"))
    [resumed] = schedules(live)
    assert resumed["enabled"] is True
    assert resumed["next_fire_at"] == "2030-01-01T09:00:00Z"

    # Delete asks once more; "Keep" keeps it.
    row.get_by_test_id(f"schedule-delete-{sid}").click()
    expect(row.get_by_test_id(f"schedule-delete-confirm-{sid}")).to_be_visible()
    row.get_by_test_id(f"schedule-delete-keep-{sid}").click()
    expect(row.get_by_test_id(f"schedule-delete-confirm-{sid}")).to_be_hidden()
    assert len(schedules(live)) == 1

    row.get_by_test_id(f"schedule-delete-{sid}").click()
    row.get_by_test_id(f"schedule-delete-confirm-{sid}").click()
    expect(row).to_have_count(0)
    expect(page.get_by_test_id("schedules-empty")).to_be_visible()
    assert schedules(live) == []
    # Its run stays, and still says where it came from.
    expect(page.get_by_test_id(f"run-row-{run_id}")).to_be_visible()
    expect(page.get_by_test_id(f"run-schedule-{run_id}")).to_have_text(f"deleted schedule #{sid}")
    page.get_by_test_id(f"run-open-{run_id}").click()
    expect(page.get_by_test_id("details-schedule")).to_have_text(f"deleted schedule #{sid}")
    with api(live) as client:
        assert client.get(f"/runs/{run_id}").json()["schedule_id"] == sid


def test_the_schedules_panel_sends_the_token(server, page):
    """Behind an API token the panel lists and adds schedules once the token is given."""
    live = server(api_token=TOKEN)
    with api(live, TOKEN) as client:
        assert client.post("/schedules", json={"name": "seeded", "cron": "@hourly"}).is_success
    page.goto(live.url + "/")
    page.get_by_test_id("token-input").fill(TOKEN)
    page.get_by_test_id("token-submit").click()
    expect(page.get_by_test_id("schedule-name-1")).to_have_text("seeded")
    expect(page.get_by_test_id("schedule-cron-text-1")).to_have_text("At the start of every hour")

    fill_schedule_form(page, "added", "*/15 * * * *", "UTC", "2")
    page.get_by_test_id("schedule-submit").click()
    expect(page.get_by_test_id("schedule-name-2")).to_have_text("added")
    assert [s["name"] for s in schedules(live, TOKEN)] == ["added", "seeded"]
