"""`tunesmith ui`'s watch page: loss curves, the four validation figures per evaluation, overfitting
flags where the detector raised them, live updates while the log grows, and no path outside --root."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from conftest import train_tiny_run
from tunesmith.cli.ui import watch
from tunesmith.cli.ui.app import UiSettings, create_app
from tunesmith.config import TrainConfig
from tunesmith.runs import staging_dir
from tunesmith.train.watch import Watch

FOUR = ("accuracy", "precision_macro", "recall_macro", "f1_macro")


def _client(root: Path) -> TestClient:
    return TestClient(create_app(UiSettings(root=root)))


def _write(path: Path, records: list[dict], mode: str = "w") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode, encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


def _steps(first: int, last: int) -> list[dict]:
    return [{"step": s, "epoch": s / 10, "loss": round(2 / s, 6), "lr": 0.01} for s in range(first, last + 1)]


def _eval(step: int, val_loss: float, train_loss: float, acc: float) -> dict:
    return {"val_loss": val_loss, "accuracy": acc, "precision_macro": acc - 0.05, "recall_macro": acc - 0.1,
            "f1_macro": acc - 0.08, "step": step, "epoch": step / 10, "train_loss": train_loss}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("watch-root")
    train_tiny_run(root, tiny_model)
    return root


def test_a_tiny_run_shows_loss_curves_and_the_four_figures_per_evaluation(tiny_root):
    log = [json.loads(line) for line in (tiny_root / "run" / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "val_loss" in r]
    with _client(tiny_root) as client:
        data = client.get("/api/watch", params={"run": "run"}).json()
        html = client.get("/watch", params={"run": "run"}).text
    assert data["done"] is True and data["folder"] == "run"
    assert [s for s, _ in data["loss"]] == [r["step"] for r in log if "loss" in r] == list(range(1, 7))
    assert [e["step"] for e in data["evals"]] == [3, 6] == [e["step"] for e in evals]
    for shown, logged in zip(data["evals"], evals):
        assert {k: shown[k] for k in (*FOUR, "val_loss", "train_loss")} == \
               {k: logged[k] for k in (*FOUR, "val_loss", "train_loss")}
    assert data["figures"][:4] == list(FOUR)
    assert data["best_step"] in (3, 6)
    for name in (*FOUR, "training loss (step)", "validation loss"):
        assert f"data-series='{name}'" in html, name
    assert html.count("<svg") == 2 and html.count("<tr data-step=") == 2
    assert "src='/static/watch.js'" in html and "data-done='1'" in html


def test_overfitting_flag_is_marked_at_the_step_the_detector_raised_it(tmp_path):
    # Validation loss rises while training loss falls and accuracy drops: the trainer's detector
    # (train/watch.py, default overfit.evals 3) flags step 10; the log is written as fit() writes it.
    rows = [(2, 1.0, 0.9, 0.5), (4, 0.8, 0.6, 0.6), (6, 0.85, 0.4, 0.55), (8, 0.9, 0.2, 0.5), (10, 0.95, 0.1, 0.45)]
    detector, net, records = Watch(TrainConfig(), "accuracy"), torch.nn.Linear(1, 1), []
    for step, val, train, acc in rows:
        records += _steps(step - 1, step)
        record = _eval(step, val, train, acc)
        records += [{"step": step, "overfitting": s} for s in detector.observe(record, net)]
        records.append(record)
    _write(tmp_path / "runs" / "a" / "train_log.jsonl", records)
    with _client(tmp_path) as client:
        data = client.get("/api/watch", params={"run": "runs/a"}).json()
        html = client.get("/watch", params={"run": "runs/a"}).text
    assert [(f["signal"], f["step"]) for f in data["flags"]] == [("widening_gap", 10), ("metric_falling", 10)]
    assert html.count("class='flag' data-step='10' data-signal='widening_gap'") == 2  # loss and figures charts
    assert "<tr data-step='10' class=flagged>" in html and "<tr data-step='8'>" in html
    assert "overfitting at step 10 (widening_gap)" in html and "class='flag' data-step='8'" not in html
    assert data["done"] is False and "data-done='0'" in html


def test_a_growing_log_shows_new_points_on_the_next_poll(tmp_path):
    log = tmp_path / "job" / "train_log.jsonl"
    _write(log, _steps(1, 4) + [_eval(4, 0.9, 1.0, 0.4)])
    with _client(tmp_path) as client:
        first = client.get("/api/watch", params={"run": "job"}).json()
        _write(log, _steps(5, 8) + [_eval(8, 0.7, 0.8, 0.6)], mode="a")
        with open(log, "a", encoding="utf-8") as f:  # a line the trainer is still writing
            f.write('{"step": 9, "loss": 0.')
        second = client.get("/api/watch", params={"run": "job"}).json()
        with open(log, "a", encoding="utf-8") as f:
            f.write('5, "lr": 0.01}\n')
        third = client.get("/api/watch", params={"run": "job"}).json()
    assert [s for s, _ in first["loss"]] == [1, 2, 3, 4] and [e["step"] for e in first["evals"]] == [4]
    assert [s for s, _ in second["loss"]] == list(range(1, 9)) and [e["step"] for e in second["evals"]] == [4, 8]
    assert second["evals"][1]["accuracy"] == 0.6 and "data-series='accuracy' data-points='2'" in second["html"]
    assert third["loss"][-1] == [9, 0.5] and third["unreadable_lines"] == []
    assert not third["done"] and third["last_step"] == 9


def test_a_resumed_run_that_rewrote_its_log_is_read_again(tmp_path):
    log = tmp_path / "r" / "train_log.jsonl"
    _write(log, _steps(1, 6))
    with _client(tmp_path) as client:
        assert len(client.get("/api/watch", params={"run": "r"}).json()["loss"]) == 6
        kept = tmp_path / "r" / "kept.tmp"  # TrainLog(keep_until=3) writes the kept records anew, then appends
        _write(kept, _steps(1, 3))
        os.replace(kept, log)
        assert [s for s, _ in client.get("/api/watch", params={"run": "r"}).json()["loss"]] == [1, 2, 3]


def test_staging_and_final_names_find_each_other(tmp_path):
    final = tmp_path / "runs" / "b"
    staging = staging_dir(final)
    _write(staging / "train_log.jsonl", _steps(1, 2))
    with _client(tmp_path) as client:
        training = client.get("/api/watch", params={"run": "runs/b"}).json()
        assert training["folder"] == "runs/.b.partial" and not training["done"]
        staging.rename(final)  # the run completed and was renamed into place
        (final / "train.json").write_text(json.dumps({"best": {"step": 2}, "overfitting": []}))
        finished = client.get("/api/watch", params={"run": "runs/.b.partial"}).json()
    assert finished["folder"] == "runs/b" and finished["done"] and finished["best_step"] == 2


@pytest.mark.parametrize("rel", ["../outside", "runs/../../outside", "/etc", "link", "link/x", "nothing"])
def test_paths_outside_the_root_or_without_a_log_are_refused(tmp_path, rel):
    root, outside = tmp_path / "root", tmp_path / "outside"
    _write(outside / "train_log.jsonl", _steps(1, 2))
    _write(outside / "x" / "train_log.jsonl", _steps(1, 2))
    root.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    with _client(root) as client:
        for url in ("/api/watch", "/watch"):
            answer = client.get(url, params={"run": rel})
            assert answer.status_code == 404, (url, answer.text)
            assert set(answer.json()) == {"error"} and str(outside) not in answer.text


def test_long_logs_are_thinned_and_text_from_the_log_is_escaped(tmp_path):
    evil = "<script>alert(1)</script>"
    records = _steps(1, 5000) + [{"step": 5000, "val_loss": 0.5, evil: 0.5, "accuracy": 0.9, "train_loss": 0.4},
                                 {"step": 5000, "overfitting": {"signal": evil, "step": 5000, "detail": evil}}]
    records[10]["loss"] = math.nan  # a diverged step: JSON has no NaN
    _write(tmp_path / "long" / "train_log.jsonl", records)
    (tmp_path / "long" / "bad.txt").write_text("")
    with open(tmp_path / "long" / "train_log.jsonl", "a", encoding="utf-8") as f:
        f.write("not json\n")
    with _client(tmp_path) as client:
        answer = client.get("/api/watch", params={"run": "long"})
        html = client.get("/watch", params={"run": "long"}).text
    data = answer.json()
    assert len(data["loss"]) == watch.MAX_POINTS and data["loss"][0][0] == 1 and data["loss"][-1][0] == 5000
    assert [None] == [v for s, v in data["loss"] if s == 11]
    assert data["unreadable_lines"] == [5003]
    assert evil not in html and evil not in data["html"] and "&lt;script&gt;" in html
    assert "Lines 5003 of train_log.jsonl are not log records" in html


def test_reads_are_bounded_per_poll_and_stored_points_are_thinned(tmp_path, monkeypatch):
    monkeypatch.setattr(watch, "READ_CHUNK", 2000)
    monkeypatch.setattr(watch, "STORE_POINTS", 100)
    monkeypatch.setattr(watch, "MAX_BAD_LINES", 5)
    log = tmp_path / "big" / "train_log.jsonl"
    _write(log, _steps(1, 300))
    with open(log, "a", encoding="utf-8") as f:
        f.write('{"step": 301, "x": "' + "y" * 5000 + '"}\n')  # longer than a read: one unreadable line
        f.write("junk\n" * 20)
    _write(log, _steps(302, 310), mode="a")
    (tmp_path / "big" / "train.json").write_text(json.dumps({"best": {"step": 3}}))
    polls = []
    with _client(tmp_path) as client:
        while not (polls and polls[-1]["done"]) and len(polls) < 100:
            polls.append(client.get("/api/watch", params={"run": "big"}).json())
    assert len(polls) > 5 and not polls[0]["done"]  # finished, but not yet read to the end: still polled
    last = polls[-1]
    assert last["loss"][0][0] == 1 and last["loss"][-1][0] == 310 and len(last["loss"]) <= 100
    parsed = watch._CACHE[str(log.resolve())].parsed
    assert len(parsed.steps) <= 100 and parsed.bad_lines == [301, 302, 303, 304, 305]
    assert last["unreadable_lines"] == [301, 302, 303] and last["lines"] == 330


def test_polling_ends_when_the_job_is_stopped_or_the_log_goes_idle(tmp_path):
    from tunesmith.cli.ui.jobs import Job

    out = tmp_path / "runs" / "c"
    log = staging_dir(out) / "train_log.jsonl"
    _write(log, _steps(1, 3))
    with _client(tmp_path) as client:
        manager = client.app.state.ui.jobs
        job = Job("j1", "c", tmp_path / "c.yaml", out, tmp_path / ".tunesmith-ui" / "jobs" / "j1")
        manager.jobs[job.id] = job
        old = log.stat().st_mtime - 11 * 60
        os.utime(log, (old, old))
        running = client.get("/api/watch", params={"run": "runs/c"}).json()
        job.state = "stopped"
        stopped = client.get("/api/watch", params={"run": "runs/c"}).json()
        del manager.jobs[job.id]
        idle = client.get("/api/watch", params={"run": "runs/c"}).json()
        _write(log, _steps(4, 4), mode="a")
        fresh = client.get("/api/watch", params={"run": "runs/c"}).json()
    assert not running["done"]  # an idle log with its job still running is still watched
    assert stopped["done"] and stopped["ended"] == "stopped" and "is stopped" in stopped["status"]
    assert idle["done"] and idle["ended"] == "idle" and "has not changed for 11 minutes" in idle["status"]
    assert not fresh["done"] and fresh["ended"] is None


def test_the_watch_and_jobs_modules_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; import tunesmith.cli.ui.watch, tunesmith.cli.ui.jobs; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    answer = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0, answer.stderr[-2000:]


def test_log_lines_no_chart_can_hold_are_unreadable_not_a_500(tmp_path):
    """A step past what a float holds, a boolean step, a loss of 10**400, and a line nested past the
    stack: each is an unreadable line; the steps around them are charted."""
    log = tmp_path / "r" / "train_log.jsonl"
    _write(log, _steps(1, 2))
    with open(log, "a", encoding="utf-8") as f:
        f.write('{"step": %d, "loss": 2.0}\n{"step": true, "loss": 1.0}\n{"step": 3, "loss": %d}\n%s\n'
                % (10 ** 400, 10 ** 400, "[" * 100_000 + "]" * 100_000))
    _write(log, _steps(4, 4), mode="a")
    with _client(tmp_path) as client:
        data = client.get("/api/watch", params={"run": "r"}).json()
        assert client.get("/watch", params={"run": "r"}).status_code == 200
    assert [s for s, _ in data["loss"]] == [1, 2, 4] and data["last_step"] == 4
    assert data["unreadable_lines"] == [3, 4, 6]
