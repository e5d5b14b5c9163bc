"""`tunesmith ui` New run form and jobs: schema form, validation with the CLI's located errors, a tiny
job started, streamed (SSE) and finished, the job limit, stop killing the process group, CSRF."""

from __future__ import annotations

import json
import os
import sys
import threading
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


def test_a_model_path_relative_to_the_root_is_found_by_the_form_as_by_the_run(root, tiny_model):
    """Jobs start in the root; the form's estimate runs in the workbench's own folder: a relative
    checkpoint path is written absolute, so both find the same model."""
    import shutil

    shutil.copytree(tiny_model, root / "models" / "tiny")
    client, token = _client(root)
    values = {**_tiny_values(tiny_model), "model": "models/tiny"}
    reply = _post(client, token, "/api/estimate", values).json()
    assert reply["ok"] is True, reply
    yaml_text = _post(client, token, "/api/validate", values).json()["yaml"]
    assert f"model: {(root / 'models' / 'tiny').resolve()}" in yaml_text


def _outside_paths(root: Path, tmp_path: Path) -> dict[str, str]:
    """Form values that would read a file outside the root, each by a different route out."""
    secret = tmp_path / "outside"
    secret.mkdir(exist_ok=True)
    write_jsonl(secret / "secret.jsonl", make_texts(6, 3))
    (root / "leak.jsonl").symlink_to(secret / "secret.jsonl")
    (root / "linked").symlink_to(secret)
    return {"relative ..": "../outside/secret.jsonl", "absolute": str(secret / "secret.jsonl"),
            "home": "~/secret.jsonl", "file symlink": "leak.jsonl", "folder symlink": "linked/secret.jsonl",
            "glob over a symlink": "*.jsonl",
            "** through a folder symlink": "**/secret.jsonl"}  # Path.glob does not follow it; the loader does


@pytest.mark.parametrize("key", ["data.train", "data.corrections", "train.init_from"])
def test_form_refuses_paths_that_leave_the_root(root, tmp_path, tiny_model, key):
    client, token = _client(root)
    for how, path in _outside_paths(root, tmp_path).items():
        values = {**_tiny_values(tiny_model), key: path}
        for url in ("/api/validate", "/api/jobs", "/api/estimate"):
            reply = _post(client, token, url, values)
            assert reply.status_code == 400, (how, url, reply.text)
            assert f"{key}: '{path}' is not a path inside" in reply.text, (how, url, reply.text)
    assert not (root / ".tunesmith-ui").exists()  # no draft, no config written
    assert client.app.state.ui.jobs.jobs == {}     # nothing started


def test_form_refusal_does_not_say_whether_an_outside_file_exists(root, tmp_path, tiny_model):
    client, token = _client(root)
    (tmp_path / "there.jsonl").write_text("{}\n")
    template = {**_tiny_values(tiny_model), "task.type": "chat"}
    answers = [_post(client, token, "/api/validate", {**template, "task.chat_template": f"../{name}.jinja"}).json()
               for name in ("there", "missing")]
    assert [a["ok"] for a in answers] == [False, False]
    assert answers[0]["error"].replace("there", "X") == answers[1]["error"].replace("missing", "X")


@pytest.mark.parametrize("key", ["eval.judge.endpoint", "eval.harness.include_path", "benchmarks",
                                 "task.chat_template.x", "data.columns"])
def test_form_refuses_keys_it_does_not_show(root, tiny_model, key):
    client, token = _client(root)
    values = {**_tiny_values(tiny_model), key: "https://evil.example/v1"}
    for url in ("/api/validate", "/api/jobs"):
        reply = _post(client, token, url, values)
        assert reply.status_code == 400 and f"{key}: not a setting of the New run form" in reply.text, reply.text
    assert not (root / ".tunesmith-ui").exists() and client.app.state.ui.jobs.jobs == {}


def test_form_keeps_paths_inside_the_root_and_hub_data(root, tiny_model):
    client, token = _client(root)
    (root / "more").symlink_to(root / "data")  # a link that stays inside is fine
    values = {**_tiny_values(tiny_model), "data.train": "more/train.jsonl", "data.test": "hf://nosuch/x/test"}
    reply = _post(client, token, "/api/validate", values).json()
    assert "../../more/train.jsonl" in reply["yaml"] and "hf://nosuch/x/test" in reply["yaml"]


