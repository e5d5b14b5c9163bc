"""`tunesmith ui` Review labels: the suspects queue, decisions saved to a corrections file (CSRF-protected,
confined to --root), Label Studio export and import, and the next data stage applying the file."""

from __future__ import annotations

import json
import os

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from conftest import PROJECT, make_texts, write_jsonl
from tunesmith.cli import app as cli_app
from tunesmith.cli.ui.app import UiSettings, create_app
from tunesmith.cli.ui.review import decisions_from_label_studio, row_key
from tunesmith.data.corrections import read_corrections

SUSPECTS = [
    {"text": "blue <b>sky</b> & sea", "label": "alpha", "reason": "label_noise", "rank": 2, "given_label": "alpha",
     "suggested_label": "beta", "score": 0.91, "file": "/data/train.jsonl", "line": 7},
    {"text": "red apple", "label": "gamma", "reason": "label_noise", "rank": 1, "given_label": "gamma",
     "suggested_label": "alpha", "score": 0.97, "file": "/data/train.jsonl", "line": 3},
    {"text": "green grass", "label": "beta", "reason": "label_noise", "rank": 3, "given_label": "beta",
     "suggested_label": "gamma", "score": 0.55, "file": "/data/train.jsonl", "line": 9},
]


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture()
def ui(tmp_path):
    """A root with one run folder holding a suspects.jsonl, and a client with the page's CSRF token."""
    run = tmp_path / "runs" / "r1"
    (run / "data").mkdir(parents=True)
    write_jsonl(run / "data" / "suspects.jsonl", SUSPECTS)
    (run / "data" / "report.json").write_text(json.dumps({"labels": ["alpha", "beta", "gamma"]}))
    (run / "config.yaml").write_text("task:\n  type: classification\n  text_field: text\n")
    application = create_app(UiSettings(root=tmp_path))
    client = TestClient(application)
    client.headers["X-Tunesmith-CSRF"] = application.state.ui.csrf_token
    return client, tmp_path


def _decide(client, text, given_label, **body):
    """Post a decision the way review.js does: the row's key, never its text."""
    return client.post("/api/review/decision", json={"run": "runs/r1", "row": row_key(text, given_label), **body})


def _default_file(root, run="runs/r1"):
    """The default corrections file of `run`: ROOT/.tunesmith-ui/corrections/NAME-HASH.jsonl."""
    files = list((root / ".tunesmith-ui" / "corrections").glob("*.jsonl"))
    assert len(files) == 1, files
    return files[0]


def test_queue_lists_suspects_by_rank_escaped_with_the_labels_and_the_yaml_line(ui):
    client, root = ui
    page = client.get("/review", params={"run": "runs/r1"})
    assert page.status_code == 200
    html = page.text
    assert html.index("red apple") < html.index("blue &lt;b&gt;sky&lt;/b&gt; &amp; sea") < html.index("green grass")
    assert "<b>sky</b>" not in html
    assert "<option value='beta' selected>" in html and f"data-row='{row_key('red apple', 'gamma')}'" in html
    assert "corrections: " + str(root / ".tunesmith-ui" / "corrections" / "runs_r1-") in html and "review.js" in html
    listing = client.get("/review")
    assert "/review?run=runs/r1" in listing.text


def test_a_decision_is_saved_replaced_and_counted(ui):
    client, root = ui
    first = _decide(client, "red apple", "gamma", action="relabel", label="alpha")
    assert first.status_code == 200 and first.json()["count"] == 1
    target = _default_file(root)
    assert _decide(client, "green grass", "beta", action="drop").json()["count"] == 2
    again = _decide(client, "red apple", "gamma", action="relabel", label="gamma")  # to its own label: keep
    assert again.json()["count"] == 2
    assert _jsonl(target) == [
        {"text": "red apple", "given_label": "gamma", "action": "keep", "source": "train.jsonl:3"},
        {"text": "green grass", "given_label": "beta", "action": "drop", "source": "train.jsonl:9"}]
    assert "keep" in client.get("/review", params={"run": "runs/r1"}).text
    bad = _decide(client, "red apple", "gamma", action="relabel", label="omega")
    assert bad.status_code == 400 and "omega" in bad.json()["error"]["message"]
    assert _decide(client, "red apple", "gamma", action="burn").status_code == 400
    assert _decide(client, "not a suspect", "gamma", action="drop").status_code == 409
    assert client.post("/api/review/decision", json={"run": "runs/r1", "text": "red apple", "given_label": "gamma",
                                                     "action": "drop"}).status_code == 400
    assert len(_jsonl(target)) == 2


