"""`tunesmith ui` New run form and jobs: schema form, validation with the CLI's located errors, a tiny
job started, streamed (SSE) and finished, the job limit, stop killing the process group, CSRF."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import make_texts, write_jsonl
from tunesmith.cli.ui.app import UiSettings, create_app
from tunesmith.runs import is_run_dir


def _client(root: Path, max_jobs: int = 1) -> tuple[TestClient, str]:
    app = create_app(UiSettings(root=root, max_jobs=max_jobs))
    return TestClient(app), app.state.ui.csrf_token


def _post(client: TestClient, token: str, url: str, values: dict | None = None):
    return client.post(url, json={"values": values or {}}, headers={"X-Tunesmith-CSRF": token})


def _tiny_values(model: Path) -> dict:
    return {"name": "tiny", "model": str(model), "task.type": "classification", "task.instruction": "Classify.",
            "data.train": "data/train.jsonl", "data.test": "data/test.jsonl", "data.validation": "0.2",
            "objective.metric": "accuracy", "objective.target": "0.0", "train.method": "lora",
            "train.max_steps": "2", "train.eval_every": "1", "train.batch_size": "4", "train.learning_rate": "0.01",
            "train.epochs": "2.0", "eval.latency_samples": "1"}


@pytest.fixture()
def root(tmp_path) -> Path:
    folder = tmp_path / "root"
    (folder / "data").mkdir(parents=True)
    write_jsonl(folder / "data" / "train.jsonl", make_texts(30, 1))
    write_jsonl(folder / "data" / "test.jsonl", make_texts(9, 2))
    return folder


def _group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def test_form_lists_data_files_under_root_and_not_outside(root, tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    write_jsonl(outside / "outside.jsonl", make_texts(2, 1))
    (root / "linked").symlink_to(outside)                      # a folder link that leaves the root
    (root / "leak.jsonl").symlink_to(outside / "outside.jsonl")  # a file link that leaves the root
    (root / ".hidden").mkdir()
    write_jsonl(root / ".hidden" / "h.jsonl", [])
    (root / "notes.txt").write_text("x")
    client, _ = _client(root)
    page = client.get("/new")
    assert page.status_code == 200
    assert "data/train.jsonl" in page.text and "data/test.jsonl" in page.text
    for absent in ("outside.jsonl", "leak.jsonl", "h.jsonl", "notes.txt"):
        assert absent not in page.text
    # generated from the schema: method choices, a nested method group, documented defaults
    assert "train.lora.r" in page.text and "prompt_tuning" in page.text and "default: 16" in page.text


def test_validate_gives_the_cli_error_line(root, tiny_model):
    from typer.testing import CliRunner

    from tunesmith.cli import app

    client, token = _client(root)
    reply = _post(client, token, "/api/validate", {**_tiny_values(tiny_model), "train.epochs": "-1"}).json()
    assert reply["ok"] is False
    assert "train.epochs" in reply["error"] and reply["error"].startswith("error: ")
    draft = root / reply["draft"]
    assert f"{draft}:" in reply["error"]  # file:line
    cli = CliRunner().invoke(app, ["run", str(draft)])
    assert cli.exit_code == 2
    assert reply["error"] in cli.output.splitlines()


def test_validate_ok_for_a_good_config(root, tiny_model):
    client, token = _client(root)
    reply = _post(client, token, "/api/validate", _tiny_values(tiny_model)).json()
    assert reply == {**reply, "ok": True, "error": None}
    assert "../../data/train.jsonl" in reply["yaml"]


def test_state_changing_routes_need_the_csrf_token(root, tiny_model):
    client, _ = _client(root)
    for url in ("/api/validate", "/api/jobs", "/api/estimate"):
        assert client.post(url, json={"values": _tiny_values(tiny_model)}).status_code == 403
    assert client.post("/api/jobs", json={"values": _tiny_values(tiny_model)},
                       headers={"X-Tunesmith-CSRF": "wrong"}).status_code == 403
    assert not (root / ".tunesmith-ui" / "configs").exists()


def _events(client: TestClient, job_id: str) -> list[dict]:
    events = []
    with client.stream("GET", f"/api/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    return events


def test_tiny_job_streams_progress_and_finishes(root, tiny_model):
    client, token = _client(root, max_jobs=1)
    reply = _post(client, token, "/api/jobs", _tiny_values(tiny_model))
    assert reply.status_code == 200, reply.text
    job_id = reply.json()["id"]
    second = _post(client, token, "/api/jobs", _tiny_values(tiny_model))
    assert second.status_code == 409 and "already running" in second.text
    events = _events(client, job_id)
    kinds = [e["type"] for e in events]
    assert "progress" in kinds and "validation" in kinds
    progress = [e for e in events if e["type"] == "progress"]
    assert progress[-1]["step"] == 2 and progress[-1]["total"] == 2
    final = events[-1]
    assert final["type"] == "status" and final["state"] == "done" and final["exit_code"] in (0, 3), \
        (root / ".tunesmith-ui" / "jobs" / job_id / "log.txt").read_text()[-2000:]
    assert is_run_dir(root / final["out"]) and final["run_dir"] == final["out"]
    configs = list((root / ".tunesmith-ui" / "configs").glob("tiny-*.yaml"))
    assert len(configs) == 1
    assert client.get(f"/jobs/{job_id}").status_code == 200
    assert client.get(f"/api/jobs/{job_id}").json()["state"] == "done"


def test_stop_kills_the_whole_process_group(root):
    client, token = _client(root)
    manager = client.app.state.ui.jobs
    # a child that starts a grandchild of its own: both are in the job's process group
    code = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    job = manager.launch([[sys.executable, "-c", code]], root / "project.yaml", root / "runs" / "x", "x")
    deadline = time.time() + 20
    while len(_group_pids(job.pgid)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert len(_group_pids(job.pgid)) == 2
    assert _post(client, token, f"/api/jobs/{job.id}/stop").status_code == 200
    while (job.state == "running" or _group_pids(job.pgid)) and time.time() < deadline:
        time.sleep(0.1)
    assert job.state == "stopped" and _group_pids(job.pgid) == []
    # nothing was checkpointed: the CLI could not resume it, and the UI says so
    resumed = _post(client, token, f"/api/jobs/{job.id}/resume")
    assert resumed.status_code == 409 and "no interrupted run to resume" in resumed.text


def test_shutdown_stops_running_children(root):
    client, _ = _client(root, max_jobs=2)
    manager = client.app.state.ui.jobs
    job = manager.launch([[sys.executable, "-c", "import time; time.sleep(60)"]], root / "p.yaml",
                         root / "runs" / "y", "y")
    manager.shutdown(grace=5)
    deadline = time.time() + 10
    while job.state == "running" and time.time() < deadline:
        time.sleep(0.05)
    assert job.state == "stopped" and _group_pids(job.pgid) == []


def test_estimate_is_selects_figure_for_this_method(root, tiny_model):
    from tunesmith.models.estimate import detect

    client, token = _client(root)
    reply = _post(client, token, "/api/estimate", _tiny_values(tiny_model)).json()
    assert reply["ok"] is True, reply
    assert reply["method"] == "lora" and reply["estimate"] == reply["estimates"]["lora"]
    assert reply["estimate"]["memory_mb"] > 0 and reply["hardware"]["name"] == detect().name
    bad = _post(client, token, "/api/estimate", {**_tiny_values(tiny_model), "train.epochs": "-1"}).json()
    assert bad["ok"] is False and "train.epochs" in bad["error"]
