"""`tunesmith serve --registry NAME`: the hot swap (serve/swap.py). Clients run through a promotion
and a rollback with zero errors and every answer from one of the two models; the model swapped out
is closed once its calls are done; a run of another task type, a run that fails to load and a
broken registry are refused while the old model keeps serving."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from typer.testing import CliRunner

from conftest import PROJECT, free_port, make_texts, start_server, write_jsonl
from tunesmith import champions
from tunesmith.cli import app as cli
from tunesmith.config import ServeConfig
from tunesmith.errors import EngineError, InputError
from tunesmith.serve.server import build_app, champion_run
from tunesmith.serve.service import Finish, load_service
from tunesmith.serve.swap import Scored, Served, ServiceSlot, answered_by

runner = CliRunner()
NAME = "swapped"
A_LABELS, B_LABELS = ["alpha", "beta", "gamma"], ["delta", "epsilon", "zeta"]
TEXTS = [r["text"] for r in make_texts(9, 7)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """Run A, trained; run B, A's weights with other label names (so every answer tells which model gave
    it: B can only answer delta/epsilon/zeta); run G, A's weights served as a generation model."""
    folder = tmp_path_factory.mktemp("swap")
    write_jsonl(folder / "train.jsonl", make_texts(30, 1))
    write_jsonl(folder / "test.jsonl", make_texts(9, 2))
    text = PROJECT.format(model=tiny_model, method="lora").replace(
        '  instruction: "Classify."\n', '  instruction: "Classify."\n  max_length: 64\n')
    (folder / "project.yaml").write_text(text, encoding="utf-8")
    result = runner.invoke(cli, ["run", str(folder / "project.yaml"), "--out", str(folder / "A"), "--quiet"])
    assert result.exit_code in (0, 3), result.output
    out = {"A": folder / "A"}
    for key, change in (("B", {"labels": B_LABELS}), ("G", {"task_type": "generation", "labels": None})):
        shutil.copytree(folder / "A", folder / key)
        prompt = folder / key / "model" / "prompt.json"
        prompt.write_text(json.dumps({**json.loads(prompt.read_text()), **change}), encoding="utf-8")
        out[key] = folder / key
    return {k: v.resolve() for k, v in out.items()}


@pytest.fixture(scope="module")
def expected(runs) -> dict[str, dict[str, str]]:
    """Each model's own answer to each text, computed without any server."""
    answers = {}
    for key in "AB":
        service = load_service(runs[key])
        answers[key] = {t: label for t, (label, _) in zip(TEXTS, service.classify(TEXTS))}
    assert set(answers["A"].values()) <= set(A_LABELS) and set(answers["B"].values()) <= set(B_LABELS)
    return answers