def test_decisions_need_the_csrf_token_and_the_same_origin(ui):
    client, root = ui
    body = {"run": "runs/r1", "row": row_key("red apple", "gamma"), "action": "drop"}
    assert client.post("/api/review/decision", json=body, headers={"X-Tunesmith-CSRF": "wrong"}).status_code == 403
    assert client.post("/api/review/decision", json=body,
                       headers={"Origin": "http://evil.example"}).status_code == 403
    assert client.post("/api/review/import", params={"run": "runs/r1"}, json=[],
                       headers={"X-Tunesmith-CSRF": ""}).status_code == 403
    assert not (root / ".tunesmith-ui").exists()


def test_paths_outside_the_root_are_refused(ui, tmp_path_factory):
    client, root = ui
    outside = tmp_path_factory.mktemp("outside")
    (outside / "data").mkdir()
    write_jsonl(outside / "data" / "suspects.jsonl", SUSPECTS)
    os.symlink(outside, root / "escape")
    for run in ("../outside", "/etc", "escape", "runs/../../x", "runs/r1\x00"):
        assert client.get("/review", params={"run": run}).status_code == 404, run
        assert client.get("/api/review/export", params={"run": run}).status_code == 404, run
    assert _decide(client, "red apple", "gamma", action="drop", file="../c.jsonl").status_code == 404
    inside_run = _decide(client, "red apple", "gamma", action="drop", file="runs/r1/c.jsonl")
    assert inside_run.status_code == 400
    # a file the user points at that is not a corrections file is never overwritten, nor shown
    (root / "train.jsonl").write_text('{"text": "x", "label": "alpha"}\n')
    clash = _decide(client, "red apple", "gamma", action="drop", file="train.jsonl")
    assert clash.status_code == 409 and (root / "train.jsonl").read_text() == '{"text": "x", "label": "alpha"}\n'
    assert clash.json()["error"]["message"] == f"not a corrections file: {root / 'train.jsonl'}:1"


def test_text_with_crlf_and_nul_is_saved_exactly_as_the_data_file_holds_it(ui):
    client, root = ui
    rows = [{**SUSPECTS[1], "text": "red\r\napple\x00 pie\rend"}, SUSPECTS[0]]
    write_jsonl(root / "runs" / "r1" / "data" / "suspects.jsonl", rows)
    saved = _decide(client, "red\r\napple\x00 pie\rend", "gamma", action="relabel", label="alpha")
    assert saved.status_code == 200, saved.text
    assert read_corrections(_default_file(root))[0].text == "red\r\napple\x00 pie\rend"


def test_a_corrections_file_inside_any_run_folder_is_refused(ui):
    client, root = ui
    other = root / "runs" / "r2"
    (other / "model").mkdir(parents=True)
    (other / "model" / "tunesmith.json").write_text("{}")
    for file in ("runs/r2/fixes.jsonl", "runs/r2/data/fixes.jsonl", "runs/r2/model/new.jsonl"):
        answer = _decide(client, "red apple", "gamma", action="drop", file=file)
        assert answer.status_code == 400 and "outside run folders" in answer.json()["error"]["message"], file
    assert _decide(client, "red apple", "gamma", action="drop", file="notes.txt").status_code == 400
    assert sorted(p.name for p in other.rglob("*")) == ["model", "tunesmith.json"]
    (root / "reviews").mkdir()
    assert _decide(client, "red apple", "gamma", action="drop", file="reviews/fixes.jsonl").status_code == 200


def test_a_ui_folder_that_links_outside_the_root_is_never_written_through(ui, tmp_path_factory):
    client, root = ui
    outside = tmp_path_factory.mktemp("elsewhere")
    os.symlink(outside, root / ".tunesmith-ui")
    answer = _decide(client, "red apple", "gamma", action="drop")
    assert answer.status_code == 409 and "leads outside the root" in answer.json()["error"]["message"]
    assert list(outside.rglob("*")) == []
    assert _decide(client, "red apple", "gamma", action="drop", file="fixes.jsonl").status_code == 200


