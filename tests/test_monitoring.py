"""Drift and alerting: `tunesmith monitor` flags shifted traffic and not in-distribution traffic;
the generated alert rules pass `promtool check rules` and `promtool test rules`; a real Prometheus
scrapes a running server on loopback and finds tunesmith's series."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import threading
import time
import urllib.request

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from conftest import PROJECT, make_texts, write_jsonl
from tunesmith.cli import app as cli
from tunesmith.config import ServeConfig
from tunesmith.serve.app import create_app
from tunesmith.serve.service import load_service

runner = CliRunner()
NEED_PROMETHEUS = os.environ.get("TUNESMITH_REQUIRE_PROMETHEUS") == "1"
SHIFTED = ["The committee postponed the vote on the harbour bridge until the engineers finish the survey",
           "Heavy snowfall closed three mountain passes and stranded dozens of lorries overnight",
           "Researchers sequenced the genome of a rare orchid found only on two volcanic islands",
           "The orchestra rehearsed the symphony twice before the premiere at the new concert hall",
           "Local farmers reported an unusually early harvest of apricots after the warm spring"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("monitor")
    write_jsonl(folder / "train.jsonl", make_texts(60, 1))
    write_jsonl(folder / "test.jsonl", make_texts(12, 2))
    (folder / "project.yaml").write_text(PROJECT.format(model=tiny_model, method="lora"), encoding="utf-8")
    result = runner.invoke(cli, ["run", str(folder / "project.yaml"), "--out", str(folder / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    return folder / "run"


def _monitor(run_dir, window: int) -> dict:
    result = runner.invoke(cli, ["monitor", str(run_dir), "--window", str(window), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_monitor_flags_shifted_traffic_and_not_in_distribution_traffic(run_dir):
    app = create_app(load_service(run_dir), ServeConfig(), [], run_dir / "monitor" / "requests.db")
    rng = random.Random(0)
    with TestClient(app) as c:
        usual = [r["text"] for r in make_texts(60, 7)]
        assert c.post("/v1/classify", json={"texts": usual}).status_code == 200
        calm = _monitor(run_dir, 60)
        shifted = [f"{rng.choice(SHIFTED)} {i}" for i in range(60)]
        assert c.post("/v1/classify", json={"texts": shifted}).status_code == 200
        watch = app.state.watch
    watch.close()  # the update the 120 logged requests started (serve.drift.update_every 50)
    assert watch.last is not None and "tunesmith_drift_score{signal=\"embedding\"}" in \
        app.state.metrics.exposition().decode()
    drifted = _monitor(run_dir, 60)
    assert calm["requests"] == 60 and not calm["drift"] and calm["recommendation"] == "no action", calm
    assert drifted["drift"] and drifted["recommendation"] in ("retrain", "investigate"), drifted
    assert drifted["signals"]["embedding"]["drift"] and drifted["signals"]["length"]["drift"]
    assert drifted["signals"]["embedding"]["score"] > 4 * calm["signals"]["embedding"]["score"]
    text = runner.invoke(cli, ["monitor", str(run_dir), "--window", "60"]).output
    assert "DRIFT embedding" in text and "recommendation:" in text
    # Another run reading this log (`serve --registry` shares the first run's): none of these requests is
    # its own, so none is its drift (the labels and confidences were another model's).
    other = run_dir.parent / "other-run"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("monitor"))
    result = runner.invoke(cli, ["monitor", str(other), "--db", str(run_dir / "monitor" / "requests.db"), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["requests"] == 0, result.output
    # The window is validated like the config key it overrides (serve.drift.window >= 10).
    for bad in ("3", "0"):  # 0 was taken for "not given" and ran with the config's window
        small = runner.invoke(cli, ["monitor", str(run_dir), "--window", bad])
        assert small.exit_code == 2 and f"error: bad window {bad}" in small.output and "--window" in small.output


def test_monitor_needs_a_request_log(tmp_path):
    result = runner.invoke(cli, ["monitor", str(tmp_path)])
    assert result.exit_code == 2 and "error: not a trained run directory" in result.output


@pytest.fixture(scope="module")
def promtool():
    tool = shutil.which("promtool")
    if tool is None:
        if NEED_PROMETHEUS:
            pytest.fail("promtool not found (Debian package prometheus); make test installs it")
        pytest.skip("promtool not installed")
    return tool


def test_generated_alert_rules_pass_promtool(run_dir, tmp_path, promtool):
    result = runner.invoke(cli, ["monitor", str(run_dir), "--alerts", str(tmp_path), "--window", "60"])
    assert result.exit_code == 0, result.output
    checked = subprocess.run([promtool, "check", "rules", str(tmp_path / "alerts.yml")], capture_output=True, text=True)
    assert checked.returncode == 0 and "5 rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], capture_output=True, text=True,
                            cwd=tmp_path)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    rules = yaml.safe_load((tmp_path / "alerts.yml").read_text())["groups"][0]["rules"]
    latency = next(r for r in rules if r["alert"] == "TunesmithLatencyP95High")
    assert latency["expr"].endswith("> 1")  # no latency constraint in the config: 1000 ms
    dashboard = json.loads((tmp_path / "grafana-dashboard.json").read_text())
    assert len(dashboard["panels"]) >= 6
    config = subprocess.run([promtool, "check", "config", "--syntax-only", str(tmp_path / "prometheus.yml")],
                            capture_output=True, text=True)
    assert config.returncode == 0, config.stdout + config.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prometheus_scrapes_the_server(run_dir, tmp_path, promtool):
    import uvicorn

    binary = shutil.which("prometheus")
    assert binary, "prometheus binary missing next to promtool"
    port, prom_port = _free_port(), _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(load_service(run_dir), ServeConfig(), [], None),
                                           host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    (tmp_path / "prometheus.yml").write_text(
        f"global: {{scrape_interval: 1s}}\nscrape_configs:\n  - job_name: tunesmith\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n")
    prom = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not server.started:
            time.sleep(0.05)
        body = json.dumps({"text": "red card"}).encode()
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/classify", data=body,
                                                      headers={"content-type": "application/json"}), timeout=30)
        found = []
        for _ in range(60):
            time.sleep(1)
            try:
                answer = json.load(urllib.request.urlopen(
                    f"http://127.0.0.1:{prom_port}/api/v1/query?query=tunesmith_requests_total", timeout=5))
            except OSError:
                continue
            found = answer["data"]["result"]
            if any(r["metric"].get("route") == "/v1/classify" for r in found):
                break
        assert any(r["metric"].get("route") == "/v1/classify" and r["metric"]["job"] == "tunesmith" for r in found)
    finally:
        prom.terminate()
        prom.wait(10)
        server.should_exit = True
        thread.join(10)


def test_alerts_never_replace_a_users_files_nor_land_when_monitor_fails(run_dir, tmp_path):
    from tunesmith.serve.alerts import write_monitoring

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "prometheus.yml").write_text("mine\n")
    refused = runner.invoke(cli, ["monitor", str(run_dir), "--alerts", str(mine), "--window", "60"])
    assert refused.exit_code == 2 and "not an earlier output of `--alerts`; left untouched" in refused.stderr
    assert [p.name for p in mine.iterdir()] == ["prometheus.yml"] and (mine / "prometheus.yml").read_text() == "mine\n"
    failed = runner.invoke(cli, ["monitor", str(run_dir), "--alerts", str(tmp_path / "fresh"),
                                 "--db", str(tmp_path / "none.db")])
    assert failed.exit_code == 2 and not (tmp_path / "fresh").exists()  # the report failed: no files at all
    (tmp_path / "file").write_text("x")
    as_file = runner.invoke(cli, ["monitor", str(run_dir), "--alerts", str(tmp_path / "file")])
    assert as_file.exit_code == 2 and "exists and is not a folder" in as_file.stderr
    for _ in range(2):  # an earlier output is ours to replace
        write_monitoring(tmp_path / "again", "tiny", 500)
    assert (tmp_path / "again" / ".tunesmith-alerts").is_file()
    (tmp_path / "again" / "notes.txt").write_text("my notes\n")  # beside ours: kept, never in the way
    write_monitoring(tmp_path / "again", "tiny", 400)
    assert (tmp_path / "again" / "notes.txt").read_text() == "my notes\n"
    # ... but a file of ours the user edited since is theirs now: prometheus.yml with their own targets
    (tmp_path / "again" / "prometheus.yml").write_text("my targets\n")
    edited = runner.invoke(cli, ["monitor", str(run_dir), "--alerts", str(tmp_path / "again"), "--window", "60"])
    assert edited.exit_code == 2 and "prometheus.yml was changed since" in edited.stderr, edited.output
    assert (tmp_path / "again" / "prometheus.yml").read_text() == "my targets\n"
    # a hand-edited marker naming files outside the folder is not followed (they were read to be hashed)
    marker = tmp_path / "again" / ".tunesmith-alerts"
    marker.write_text(json.dumps({"files": {"../../etc/shadow": "x", "/root/secret": "y"}}))
    write_monitoring(tmp_path / "again", "tiny", 400)
    assert set(json.loads(marker.read_text())["files"]) == {"alerts.yml", "alerts_test.yml",
                                                            "grafana-dashboard.json", "prometheus.yml"}