@pytest.fixture()
def registry(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "runs.sqlite"
    monkeypatch.setenv("TUNESMITH_REGISTRY", str(path))
    return path


class Loads:
    """load_service, recording every service it made and when each was closed."""

    def __init__(self):
        self.made, self.closed = [], []

    def __call__(self, run_dir, variant=None):
        return self.watch(load_service(run_dir, variant))

    def watch(self, service):
        self.made.append(service)
        service.close = lambda: self.closed.append(service)  # Service.close releases nothing on CPU anyway
        return service


@contextmanager
def following(tmp_path, loads: Loads, **cfg):
    """A live server exactly as `tunesmith serve --registry NAME` builds it, polling every 50 ms."""
    run = champion_run(NAME)
    served = build_app(loads.watch(load_service(run)), ServeConfig(**cfg), [], tmp_path / "requests.db",
                       registry=NAME, poll_s=0.05, load=loads)
    served.follower.start()
    url, stop = start_server(served.app)
    try:
        yield url, served
    finally:
        stop()
        served.follower.stop()


def _wait(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


class Clients:
    """Threads sending requests continuously (classify, and a stream), each answer recorded with the
    time its request was sent."""

    def __init__(self, url: str, threads: int = 3):
        self.url, self.answers, self.errors, self.stop = url, [], [], threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._classify, args=(i,)) for i in range(threads)]
        self.threads.append(threading.Thread(target=self._stream))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _keep(self, sent: float, text: str, status: int, label: str | None) -> None:
        with self.lock:
            self.answers.append((sent, time.monotonic(), text, status, label))

    def _classify(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as c:
            n = i
            while not self.stop.is_set():
                text, sent = TEXTS[n % len(TEXTS)], time.monotonic()
                n += 1
                try:
                    r = c.post("/v1/classify", json={"text": text})
                    self._keep(sent, text, r.status_code, r.json().get("label") if r.status_code == 200 else r.text)
                except Exception as e:  # a dropped connection is an error too
                    self.errors.append(repr(e))

    def _stream(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as c:
            n = 0
            while not self.stop.is_set():
                text, sent = TEXTS[n % len(TEXTS)], time.monotonic()
                n += 1
                body = {"messages": [{"role": "user", "content": text}], "stream": True}
                try:
                    with c.stream("POST", "/v1/chat/completions", json=body) as s:
                        lines = [line for line in s.iter_lines() if line]
                    if s.status_code != 200 or lines[-1] != "data: [DONE]":
                        self._keep(sent, text, s.status_code, str(lines))
                        continue
                    chunks = [json.loads(line[6:]) for line in lines[:-1]]
                    answer = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
                    self._keep(sent, text, 200, answer.strip())
                except Exception as e:
                    self.errors.append(repr(e))

    def count(self) -> int:
        with self.lock:
            return len(self.answers)

    def wait_more(self, n: int) -> None:
        start = self.count()
        _wait(lambda: self.count() >= start + n)


def test_clients_run_through_a_promotion_and_a_rollback(runs, expected, registry, tmp_path):
    champions.promote(NAME, runs["A"])
    loads = Loads()
    with following(tmp_path, loads, max_wait_ms=2) as (url, served), Clients(url) as clients:
        slot = served.slot
        clients.wait_more(20)
        champions.promote(NAME, runs["B"])
        _wait(lambda: slot.run_dir == runs["B"])
        swapped = time.monotonic()
        quality, drift = served.app.state.quality, served.app.state.watch  # the monitors follow the served run
        _wait(lambda: quality.target.run_dir == runs["B"] and drift.run_dir == runs["B"])
        clients.wait_more(40)
        champions.rollback(NAME)
        _wait(lambda: slot.run_dir == runs["A"])
        rolled = time.monotonic()
        clients.wait_more(40)
        metrics = httpx.get(url + "/metrics").text
    assert clients.errors == []
    answers = clients.answers
    assert all(status == 200 for _, _, _, status, _ in answers), [a for a in answers if a[3] != 200][:3]
    for _, _, text, _, label in answers:  # every answer is one model's own answer to that input
        assert label in (expected["A"][text], expected["B"][text]), (text, label)
    b_phase = [a for a in answers if swapped < a[0] and a[1] < rolled - 0.01]  # sent after the swap, done before
    after = [a for a in answers if a[0] > rolled]
    assert len(b_phase) >= 20 and all(label == expected["B"][text] for _, _, text, _, label in b_phase)
    assert len(after) >= 20 and all(label == expected["A"][text] for _, _, text, _, label in after)
    assert any(label in B_LABELS for *_, label in answers) and answers[0][4] in A_LABELS
    # Each request-log row names the model that computed the answer, whichever was serving when it was logged.
    db = sqlite3.connect(tmp_path / "requests.db")
    rows = db.execute("SELECT output, run_dir FROM requests").fetchall()
    db.close()
    assert len(rows) >= 80 and {d for _, d in rows} == {str(runs["A"].resolve()), str(runs["B"].resolve())}
    for output, run_dir in rows:
        assert run_dir == str((runs["A"] if output.strip() in A_LABELS else runs["B"]).resolve()), (output, run_dir)
    # Three services: A at start, B, A again; the two swapped out were closed, the one serving was not.
    first, b, again = loads.made
    assert b.run_dir == runs["B"] and again.run_dir == runs["A"] and slot.current is again
    assert loads.closed == [first, b, again]  # the last one at the server's shutdown
    assert "tunesmith_model_swaps_total 2.0" in metrics
    assert f'tunesmith_served_run_info{{registry="{NAME}",run="{runs["A"]}"}} 1.0' in metrics
    assert 'tunesmith_model_swap_failures_total{reason="load"} 0.0' in metrics


def test_a_run_of_another_task_type_is_refused_and_the_old_model_serves(runs, expected, registry, tmp_path, caplog):
    champions.promote(NAME, runs["A"])
    loads = Loads()
    with following(tmp_path, loads) as (url, served), httpx.Client(base_url=url, timeout=60) as c:
        champions.promote(NAME, runs["G"])
        _wait(lambda: len(loads.made) == 2)  # the generation run was loaded ...
        _wait(lambda: 'reason="refused"} 1.0' in c.get("/metrics").text)  # ... and refused
        for text in TEXTS[:3]:
            r = c.post("/v1/classify", json={"text": text})
            assert r.status_code == 200 and r.json()["label"] == expected["A"][text]
        assert served.slot.run_dir == runs["A"] and loads.closed == [loads.made[1]]  # the refused one, released
        assert "tunesmith_model_swaps_total 0.0" in c.get("/metrics").text
    assert any("its task type is generation, the server's is classification" in r.message for r in caplog.records)


def test_the_follower_survives_a_broken_registry_and_a_run_that_fails_to_load(runs, registry, tmp_path,
                                                                               monkeypatch, caplog):
    champions.promote(NAME, runs["A"])
    served = build_app(load_service(runs["A"]), ServeConfig(), [], None, registry=NAME, poll_s=60)
    follower = served.follower
    broken = tmp_path / "broken"
    shutil.copytree(runs["B"], broken)
    (broken / "model" / "adapter_model.safetensors").write_bytes(b"not weights")
    champions.promote(NAME, broken)
    assert follower.check() == "refused" and served.slot.run_dir == runs["A"]
    assert follower.check() == "waiting"  # tried again later, not on every poll
    monkeypatch.setenv("TUNESMITH_REGISTRY", str(tmp_path / "garbage.sqlite"))
    (tmp_path / "garbage.sqlite").write_bytes(b"garbage " * 200)
    with caplog.at_level(logging.ERROR, logger="tunesmith.serve"):
        assert follower.check() == "unreadable" and served.slot.run_dir == runs["A"]
        assert follower.check() == "unreadable"  # logged once per cause, counted every time
    assert sum("not a readable SQLite file" in r.message for r in caplog.records) == 1
    text = served.app.state.metrics.exposition().decode()
    assert "tunesmith_registry_read_failures_total 2.0" in text
    assert 'tunesmith_model_swap_failures_total{reason="load"} 1.0' in text
    # A registry deleted under the server is not read as a new, empty one (made by the read): it is gone.
    monkeypatch.setenv("TUNESMITH_REGISTRY", str(tmp_path / "deleted.sqlite"))
    with caplog.at_level(logging.ERROR, logger="tunesmith.serve"):
        assert follower.check() == "unreadable" and not (tmp_path / "deleted.sqlite").exists()
    assert any("the run registry file is gone" in r.message for r in caplog.records)
    monkeypatch.setenv("TUNESMITH_REGISTRY", str(registry))
    assert follower.check() == "waiting" and served.slot.run_dir == runs["A"]  # readable again: the refused run


class FakeService:
    """Just what the slot touches: answers say which service gave them; close is recorded."""

    def __init__(self, name: str):
        self.name, self.run_dir, self.labels, self.closed = name, Path(name), ["x"], 0
        self.gate = threading.Event()

    def close(self):
        self.closed += 1

    def classify(self, texts):
        return [(self.name, {self.name: 1.0}) for _ in texts]

    def complete(self, examples, max_tokens, *sampling):
        from tunesmith.serve.service import Completion

        return [Completion(self.name, "stop", 1, 1) for _ in examples]

    def stream(self, example, max_tokens, cancelled, *sampling):
        yield self.name
        self.gate.wait(10)
        yield "!"
        return "stop"


def test_the_slot_closes_a_swapped_out_service_after_its_last_call():
    a, b = FakeService("a"), FakeService("b")
    slot = ServiceSlot(a)
    with slot.use() as held:  # a call running on a while b is swapped in
        assert slot.swap(b) is a and held is a
        assert slot.name == "b" and a.closed == 0 and slot.in_use(a) == 1
        assert [label for label, _ in slot.classify(["t"])] == ["b"]  # new calls go to b
    assert a.closed == 1 and slot.in_use(a) == 0
    stream = slot.stream(None, 4, threading.Event())
    assert next(stream) == "b"  # the stream pins b from its first piece
    slot.swap(a)
    assert b.closed == 0
    b.gate.set()
    assert list(stream) == ["!"] and b.closed == 1  # closed when the stream ended, not before
    slot.close()
    assert a.closed == 2 and b.closed == 1
    late = FakeService("late")
    assert slot.swap(late) is None and late.closed == 1  # loaded after the server stopped: closed at once


def test_a_closed_slot_refuses_new_calls_clearly_and_lets_running_ones_end():
    """The server stopping while the model thread or a stream still runs: no KeyError anywhere."""
    a = FakeService("a")
    slot = ServiceSlot(a)
    stream = slot.stream(None, 4, threading.Event())
    assert next(stream) == "a"
    with slot.use() as held:  # a model call running at shutdown
        slot.close()
        assert held is a and a.closed == 1
    a.gate.set()
    assert list(stream) == ["!"]  # the stream's end releases a closed slot quietly
    with pytest.raises(EngineError, match="the server is stopping"):
        slot.classify(["late"])  # a call after close: a clear 502, not KeyError
    assert a.closed == 1


def test_a_run_loaded_after_the_server_stopped_is_closed_not_announced(monkeypatch):
    from tunesmith.serve import swap
    from tunesmith.serve.metrics import ServeMetrics

    fmt = SimpleNamespace(task_type="classification")
    a, b = FakeService("a"), FakeService("b")
    a.fmt = b.fmt = fmt
    b.variant, b.load_seconds = "fp32", 0.0  # what the announcement reads before `old.run_dir`
    slot, lines = ServiceSlot(a), []
    follower = swap.RegistryFollower(NAME, slot, ServeMetrics(), lambda run, variant: slot.close() or b,
                                     announce=lines.append, on_swap=lines.append)
    monkeypatch.setattr(swap.champions, "current", lambda name, **_: Path("b"))
    assert follower.check() == "stopped"  # the slot closed during the load (was: AttributeError)
    assert b.closed == 1 and a.closed == 1 and lines == []


def test_the_apps_shutdown_stops_the_follower_before_closing_the_model(runs, registry, tmp_path):
    from fastapi.testclient import TestClient

    served = build_app(load_service(runs["A"]), ServeConfig(), [], tmp_path / "requests.db", registry=NAME,
                       poll_s=0.05)
    served.follower.start()
    seen, close = {}, served.slot.close

    def record_close():
        seen["follower stopped"] = served.follower._stop.is_set() and not served.follower._thread.is_alive()
        close()
    served.slot.close = record_close
    with TestClient(served.app) as c:
        assert c.post("/v1/classify", json={"text": TEXTS[0]}).status_code == 200
    assert seen == {"follower stopped": True}  # stopped by the app's lifespan, before state.close() closed the slot


def test_every_answer_names_the_run_that_computed_it():
    a, b = FakeService("a"), FakeService("b")
    slot = ServiceSlot(a)
    scored = slot.classify(["t"])[0]
    assert isinstance(scored, Scored) and tuple(scored) == ("a", {"a": 1.0}) and answered_by(scored, slot) == Path("a")
    done = slot.complete([None], [4])[0]
    assert isinstance(done, Served) and done.text == "a" and answered_by(done, slot) == Path("a")
    stream = slot.stream(None, 4, threading.Event())
    next(stream)
    slot.swap(b)  # the slot now names b, but the stream's answer is a's
    a.gate.set()
    with pytest.raises(StopIteration) as end:
        while True:
            next(stream)
    assert isinstance(end.value.value, Finish) and end.value.value == "stop"
    assert answered_by(end.value.value, slot) == Path("a") and slot.run_dir == Path("b")
    assert answered_by(("plain", {}), slot) == Path("b")  # an untagged result: the server's run


def test_serve_command_checks_the_registry_before_anything_starts(runs, registry):
    out = runner.invoke(cli, ["serve", "--registry", NAME, "--port", "1"])
    assert out.exit_code == 2 and f"nothing is promoted under '{NAME}'" in out.output
    assert "tunesmith promote" in out.output
    out = runner.invoke(cli, ["serve", str(runs["A"]), "--registry", NAME])
    assert out.exit_code == 2 and "TARGET and --registry exclude each other" in out.output
    out = runner.invoke(cli, ["serve"])
    assert out.exit_code == 2 and "nothing to serve" in out.output
    out = runner.invoke(cli, ["serve", "--registry", NAME, "--engine", "vllm"])
    assert out.exit_code == 2 and "--registry goes with the built-in engine" in out.output
    out = runner.invoke(cli, ["serve", "--registry", "bad/name"])
    assert out.exit_code == 2 and "bad registry name" in out.output
    with pytest.raises(InputError, match="nothing is promoted"):
        champion_run(NAME)


def test_serve_refuses_a_promoted_run_whose_folder_is_gone(runs, registry, tmp_path):
    gone = tmp_path / "gone"
    shutil.copytree(runs["A"], gone)
    champions.promote(NAME, gone)
    shutil.rmtree(gone)
    out = runner.invoke(cli, ["serve", "--registry", NAME])
    assert out.exit_code == 2 and f"the run promoted as '{NAME}' is gone" in out.output
    assert f"tunesmith rollback {NAME}" in out.output


def test_serve_registry_runs_the_follower_while_the_server_runs(runs, registry, monkeypatch, capsys):
    """`serve(registry=NAME)` (what the CLI calls) serves the promoted run through a slot, with the
    follower thread running exactly while the server does."""
    import uvicorn

    from tunesmith.serve.server import serve

    seen = {}

    class FakeServer:
        def __init__(self, config):
            seen["app"], self.started = config.app, True

        def run(self, sockets=None):
            seen["following"] = [t.name for t in threading.enumerate() if t.name == "registry-follower"]
    monkeypatch.setattr(uvicorn, "Server", FakeServer)
    monkeypatch.delenv("TUNESMITH_API_KEYS", raising=False)
    champions.promote(NAME, runs["A"])
    serve(None, "127.0.0.1", free_port(), registry=NAME)
    assert seen["following"] == ["registry-follower"]
    assert not any(t.name == "registry-follower" for t in threading.enumerate())  # stopped with the server
    # behind the capacity guard and the loopback Host check
    assert isinstance(seen["app"].app.app.state.service, ServiceSlot)
    assert f"following the registry '{NAME}': {runs['A']}" in capsys.readouterr().err