def test_default_files_of_runs_whose_names_read_the_same_differ(ui):
    client, root = ui
    for run in ("a/b", "a_b"):
        (root / run / "data").mkdir(parents=True)
        write_jsonl(root / run / "data" / "suspects.jsonl", SUSPECTS)
        answer = client.post("/api/review/decision", json={"run": run, "row": row_key("red apple", "gamma"),
                                                            "action": "drop"})
        assert answer.status_code == 200 and answer.json()["count"] == 1, answer.text
    files = sorted((root / ".tunesmith-ui" / "corrections").glob("a_b-*.jsonl"))
    assert len(files) == 2


def test_export_and_start_links_carry_the_chosen_file(ui):
    client, root = ui
    refused = client.post("/api/review/decision", json={"run": "runs/r1", "row": row_key("red apple", "gamma"),
                                                         "action": "drop", "file": "mine/fixes.jsonl"})
    assert refused.status_code == 400 and "folder does not exist" in refused.text
    assert not (root / "mine").exists()  # a typo in a folder name makes no folders in the user's tree
    (root / "mine").mkdir()
    _decide(client, "red apple", "gamma", action="drop", file="mine/fixes.jsonl")
    html = client.get("/review", params={"run": "runs/r1", "file": "mine/fixes.jsonl"}).text
    assert "href='/api/review/export?run=runs%2Fr1&amp;file=mine%2Ffixes.jsonl'" in html
    assert "href='/new?corrections=mine%2Ffixes.jsonl'" in html
    tasks = client.get("/api/review/export", params={"run": "runs/r1", "file": "mine/fixes.jsonl"}).json()
    assert tasks[0]["annotations"][0]["result"][0]["value"]["choices"] == ["(drop)"]
    default = client.get("/review", params={"run": "runs/r1"}).text
    assert "href='/new?corrections=.tunesmith-ui%2Fcorrections%2Fruns_r1-" in default


def test_label_studio_export_then_import_gives_the_same_decisions(ui):
    client, root = ui
    _decide(client, "red apple", "gamma", action="relabel", label="alpha")
    _decide(client, "blue <b>sky</b> & sea", "alpha", action="keep")
    _decide(client, "green grass", "beta", action="drop")
    tasks = client.get("/api/review/export", params={"run": "runs/r1"}).json()
    assert [t["data"]["text"] for t in tasks] == ["red apple", "blue <b>sky</b> & sea", "green grass"]
    assert tasks[0]["predictions"][0]["result"][0] == {"from_name": "label", "to_name": "text", "type": "choices",
                                                       "value": {"choices": ["alpha"]}}
    back = client.post("/api/review/import", params={"run": "runs/r1", "file": "reviewed.jsonl"}, json=tasks)
    assert back.status_code == 200, back.text
    assert (back.json()["relabel"], back.json()["keep"], back.json()["drop"]) == (1, 1, 1)
    def decisions(path):
        return sorted((d["text"], d["given_label"], d["action"], d.get("label")) for d in _jsonl(path))
    assert decisions(root / "reviewed.jsonl") == decisions(_default_file(root))
    assert {d["source"] for d in _jsonl(root / "reviewed.jsonl")} == {"train.jsonl:3", "train.jsonl:7", "train.jsonl:9"}

def test_label_studio_annotations_become_decisions_and_the_rest_is_counted():
    def task(text, given, choices=None, cancelled=False):
        t = {"id": 1, "data": {"text": text}, "meta": {"given_label": given}}
        if choices is not None:
            t["annotations"] = [{"result": [{"from_name": "label", "to_name": "text", "type": "choices",
                                             "value": {"choices": choices}}], "was_cancelled": cancelled}]
        return t
    tasks = [task("a", "alpha", ["beta"]), task("b", "beta", ["beta"]), task("c", "gamma"),
             task("d", "gamma", ["alpha"], cancelled=True), task("e", "alpha", ["omega"]), "junk"]
    decisions, counts = decisions_from_label_studio(tasks, ["alpha", "beta", "gamma"])
    assert [(d.text, d.action, d.label) for d in decisions] == [("a", "relabel", "beta"), ("b", "keep", None)]
    assert counts == {"keep": 1, "relabel": 1, "drop": 0, "skipped_no_annotation": 2, "skipped_unknown_label": 1,
                      "skipped_invalid": 1}


