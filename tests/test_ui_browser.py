"""`tunesmith ui` in headless Chromium: the runs page with a real tiny run, a run's page and its
report frame, the compare picks, filter and sort; no console errors (CSP violations are console
errors too), no broken images. With TUNESMITH_UI_SCREENSHOT=1 it saves the runs page to
docs/ui-runs.png (the README's screenshot; CI never writes into the repository)."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import pytest

from browser import Page, chromium
from conftest import start_server, train_tiny_run
from tunesmith.cli.ui.app import UiSettings, asgi_app

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "ui-runs.png"

if chromium() is None:  # make test installs it; a bare `pytest` elsewhere may lack it
    pytestmark = pytest.mark.skipif(os.environ.get("TUNESMITH_REQUIRE_BROWSER") != "1",
                                    reason="chromium not installed (apt-get install chromium)")


def clean(state: dict) -> bool:
    return state["console_errors"] == [] and state["exceptions"] == [] and state["broken"] == []


@pytest.fixture()
def server(tmp_path, tiny_model):
    (tmp_path / "exp").mkdir()
    train_tiny_run(tmp_path / "exp", tiny_model)
    if os.environ.get("TUNESMITH_UI_SCREENSHOT") == "1":  # a second method makes a more telling picture
        (tmp_path / "exp-full").mkdir()
        train_tiny_run(tmp_path / "exp-full", tiny_model, method="full")
    else:
        shutil.copytree(tmp_path / "exp" / "run", tmp_path / "copy" / "run")
    url, stop = start_server(asgi_app(UiSettings(root=tmp_path)))
    yield url
    stop()


def test_runs_page_run_page_and_report(server):
    with Page() as browser:
        browser.call("Emulation.setDeviceMetricsOverride", width=1280, height=640, deviceScaleFactor=1, mobile=False)
        state = browser.open_url(server + "/")
        assert clean(state), state
        assert state["title"].startswith("Runs")
        assert browser.evaluate("document.querySelector(\"tr[data-rel='exp/run'] a\").textContent") == "tiny"
        if os.environ.get("TUNESMITH_UI_SCREENSHOT") == "1":
            shot = browser.call("Page.captureScreenshot", format="png")["data"]
            SCREENSHOT.parent.mkdir(exist_ok=True)
            SCREENSHOT.write_bytes(base64.b64decode(shot))
        check_filter_sort_and_picks(browser)
        # ui.js's post: the CSRF header sent, the answer's JSON read into .data and still given by .json()
        answer = browser.evaluate("tunesmith.post('/api/runs', {}).then(r => r.json().then(j => "
                                  "JSON.stringify([r.status, r.ok, tunesmith.errorText(r.data), j === r.data])))")
        assert json.loads(answer) == [405, False, "Method Not Allowed", True]
        browser.events.clear()  # the 405 above is logged as a console error on purpose
        state = browser.open_url(server + "/runs/exp/run")
        assert clean(state), state
        assert browser.frame_loaded(server + "/files/exp/run/report.html")
        state = browser.open_url(server + "/files/exp/run/report.html")  # the report itself: its images, no CSP errors
        assert clean(state), state
        assert state["images"] >= 4 and state["title"].startswith("tunesmith: ")


def check_filter_sort_and_picks(browser: Page) -> None:
    """Filter hides rows, a header click sorts, two picks enable the compare button with their runs."""
    visible = "Array.from(document.querySelectorAll('#runs tbody tr')).filter(r => !r.hidden).length"
    assert browser.evaluate(visible) == 2
    browser.evaluate("const f = document.getElementById('run-filter'); f.value = 'no-such-run';"
                     "f.dispatchEvent(new Event('input'))")
    assert browser.evaluate(visible) == 0
    browser.evaluate("const g = document.getElementById('run-filter'); g.value = '';"
                     "g.dispatchEvent(new Event('input'))")
    browser.evaluate("document.querySelector(\"th[data-sort='date']\").click()")
    assert browser.evaluate("document.querySelector(\"th[data-sort='date']\").getAttribute('aria-sort')") \
        == "ascending"
    button = "document.getElementById('compare-picked')"
    assert browser.evaluate(button + ".disabled") is True
    browser.evaluate("document.querySelectorAll('input.pick').forEach(b => b.click())")
    assert browser.evaluate(button + ".disabled") is False
