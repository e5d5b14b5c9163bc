"""`tunesmith ui` end to end in headless Chromium, as a person would use it: the runs page, a bad value in
the New run form and its located error, Start, the job page's live progress until the run is done, the
run's page and report, the watch chart, the label review queue, and the next run applying the
corrections saved there. No console error, uncaught exception or broken image on any page of the way."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from browser import Page, chromium
from conftest import make_texts, start_server, train_tiny_run, write_jsonl
from tunesmith.cli import app as cli_app
from tunesmith.cli.ui.app import UiSettings, asgi_app

if chromium() is None:  # make test installs it; a bare `pytest` elsewhere may lack it
    pytestmark = pytest.mark.skipif(os.environ.get("TUNESMITH_REQUIRE_BROWSER") != "1",
                                    reason="chromium not installed (apt-get install chromium)")

RUN_TIMEOUT_S = 240  # the tiny run takes seconds; a loaded 2-core CI machine gets slack
FLIPPED = {"alpha": "beta", "beta": "gamma", "gamma": "alpha"}
# What the form is filled with: a tiny classification run of 4 steps on the files under the root.
FORM = {"name": "flow", "task.instruction": "Classify.", "data.train": "data/train.jsonl",
        "data.test": "data/test.jsonl", "objective.target": "0.0", "train.max_steps": "4", "train.eval_every": "2",
        "train.batch_size": "4", "train.learning_rate": "0.01", "train.epochs": "1"}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture()
def workbench(tmp_path):
    """An empty root holding only data files (three training rows mislabelled, so the data stage
    suspects them), served by the real app on a loopback port: (url, root)."""
    rows = make_texts(40, 1)
    for i in (0, 1, 2):
        rows[i]["label"] = FLIPPED[rows[i]["label"]]
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "test.jsonl", make_texts(9, 2))
    url, stop = start_server(asgi_app(UiSettings(root=tmp_path)))
    yield url, tmp_path
    stop()


def clean(state: dict) -> bool:
    return state["console_errors"] == [] and state["exceptions"] == [] and state["broken"] == []


def test_start_watch_report_review_and_apply_corrections_in_the_browser(workbench, tiny_model):
    url, root = workbench
    with Page() as browser:
        state = browser.open_url(url + "/")
        assert clean(state), state
        assert state["title"].startswith("Runs")
        submit_the_form(browser, url, root, tiny_model)
        run_rel = watch_the_job(browser, root)
        open_the_run(browser, url, run_rel)
        corrections, decision = relabel_a_suspect(browser, url, run_rel)
        state = browser.open_url(url + "/")
        assert clean(state), state
    next_run = rerun_with_corrections(root, corrections)
    changes = [c for c in _jsonl(next_run / "data" / "changes.jsonl") if c.get("reason") == "correction"]
    assert changes and all(c.get("line") for c in changes), changes
    kept = _jsonl(next_run / "data" / "train.jsonl") + _jsonl(next_run / "data" / "validation.jsonl")
    assert [r["target"] for r in kept if r["input"] == decision["text"]] == [decision["label"]]


def submit_the_form(browser: Page, url: str, root: Path, tiny_model: Path) -> None:
    """Fill the New run form, see the located error of a bad value, fix it and press Start."""
    state = browser.open_url(url + "/new")
    assert clean(state), state
    form = browser.evaluate("document.getElementById('new-run').outerHTML")
    assert "PydanticUndefined" not in form  # a required field shows no placeholder of pydantic's
    files = browser.evaluate("JSON.stringify(Array.from(document.querySelectorAll('#files-f-data-train option'))"
                             ".map(o => o.value))")
    assert {"data/train.jsonl", "data/test.jsonl"} <= set(json.loads(files))  # the data found under --root
    for key, value in {**FORM, "model": str(tiny_model), "train.epochs": "-1"}.items():
        browser.fill(f"[name='{key}']", value)
    error = browser.wait_until("document.getElementById('form-error').textContent", timeout=30)
    located = re.fullmatch(r"error: .*'train\.epochs'.*, (\S+/flow\.yaml):(\d+) \(train\.epochs\), got -1", error)
    assert located, error
    draft_line = Path(located.group(1)).read_text(encoding="utf-8").splitlines()[int(located.group(2)) - 1]
    assert draft_line.strip() == "epochs: -1", draft_line  # the line named is the bad value's line
    browser.fill("[name='train.epochs']", "1")
    browser.wait_until("document.getElementById('form-status').textContent === 'config is valid' "
                       "&& !document.getElementById('form-error').textContent")
    browser.click("#start")
    browser.wait_until("location.pathname.startsWith('/jobs/') && document.readyState === 'complete' "
                       "&& !!document.getElementById('job-state')")
    state = browser.state()
    assert clean(state), state


def watch_the_job(browser: Page, root: Path) -> str:
    """On the job page: the progress bar moves (server-sent events from the run's train_log.jsonl), then
    the state reads done. Returns the run directory, relative to the root."""
    step = browser.wait_until("(() => { const p = document.getElementById('job-progress'); "
                              "return p.value >= 1 && document.getElementById('job-step').textContent; })()",
                              timeout=RUN_TIMEOUT_S)
    assert re.fullmatch(r"step \d+ / 4", step), step
    ended = browser.wait_until("(s => s !== 'running' && s)(document.getElementById('job-state').textContent)",
                               timeout=RUN_TIMEOUT_S)
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in (root / ".tunesmith-ui" / "jobs").glob("*/*")
                     if p.is_file())
    assert ended == "done", logs
    assert browser.evaluate("document.getElementById('job-exit').textContent") in ("(exit code 0)", "(exit code 3)")
    assert browser.evaluate("document.getElementById('job-loss').textContent") not in ("", "-")
    assert browser.evaluate("document.querySelectorAll('#job-validation tbody tr').length") >= 1
    state = browser.state()
    assert clean(state), state
    href = browser.wait_until("document.getElementById('job-run').getAttribute('href')")
    assert href.startswith("/runs/runs/flow/"), href
    return href.removeprefix("/runs/")


def open_the_run(browser: Page, url: str, run_rel: str) -> None:
    """The run's page with its report in a frame (200), the report itself, and the watch page's chart."""
    state = browser.open_url(f"{url}/runs/{run_rel}")
    assert clean(state), state
    assert browser.frame_loaded(f"{url}/files/{run_rel}/report.html")
    state = browser.open_url(f"{url}/files/{run_rel}/report.html")
    assert clean(state), state
    assert state["images"] >= 1 and state["title"].startswith("tunesmith: ")
    state = browser.open_url(f"{url}/watch?run={run_rel}")
    assert clean(state), state
    assert browser.evaluate("document.querySelectorAll('#watch-body svg').length") >= 1
    assert browser.evaluate("document.getElementById('watch').getAttribute('data-done')") == "1"


def relabel_a_suspect(browser: Page, url: str, run_rel: str) -> tuple[Path, dict]:
    """Relabel the first suspect of the run's review queue; (the corrections file, the decision)."""
    state = browser.open_url(f"{url}/review?run={run_rel}")
    assert clean(state), state
    row = json.loads(browser.evaluate(
        "(() => { const r = document.querySelector('#review tbody tr'); const s = r.querySelector('select');"
        "const other = Array.from(s.options).map(o => o.value).find(v => v !== r.getAttribute('data-given'));"
        "s.value = other; return JSON.stringify({text: r.querySelector('td.text').textContent, "
        "given: r.getAttribute('data-given'), label: other}); })()"))
    browser.click("#review tbody tr button[data-action=relabel]")
    status = browser.wait_until("document.querySelector('#review tbody tr .status').textContent")
    assert status == f"relabel \u2192 {row['label']}", status
    saved = browser.wait_until("document.getElementById('review-message').textContent")
    assert saved.startswith("saved to "), saved
    state = browser.state()
    assert clean(state), state
    corrections = Path(saved.removeprefix("saved to "))
    saved = _jsonl(corrections)
    assert [{k: d.get(k) for k in ("text", "given_label", "action", "label")} for d in saved] == [
        {"text": row["text"], "given_label": row["given"], "action": "relabel", "label": row["label"]}], saved
    return corrections, row


def rerun_with_corrections(root: Path, corrections: Path) -> Path:
    """`tunesmith run` on the config the form saved, with data.corrections added: the next run."""
    saved = next((root / ".tunesmith-ui" / "configs").glob("flow-*.yaml"))
    config = yaml.safe_load(saved.read_text(encoding="utf-8"))
    config["data"]["corrections"] = str(corrections)
    following = saved.with_name("flow-corrected.yaml")  # beside it: its relative data paths still resolve
    following.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    out = root / "runs" / "flow-corrected"
    result = CliRunner().invoke(cli_app, ["run", str(following), "--out", str(out), "--quiet"])
    assert result.exit_code in (0, 3), result.output
    return out


def test_playground_classifies_a_text_in_the_browser(tmp_path, tiny_model):
    """Try it on a finished classification run: type a text, press Classify, a label of the run's task
    comes back for the fine-tuned model (and the base model's answer beside it)."""
    pytest.importorskip("tunesmith.cli.ui.play")
    train_tiny_run(tmp_path, tiny_model)
    url, stop = start_server(asgi_app(UiSettings(root=tmp_path)))
    try:
        with Page() as browser:
            state = browser.open_url(f"{url}/play?run=run")
            assert clean(state), state
            browser.fill("#play-input", "the red card please")
            browser.click("#play-go")
            tuned = browser.wait_until("document.querySelector('#play-tuned .play-label')?.textContent", timeout=120)
            base = browser.wait_until("document.querySelector('#play-base .play-label')?.textContent", timeout=60)
            cells = json.loads(browser.evaluate("JSON.stringify(['tuned', 'base'].map(s => "
                                                "document.getElementById('play-' + s).textContent))"))
            state = browser.state()
    finally:
        stop()
    assert clean(state), state
    assert {tuned, base} <= {"alpha", "beta", "gamma"}, (tuned, base)
    assert cells[0] != cells[1], cells  # two models answered: their probabilities differ
