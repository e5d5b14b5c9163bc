"""`tunesmith ui`'s app and runs pages on a real tiny run: the runs table, a run's page with its
report, the compare page, the read-only files route, the run scan's limits and HTML escaping."""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient

from conftest import train_tiny_run
from tunesmith.cli.ui import jobs, review, runs_pages, watch
from tunesmith.cli.ui.app import UiSettings, create_app


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model):
    """ROOT/exp/run: a trained, evaluated tiny run; ROOT/copy/run: the same run copied (to compare)."""
    root = tmp_path_factory.mktemp("ui-root")
    (root / "exp").mkdir()
    train_tiny_run(root / "exp", tiny_model)
    shutil.copytree(root / "exp" / "run", root / "copy" / "run")
    return root


@pytest.fixture()
def client(root):
    return TestClient(create_app(UiSettings(root=root)))


def test_every_feature_router_is_included(root):
    app = create_app(UiSettings(root=root))
    # FastAPI >= 0.165 keeps an included router as one entry (original_router); older ones copy its routes
    included = {id(getattr(r, "original_router", None)) for r in app.routes}
    paths = {getattr(r, "path", None) for r in app.routes}
    for module in (runs_pages, jobs, review, watch):
        assert id(module.router) in included or {r.path for r in module.router.routes} <= paths, module.__name__
    assert isinstance(app.state.ui.jobs, jobs.JobManager) and app.state.ui.root == root.resolve()


def test_runs_table_lists_the_run(client, root):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    summary = json.loads((root / "exp" / "run" / "summary.json").read_text())
    assert "data-rel='exp/run'" in page.text and "data-rel='copy/run'" in page.text
    assert f"data-method='{summary['method']}'" in page.text and "classification" in page.text
    runs = {r["rel"]: r for r in client.get("/api/runs").json()["runs"]}
    row = runs["exp/run"]
    assert row["name"] == summary["name"] and row["metric"] == summary["objective_metric"]
    assert row["finetuned"] == pytest.approx(summary["metrics"]["finetuned"][row["metric"]])
    assert row["baseline"] == pytest.approx(summary["metrics"]["baseline"][row["metric"]])
    assert row["verdict"] == ("met" if summary["objective"]["met"] else "not met") and row["evaluated"]


def test_a_run_page_shows_its_report_and_links(client):
    page = client.get("/runs/exp/run")
    assert page.status_code == 200
    assert "src='/files/exp/run/report.html'" in page.text
    assert "href='/watch?run=exp/run'" in page.text and "href='/review?run=exp/run'" in page.text
    report = client.get("/files/exp/run/report.html")
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert report.text.startswith("<!doctype html>") or "<html" in report.text[:200]
    assert client.get("/files/exp/run/metrics.json").headers["content-type"].startswith("application/json")
    assert client.get("/files/exp/run/config.yaml").headers["content-type"].startswith("text/plain")
    assert client.get("/runs/exp").status_code == 404  # a folder that is not a run
    assert client.get("/files/exp/train.jsonl").status_code == 404  # data beside a run, not in one


def test_compare_two_runs(client):
    page = client.get("/compare", params={"a": "exp/run", "b": "copy/run"})
    assert page.status_code == 200 and "src='/compare/page?a=exp/run&amp;b=copy/run'" in page.text
    frame = client.get("/compare/page", params={"a": "exp/run", "b": "copy/run"})
    assert frame.status_code == 200 and "vs" in frame.text and "Test metrics" in frame.text
    assert "sandbox" in frame.headers["content-security-policy"]
    assert client.get("/compare").status_code == 400
    assert client.get("/compare", params={"a": "exp/run", "b": "exp"}).status_code == 404


def test_an_unevaluated_run_is_listed_without_figures(tmp_path):
    run = tmp_path / "lab" / "draft"
    (run / "model").mkdir(parents=True)
    (run / "model" / "tunesmith.json").write_text("{}")
    (run / "config.yaml").write_text("name: draft\nmodel: some/model\ntrain:\n  method: qlora\n")
    c = TestClient(create_app(UiSettings(root=tmp_path)))
    [row] = c.get("/api/runs").json()["runs"]
    assert (row["rel"], row["name"], row["model"], row["method"]) == ("lab/draft", "draft", "some/model", "qlora")
    assert row["verdict"] == "not evaluated" and row["finetuned"] is None
    page = c.get("/runs/lab/draft")
    assert "No report yet" in page.text
    assert c.get("/compare", params={"a": "lab/draft", "b": "lab/draft"}).status_code == 404  # not evaluated



