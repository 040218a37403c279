"""Issue 12 items 3 and 4: the demo booking page at /demo, end to end in headless Chromium.

Debian's ``chromium`` driven by Playwright's Python package with ``executable_path`` (nothing is
downloaded at test time; ``scripts/install-system-deps.sh`` installs the browser).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from apputil import make_settings
from starlette.testclient import TestClient

REPO = Path(__file__).resolve().parents[2]
# The README's screenshot is refreshed only on request (SCHED_UPDATE_SCREENSHOT=1), so a test run never leaves
# the working tree modified; otherwise the screenshot goes to the test's temporary folder.
README_SCREENSHOT = REPO / "docs" / "demo-page.png"
PATIENT = "7"
SPEARS = "Practitioner/SPEARSB"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
]


def test_issue12_3_demo_page_is_off_unless_enabled(tmp_path: Path, sqlite_demo_path: Path) -> None:
    from adapter.server import build_app

    settings = make_settings(tmp_path, f"sqlite:///{sqlite_demo_path}")
    assert settings.demo is False and settings.demo_page is None
    with TestClient(build_app(settings)) as client:
        assert client.get("/demo/").status_code == 404
    with TestClient(build_app(settings.model_copy(update={"demo": True, "demo_page": False}))) as client:
        assert client.get("/demo/").status_code == 404
    with TestClient(build_app(settings.model_copy(update={"demo_page": True}))) as client:
        page = client.get("/demo/")
        assert page.status_code == 200 and '<label for="patient">' in page.text
        assert client.get("/demo/app.js").status_code == 200


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("Debian's chromium is not installed: run `make system-deps` (scripts/install-system-deps.sh)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, demo_base: str) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1100, "height": 1400})
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    pg.goto(demo_base.removesuffix("/fhir") + "/demo/")
    pg.wait_for_function("document.querySelectorAll('#specialty option').length > 1")
    yield pg
    context.close()


def find_times(page: Any) -> None:
    page.get_by_label("Patient id").fill(PATIENT)
    page.get_by_label("Practitioner").select_option(SPEARS)
    page.get_by_role("button", name="Find times").click()
    page.wait_for_selector("button.time")


def test_issue12_4_find_hold_book_see_cancel_in_chromium(page: Any, tmp_path: Path) -> None:
    find_times(page)
    days = page.locator("#times .day h3").all_inner_texts()
    assert days and all(re.match(r"\w+day, \w+ \d+", d) for d in days)
    first = page.locator("button.time").first
    chosen_start = first.get_attribute("data-start")
    first.focus()
    page.keyboard.press("Enter")  # keyboard works: the times are real buttons
    page.wait_for_selector("#hold-panel:not([hidden])")
    assert first.get_attribute("aria-pressed") == "true"
    countdown = page.locator("#countdown")
    assert re.fullmatch(r"[45]:\d\d", countdown.inner_text()), countdown.inner_text()
    page.wait_for_function(
        "before => document.getElementById('countdown').textContent !== before", arg=countdown.inner_text()
    )  # it counts down
    page.get_by_label("Note for the practice (optional)").fill("booked in Chromium")
    shot = README_SCREENSHOT if os.environ.get("SCHED_UPDATE_SCREENSHOT") == "1" else tmp_path / "demo-page.png"
    page.screenshot(path=str(shot))  # the held time with its countdown, above the times of the week
    page.get_by_role("button", name="Book this time").click()
    page.wait_for_selector("#message.ok")
    assert page.locator("#message").inner_text().startswith("Booked:")
    row = page.locator("#mine tbody tr").filter(has_text=chosen_start[11:16])
    row.wait_for()
    assert "booked" in row.inner_text()
    booked_id = row.get_attribute("data-id")
    page.get_by_label("Reason when cancelling").select_option("weather")
    row.get_by_role("button", name=re.compile("^Cancel the appointment")).click()
    page.wait_for_function("document.getElementById('message').textContent.startsWith('Cancelled')")
    # The page says "Cancelled" before it reloads the list: wait for the reload to drop the row.
    page.locator(f"#mine tbody tr[data-id='{booked_id}']").wait_for(state="detached")
    assert page.locator(f"#mine tbody tr[data-id='{booked_id}']").count() == 0


def test_issue12_4_conflict_when_another_client_books_first(page: Any, demo_base: str) -> None:
    find_times(page)
    button = page.locator("button.time").nth(3)
    token = button.get_attribute("data-id")
    assert token
    # Another Scheduling Client books the same proposed time first (same patient, via its own $book).
    other = httpx.post(
        f"{demo_base}/Appointment/$book",
        json={
            "resourceType": "Parameters",
            "parameter": [{"name": "appointment-reference", "valueReference": {"reference": f"Appointment/{token}"}}],
        },
        headers={"X-Client-Id": "someone-else", "Content-Type": "application/fhir+json"},
        timeout=30,
    )
    assert other.status_code == 200, other.text
    button.click()
    page.wait_for_function("document.getElementById('message').textContent.length > 0")
    message = page.locator("#message").inner_text()
    assert message.startswith("Sorry, this time was just taken by someone else."), message
    assert page.locator("#hold-panel").is_hidden()
    assert page.locator(f"button.time[data-id='{token}']").count() == 0


def test_issue12_3_specialty_choice_narrows_the_times(page: Any, demo_base: str) -> None:
    options = page.locator("#specialty option").all_inner_texts()
    assert "Cardiology" in options and "Family practice" in options
    page.get_by_label("Patient id").fill(PATIENT)
    page.get_by_label("Specialty").select_option(label="Cardiology")
    page.get_by_role("button", name="Find times").click()
    page.wait_for_selector("button.time")
    shown = {t.split(" ", 1)[1] for t in page.locator("button.time").all_inner_texts()}
    found = httpx.get(
        f"{demo_base}/Appointment/$find",
        params={"specialty": "http://snomed.info/sct|394579002", "_count": "500"},
        timeout=30,
    ).json()
    cardiologists = {
        p["actor"]["display"]
        for e in found["entry"]
        if e["resource"]["resourceType"] == "Appointment"
        for p in e["resource"]["participant"]
        if p["actor"]["reference"].startswith("Practitioner/")
    }
    assert shown and shown <= cardiologists


def test_issue12_3_pasted_bearer_token_is_sent(page: Any) -> None:
    page.locator("summary", has_text="Server and access token").click()
    page.get_by_label("Bearer token (leave empty when authorization is off)").fill("pasted-token-123")
    page.get_by_label("Patient id").fill(PATIENT)
    with page.expect_request(lambda r: r.url.endswith("/Appointment/$find") and r.method == "POST") as request:
        page.get_by_role("button", name="Find times").click()
    assert request.value.headers.get("authorization") == "Bearer pasted-token-123"
    page.wait_for_selector("button.time")  # the server (auth off) still answers
