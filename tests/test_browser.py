"""Pages a person opens, rendered in headless Chromium: the run report and the human rating form.

Chromium comes from Debian's `chromium` package (`make test` installs it). A page fails on a
broken image, a console error or an uncaught exception.
"""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from browser import Page, chromium, rate_form
from tunesmith.cli import app

runner = CliRunner()

if chromium() is None:  # make test installs it; a bare `pytest` elsewhere may lack it
    pytestmark = pytest.mark.skipif(os.environ.get("TUNESMITH_REQUIRE_BROWSER") != "1",
                                    reason="chromium not installed (apt-get install chromium)")


def test_the_checker_sees_broken_images_and_errors(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<html><body><img alt='gone' src='data:image/png;base64,AAAA'>"
                    "<script>console.error('boom'); undefined_function();</script></body></html>")
    with Page() as browser:
        state = browser.open(page)
    assert state["broken"] == ["gone"]
    assert "boom" in state["console_errors"]
    assert state["exceptions"], "the uncaught ReferenceError is reported"


def test_run_report_renders_without_errors(tiny_project, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(tiny_project), "--out", str(out), "--quiet"])
    assert result.exit_code in (0, 3), result.output
    with Page() as browser:
        state = browser.open(out / "report.html")
    assert state["console_errors"] == [] and state["exceptions"] == []
    assert state["broken"] == []
    assert state["images"] >= 4  # metric bars, training curves, confusion matrices, data profile
    assert state["title"].startswith("tunesmith: ")


def test_rating_form_saves_a_file_that_imports(tmp_path):
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    rows = [{"text": f"q{i}", "gold": "x", "prediction": f"tuned {i}", "baseline_prediction": f"base {i}",
             "source": f"t:{i}"} for i in range(6)]
    (run / "predictions" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert runner.invoke(app, ["human", "export", str(run)]).exit_code == 0
    saved = rate_form(run / "human" / "form.html", tmp_path / "downloads", "ann", "A")
    assert saved is not None and saved.name == "ratings-ann.csv"
    result = runner.invoke(app, ["human", "import", str(saved), "--key", str(run / "human" / "key.json")])
    assert result.exit_code == 0, result.output
    pooled = json.loads((run / "human" / "results.json").read_text())["pooled"]
    key = json.loads((run / "human" / "key.json").read_text())
    wins = sum(1 for p in key["pairs"].values() if p["A"] == "one")
    assert pooled["ratings"] == 6 and pooled["win"]["count"] == wins and pooled["loss"]["count"] == 6 - wins