def test_new_run_form_offers_and_prefills_corrections(root):
    saved = root / ".tunesmith-ui" / "corrections"
    saved.mkdir(parents=True)
    (saved / "run-1.jsonl").write_text("")
    write_jsonl(root / "data" / "label-corrections.jsonl", [])
    client, _ = _client(root)
    page = client.get("/new").text
    assert "name='data.corrections'" in page
    assert "value='.tunesmith-ui/corrections/run-1.jsonl'" in page and "data/label-corrections.jsonl" in page
    filled = client.get("/new", params={"corrections": ".tunesmith-ui/corrections/run-1.jsonl"}).text
    assert ("name='data.corrections' id='f-data-corrections' list='files-f-data-corrections' "
            "value='.tunesmith-ui/corrections/run-1.jsonl'") in filled
    outside = client.get("/new", params={"corrections": "../x.jsonl"}).text
    assert "value='../x.jsonl'" not in outside


def test_a_job_from_the_form_applies_its_corrections(root, tiny_model):
    train = [json.loads(line) for line in (root / "data" / "train.jsonl").read_text().splitlines()]
    saved = root / ".tunesmith-ui" / "corrections"
    saved.mkdir(parents=True)
    write_jsonl(saved / "fixes.jsonl", [{"text": train[7]["text"], "given_label": train[7]["label"],
                                         "action": "drop"}])
    client, token = _client(root)
    values = {**_tiny_values(tiny_model), "data.corrections": ".tunesmith-ui/corrections/fixes.jsonl",
              "train.max_steps": "1"}
    reply = _post(client, token, "/api/jobs", values)
    assert reply.status_code == 200, reply.text
    final = _events(client, reply.json()["id"])[-1]
    assert final["state"] == "done", final
    changes = [json.loads(line) for line in (root / final["out"] / "data" / "changes.jsonl").read_text().splitlines()]
    assert [c["action"] for c in changes if c.get("reason") == "correction"] == ["drop"]


# -- the job runner (review fixes): restart, concurrent resume, failed spawn, streams ---------------------------

def _wait(predicate, seconds: float = 20.0) -> None:
    deadline = time.time() + seconds
    while not predicate() and time.time() < deadline:
        time.sleep(0.05)
    assert predicate()


def _finished_job(manager, root: Path, name: str = "f"):
    job = manager.launch([[sys.executable, "-c", "pass"]], root / "p.yaml", root / "runs" / name, name)
    _wait(lambda: job.state == "done")
    return job


def test_concurrent_resumes_start_one_trainer(root, monkeypatch):
    from tunesmith.cli.ui import jobs
    from tunesmith.train import checkpoint

    manager = jobs.JobManager(root, max_jobs=2)
    job = _finished_job(manager, root)

    def slow_interrupted_run(out):  # both clicks pass the first state check before either launches
        time.sleep(0.3)
        return out, out

    monkeypatch.setattr(jobs, "interrupted_run", slow_interrupted_run)
    monkeypatch.setattr(checkpoint, "list_checkpoints", lambda folder: [folder / "checkpoint-1"])
    monkeypatch.setattr(jobs, "_tunesmith", lambda *a: [sys.executable, "-c", "import time; time.sleep(30)"])
    answers = []

    def click():
        try:
            answers.append(manager.resume(job.id).state)
        except jobs.HTTPException as e:
            answers.append(e.status_code)

    clicks = [threading.Thread(target=click) for _ in range(2)]
    for t in clicks:
        t.start()
    for t in clicks:
        t.join()
    assert sorted(answers, key=str) == [409, "running"] and manager.running() == 1
    manager.stop(job.id)
    _wait(lambda: job.state == "stopped")


def test_a_failed_second_command_fails_the_job_and_frees_its_slot(root):
    from tunesmith.cli.ui import jobs

    manager = jobs.JobManager(root, max_jobs=1)
    missing = str(root / "no-such-tunesmith")
    job = manager.launch([[sys.executable, "-c", "pass"], [missing, "eval"]], root / "p.yaml", root / "runs" / "e", "e")
    _wait(lambda: job.state != "running", 10)
    assert job.state == "failed" and manager.running() == 0
    assert f"error: could not start {missing}" in job.log.read_text()
    _finished_job(manager, root, "next")  # the slot is free