def test_import_refuses_oversized_or_malformed_bodies(ui, monkeypatch):
    client, _ = ui
    import tunesmith.cli.ui.review as review

    monkeypatch.setattr(review, "MAX_BODY", 1000)
    big = client.post("/api/review/import", params={"run": "runs/r1"}, content=b"[" + b"1," * 1000 + b"1]")
    assert big.status_code == 413
    assert client.post("/api/review/import", params={"run": "runs/r1"}, content=b"{nope").status_code == 400
    assert client.post("/api/review/import", params={"run": "runs/r1"}, json={"x": 1}).status_code == 400


def test_a_relabel_made_in_the_queue_is_applied_by_the_next_data_stage(tmp_path, tiny_model):
    rows = make_texts(40, 1)
    for i in (0, 1, 2):  # mislabelled, so label-noise detection suspects them
        rows[i]["label"] = {"alpha": "beta", "beta": "gamma", "gamma": "alpha"}[rows[i]["label"]]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", make_texts(9, 2))
    config = PROJECT.format(model=tiny_model, method="lora").replace("  validation: 0.2\n", "  validation: 0.1\n")
    (tmp_path / "project.yaml").write_text(config)
    runner = CliRunner()
    first = runner.invoke(cli_app, ["data", "clean", str(tmp_path / "project.yaml"), "--out", str(tmp_path / "a"),
                                    "-q"])
    assert first.exit_code == 0, first.output
    application = create_app(UiSettings(root=tmp_path))
    client = TestClient(application)
    client.headers["X-Tunesmith-CSRF"] = application.state.ui.csrf_token
    suspect = _jsonl(tmp_path / "a" / "suspects.jsonl")[0]
    assert suspect["text"] in client.get("/review", params={"run": "a"}).text
    saved = client.post("/api/review/decision", json={"run": "a", "row": row_key(suspect["text"],
                                                                                  suspect["given_label"]),
                                                      "action": "relabel", "label": suspect["suggested_label"]})
    assert saved.status_code == 200, saved.text
    path = saved.json()["file"]
    (tmp_path / "project.yaml").write_text(config.replace("data:\n", f"data:\n  corrections: {path}\n"))
    second = runner.invoke(cli_app, ["data", "clean", str(tmp_path / "project.yaml"), "--out", str(tmp_path / "b"),
                                     "-q"])
    assert second.exit_code == 0, second.output
    kept = _jsonl(tmp_path / "b" / "train.jsonl") + _jsonl(tmp_path / "b" / "validation.jsonl")
    assert [e["target"] for e in kept if e["input"] == suspect["text"]] == [suspect["suggested_label"]]
    assert any(c.get("reason") == "correction" and c["line"] == suspect["line"]
               for c in _jsonl(tmp_path / "b" / "changes.jsonl"))


def test_relabel_in_the_browser_saves_the_decision(ui):
    """The page in headless Chromium: click Relabel on the first row, the decision is saved and shown; no
    console errors (the CSP allows no inline script, so review.js must do all of it)."""
    from browser import Page, chromium
    from conftest import start_server

    if chromium() is None and os.environ.get("TUNESMITH_REQUIRE_BROWSER") != "1":
        pytest.skip("chromium not installed (apt-get install chromium)")
    _, root = ui
    # text with a CRLF in it: an HTML attribute would hand it back with LF, the saved text must keep CRLF
    write_jsonl(root / "runs" / "r1" / "data" / "suspects.jsonl", [{**SUSPECTS[1], "text": "red\r\napple"}])
    url, stop = start_server(create_app(UiSettings(root=root)))
    try:
        with Page() as browser:
            browser.call("Page.navigate", url=f"{url}/review?run=runs/r1")
            browser.wait_for("Page.loadEventFired")
            browser.evaluate("document.querySelector('#review tbody tr select').value = 'beta'; "
                             "document.querySelector('#review tbody tr button[data-action=relabel]').click()")
            status = browser.evaluate("new Promise(r => { const t0 = Date.now(); (function poll() { "
                                      "const s = document.querySelector('#review tbody tr .status').textContent; "
                                      "if (s || Date.now() - t0 > 10000) r(s); else setTimeout(poll, 50); })(); })")
            errors = [e for e in browser.events if e.get("method") in ("Runtime.exceptionThrown",)
                      or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    finally:
        stop()
    assert status == "relabel \u2192 beta", status
    assert not errors, errors
    assert _jsonl(_default_file(root)) == [
        {"text": "red\r\napple", "given_label": "gamma", "action": "relabel", "label": "beta",
         "source": "train.jsonl:3"}]