def test_a_damaged_run_neither_hides_the_others_nor_breaks_the_compare_page(tmp_path, root):
    """A hand-edited summary.json (fields of the wrong type) is listed like any run; comparing it, or a
    run whose config.yaml is an alias bomb, is a 400 with one error line, not a 500."""
    shutil.copytree(root / "exp" / "run", tmp_path / "good" / "run")
    shutil.copytree(root / "exp" / "run", tmp_path / "odd" / "run")
    shutil.copytree(root / "exp" / "run", tmp_path / "bomb" / "run")
    summary = json.loads((tmp_path / "odd" / "run" / "summary.json").read_text())
    summary.update(objective_metric={"a": 1}, objective=[1], metrics="x")
    (tmp_path / "odd" / "run" / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "bomb" / "run" / "config.yaml").write_text(
        "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
            f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
            for i in range(8)))
    c = TestClient(create_app(UiSettings(root=tmp_path)))
    assert c.get("/").status_code == 200
    runs = {r["rel"]: r for r in c.get("/api/runs").json()["runs"]}
    assert set(runs) == {"good/run", "odd/run", "bomb/run"}
    assert runs["odd/run"]["metric"] is None and runs["odd/run"]["verdict"] == "not met"
    for other in ("odd/run", "bomb/run"):
        frame = c.get("/compare/page", params={"a": "good/run", "b": other})
        assert frame.status_code == 400, frame.text
        message = frame.json()["error"]["message"]
        assert message.startswith("error: ") and other.split("/")[0] in message, message

def test_run_text_is_escaped(tmp_path, root):
    run = tmp_path / "x" / "run"
    shutil.copytree(root / "exp" / "run", run)
    summary = json.loads((run / "summary.json").read_text())
    summary["name"] = "<img src=x onerror=alert(1)>"
    (run / "summary.json").write_text(json.dumps(summary))
    c = TestClient(create_app(UiSettings(root=tmp_path)))
    for url in ("/", "/runs/x/run"):
        text = c.get(url).text
        assert "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text


def test_scan_skips_hidden_deep_and_symlinked_folders(tmp_path):
    def make(rel):
        (tmp_path / rel / "model").mkdir(parents=True)
        (tmp_path / rel / "model" / "tunesmith.json").write_text("{}")
    make("runs/a/1")
    make(".tunesmith-ui/x/run")                   # the workbench's own (and staging) folders
    make("/".join(["d"] * (runs_pages.MAX_DEPTH + 1)) + "/run")
    make("runs/a/1/inner")                          # inside a run: never searched
    (tmp_path / "linked").symlink_to(tmp_path / "runs")
    found = [p.relative_to(tmp_path).as_posix() for p in runs_pages.find_runs(tmp_path)]
    assert found == ["runs/a/1"]


def test_a_run_file_linked_from_outside_the_root_is_not_shown(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    run = root / "lab" / "draft"
    (run / "model").mkdir(parents=True)
    (run / "model" / "tunesmith.json").write_text("{}")
    outside.mkdir()
    (outside / "summary.json").write_text(json.dumps({"name": "SECRET-NAME", "model": "secret/model"}))
    (outside / "config.yaml").write_text("name: SECRET-CONFIG\nmodel: secret/model\n")
    (run / "summary.json").symlink_to(outside / "summary.json")
    (run / "config.yaml").symlink_to(outside / "config.yaml")
    c = TestClient(create_app(UiSettings(root=root)))
    [row] = c.get("/api/runs").json()["runs"]
    assert (row["name"], row["model"], row["verdict"]) == ("draft", "", "not evaluated")
    for url in ("/", "/runs/lab/draft"):
        assert "SECRET" not in c.get(url).text


def test_walk_reads_no_more_entries_than_its_budget(tmp_path, monkeypatch):
    from tunesmith.cli.ui import scan

    for i in range(300):
        (tmp_path / f"f{i:03}.jsonl").write_text("")
    read = []
    real = scan.os.scandir

    class Counting:  # os.scandir, counting the entries the walk pulls out of it
        def __init__(self, path):
            self.it = real(path)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.it.close()

        def __iter__(self):
            for entry in self.it:
                read.append(entry.name)
                yield entry
    monkeypatch.setattr(scan.os, "scandir", Counting)
    got = list(scan.walk(tmp_path, 3, 50))
    assert len(read) == 50 and len(got) == 50


def test_walk_follows_only_symlinks_that_stay_inside(tmp_path):
    from tunesmith.cli.ui.scan import walk

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "data").mkdir(parents=True)
    outside.mkdir()
    (root / "data" / "a.jsonl").write_text("")
    (outside / "b.jsonl").write_text("")
    (root / "in").symlink_to(root / "data")
    (root / "out").symlink_to(outside)
    (root / "data" / "loop").symlink_to(root)         # a cycle: entered once at most
    (root / "node_modules").mkdir()
    (root / "node_modules" / "c.jsonl").write_text("")
    names = {p.relative_to(root).as_posix() for p, _, _ in walk(root, 4, 1000, follow_inside_symlinks=True)}
    assert {"data/a.jsonl", "in", "data/loop"} <= names
    assert not any(n.startswith(("out", "node_modules")) for n in names)
    plain = {p.relative_to(root).as_posix() for p, _, _ in walk(root, 4, 1000)}
    assert plain == {"data", "data/a.jsonl"}


def test_static_assets_are_served(client):
    js = client.get("/static/ui.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "X-Tunesmith-CSRF" in js.text
    assert client.get("/static/ui.css").status_code == 200
    assert client.get("/static/favicon.svg").status_code == 200