def test_a_job_is_ended_on_disk_before_it_is_seen_ended(root, monkeypatch):
    from tunesmith import fsio
    from tunesmith.cli.ui import jobs

    write = fsio.write_json

    def slow_write(path, data):  # a slow disk: the record lands well after the process ended
        if data.get("state") == "done":
            time.sleep(0.5)
        write(path, data)

    monkeypatch.setattr(jobs.fsio, "write_json", slow_write)
    done = _finished_job(jobs.JobManager(root), root, "slow")
    assert json.loads((done.folder / "job.json").read_text())["state"] == "done"


def _record(job_id: str, state: str, pid: int | None, start: str | None, out: Path) -> dict:
    return {"id": job_id, "name": "n", "config": str(out.parent / "p.yaml"), "out": str(out), "commands": [],
            "command": ["x"], "pid": pid, "pgid": pid, "pid_start": start, "state": state, "exit_code": None,
            "started": 1.0, "ended": None}


def test_jobs_survive_a_restart(root, tmp_path):
    import os
    import subprocess

    from tunesmith import fsio
    from tunesmith.cli.ui import jobs

    first = jobs.JobManager(root)
    done = _finished_job(first, root, "d")
    assert json.loads((done.folder / "job.json").read_text())["state"] == "done"
    folder = root / ".tunesmith-ui" / "jobs"
    # A job a workbench started: `python -m tunesmith ...` leading its own session (a stand-in module that sleeps).
    (tmp_path / "fake" / "tunesmith").mkdir(parents=True)
    (tmp_path / "fake" / "tunesmith" / "__main__.py").write_text("import time\ntime.sleep(60)\n")
    (tmp_path / "fake" / "tunesmith" / "__init__.py").write_text("")
    command = [sys.executable, "-m", "tunesmith", "run", "p.yaml"]
    job = subprocess.Popen(command, start_new_session=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "fake")})
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)  # any other process
    try:
        _wait(lambda: jobs._start_time(job.pid) is not None)
        gone = subprocess.Popen(["true"])
        gone.wait()
        fsio.write_json(folder / "20990101-000000-aaaaaa" / "job.json",
                        _record("20990101-000000-aaaaaa", "running", gone.pid, "1", root / "runs" / "gone"))
        orphan = _record("20990101-000000-bbbbbb", "running", job.pid, jobs._start_time(job.pid), root / "runs" / "o")
        orphan.update(command=command, pgid=bystander.pid)  # a recorded group other than its own is never used
        fsio.write_json(folder / "20990101-000000-bbbbbb" / "job.json", orphan)
        fsio.write_json(folder / "20990101-000000-cccccc" / "job.json",  # a recycled pid: another start time
                        _record("20990101-000000-cccccc", "running", job.pid, "12345", root / "runs" / "r"))
        fsio.write_json(folder / "20990101-000000-eeeeee" / "job.json",  # a forged record naming another process
                        _record("20990101-000000-eeeeee", "running", bystander.pid, jobs._start_time(bystander.pid),
                                root / "runs" / "f"))
        (folder / "20990101-000000-dddddd").mkdir()
        (folder / "20990101-000000-dddddd" / "job.json").write_text("{not json")
        client, token = _client(root)  # a new workbench on the same root
        listed = {j["id"]: j["state"] for j in client.get("/api/jobs").json()["jobs"]}
        assert listed == {done.id: "done", "20990101-000000-aaaaaa": "interrupted",
                          "20990101-000000-bbbbbb": "orphaned", "20990101-000000-cccccc": "interrupted",
                          "20990101-000000-eeeeee": "interrupted"}
        refused = _post(client, token, "/api/jobs/20990101-000000-cccccc/stop")
        assert refused.status_code == 409 and job.poll() is None  # the recycled pid is never signalled
        assert _post(client, token, "/api/jobs/20990101-000000-eeeeee/stop").status_code == 409
        assert _post(client, token, "/api/jobs/20990101-000000-bbbbbb/stop").status_code == 200
        assert job.wait(10) == -15
        _wait(lambda: client.get("/api/jobs/20990101-000000-bbbbbb").json()["state"] == "stopped")
        assert bystander.poll() is None
    finally:
        for process in (job, bystander):
            process.kill()
            process.wait()
    saved = json.loads((folder / "20990101-000000-aaaaaa" / "job.json").read_text())
    assert saved["state"] == "interrupted"


def test_a_ui_folder_linked_out_of_the_root_is_not_written_through(root, tmp_path):
    from tunesmith.cli.ui import jobs

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / ".tunesmith-ui").symlink_to(outside, target_is_directory=True)
    manager = jobs.JobManager(root)
    with pytest.raises(jobs.HTTPException) as refused:
        manager.launch([[sys.executable, "-c", "pass"]], root / "p.yaml", root / "runs" / "l", "l")
    assert refused.value.status_code == 409 and "outside the root" in refused.value.detail
    assert list(outside.iterdir()) == [] and manager.running() == 0



def test_a_run_folder_linked_out_of_the_root_is_not_written_through(root, tmp_path, tiny_model):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "runs").mkdir(exist_ok=True)
    (root / "runs" / "tiny").symlink_to(outside, target_is_directory=True)  # runs/NAME of the form's name
    client, token = _client(root)
    refused = _post(client, token, "/api/jobs", _tiny_values(tiny_model))
    assert refused.status_code == 409 and "leads outside it" in refused.text, refused.text
    assert list(outside.iterdir()) == []
    assert list((root / ".tunesmith-ui" / "configs").glob("*.yaml")) == []  # nothing half-written

def _raw_events(client: TestClient, job_id: str, last_id: str | None = None) -> list[tuple[str | None, dict]]:
    headers = {"Last-Event-ID": last_id} if last_id else {}
    events, event_id = [], None
    with client.stream("GET", f"/api/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("id: "):
                event_id = line[len("id: "):]
            elif line.startswith("data: "):
                events.append((event_id, json.loads(line[len("data: "):])))
                event_id = None
    return events


def test_a_reconnecting_stream_continues_after_its_last_event_id(root):
    client, _ = _client(root)
    manager = client.app.state.ui.jobs
    job = _finished_job(manager, root, "s")
    job.out.mkdir(parents=True)
    write_jsonl(job.out / "train_log.jsonl", [{"step": s, "loss": 1.0 / s} for s in range(1, 6)])
    first = [(i, e) for i, e in _raw_events(client, job.id) if e["type"] == "progress"]
    assert [e["step"] for _, e in first] == [1, 2, 3, 4, 5] and all(i for i, _ in first)
    again = [e["step"] for _, e in _raw_events(client, job.id, first[1][0]) if e["type"] == "progress"]
    assert again == [3, 4, 5]  # not replayed from the start
    rewritten = [e["step"] for _, e in _raw_events(client, job.id, "1-10") if e["type"] == "progress"]
    assert rewritten == [1, 2, 3, 4, 5]  # another file (inode): from its start
    slots = [manager.open_stream(job.id) for _ in range(8)]
    assert client.get(f"/api/jobs/{job.id}/events").status_code == 429
    slots[0]()
    slots[0]()  # counted once only
    assert manager.streams[job.id] == 7
    assert [e["type"] for _, e in _raw_events(client, job.id)][-1] == "status"
    assert manager.streams[job.id] == 7


def test_required_fields_show_no_default(root):
    page = _client(root)[0].get("/new").text
    assert "PydanticUndefined" not in page
    assert "id='f-name' value='' placeholder='required'" in page


def test_form_refuses_a_glob_through_a_link_loop_at_once(root, tiny_model):
    """Two links back up under the root made the form's ** check walk for ever (a worker thread per
    request): refused as a loop, a 400 naming the key."""
    (root / "data" / "a").symlink_to("..")
    (root / "data" / "b").symlink_to("..")
    client, token = _client(root)
    reply = _post(client, token, "/api/validate", {**_tiny_values(tiny_model), "data.train": "**/*.csv"})
    assert reply.status_code == 400 and "data.train: '**/*.csv' cannot be matched" in reply.text, reply.text
    assert "symbolic link to a folder above it" in reply.text
