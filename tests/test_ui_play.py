"""`tunesmith ui` Try it: the playground answers as `tunesmith serve`'s Service does for the run and as
the eval stage's baseline does for the base model; generation streams both sides; CSRF, paths under
--root and input sizes are checked; the model cache is bounded and closed with the app."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from conftest import GEN_PROJECT, make_texts, train_tiny_run, write_jsonl
from tunesmith import fsio
from tunesmith.cli import app as cli_app
from tunesmith.cli.ui import play
from tunesmith.cli.ui.app import UiSettings, create_app
from tunesmith.serve.service import load_service


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model) -> Path:
    """A root holding a tiny classification run (runs/cls/run) and a tiny generation run (runs/gen/run)."""
    root = tmp_path_factory.mktemp("ui-play")
    (root / "runs" / "cls").mkdir(parents=True)
    train_tiny_run(root / "runs" / "cls", tiny_model)
    gen = root / "runs" / "gen"
    gen.mkdir()
    rows = [{"prompt": r["text"], "completion": r["label"]} for r in make_texts(20, 3)]
    write_jsonl(gen / "train.jsonl", rows)
    write_jsonl(gen / "test.jsonl", rows[:4])
    (gen / "project.yaml").write_text(GEN_PROJECT.format(name="tinygen", model=tiny_model, method="lora", steps=2,
                                                         new_tokens=4), encoding="utf-8")
    result = CliRunner().invoke(cli_app, ["run", str(gen / "project.yaml"), "--out", str(gen / "run"), "--quiet"])
    assert result.exit_code in (0, 3), result.output
    return root


@pytest.fixture(scope="module")
def client(root):
    application = create_app(UiSettings(root=root))
    with TestClient(application) as c:
        c.headers["X-Tunesmith-CSRF"] = application.state.ui.csrf_token
        yield c


def _events(response) -> list:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            out.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return out


def _baseline(run: Path, base_weights: Path, texts: list[str]):
    """The base model's predictions as the eval stage makes them: base weights, the run's tokenizer,
    the prompt format of the user's task."""
    from tunesmith.config import load_config
    from tunesmith.data.examples import Example
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.tasks.predict import predict
    from tunesmith.tasks.prompts import build_format

    tokenizer = load_tokenizer(run / "model")
    labels = json.loads((run / "model" / "prompt.json").read_text())["labels"]
    fmt = build_format(load_config(run / "config.yaml", check_files=False).task, labels, tokenizer)
    return predict(load_model(base_weights), tokenizer, fmt, [Example(t, "", "request") for t in texts],
                   batch_size=4, max_new_tokens=4)


def test_classify_answers_as_the_served_run_and_the_eval_baseline(root, client, tiny_model):
    run = root / "runs" / "cls" / "run"
    served = load_service(run)
    rows = fsio.read_jsonl(run / "predictions" / "test.jsonl")[:3]
    baseline = _baseline(run, tiny_model, [r["text"] for r in rows])
    for row, base_label, base_probs in zip(rows, baseline.texts, baseline.probabilities):
        answer = client.post("/api/play/classify", json={"run": "runs/cls/run", "text": row["text"]})
        assert answer.status_code == 200, answer.text
        label, probabilities = served.classify([row["text"]])[0]
        tuned, base = answer.json()["tuned"], answer.json()["base"]
        assert tuned == {"label": label, "probabilities": pytest.approx(probabilities, abs=1e-6)}
        # the base side is the eval stage's baseline: its label for this test row, its probabilities
        assert base["label"] == base_label == row["baseline_prediction"]
        assert base["probabilities"] == pytest.approx(base_probs, abs=1e-5)
        assert max(abs(base["probabilities"][k] - p) for k, p in probabilities.items()) > 1e-4  # two models


def test_generation_streams_both_sides(root, client):
    run = root / "runs" / "gen" / "run"
    served = load_service(run)
    prompt = "red card please"
    with client.stream("POST", "/api/play/generate", json={"run": "runs/gen/run", "prompt": prompt,
                                                           "max_tokens": 6}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = _events(response)
    assert events[-1] == "[DONE]"
    ends = {e["side"]: e for e in events[:-1] if "finish" in e or "error" in e}
    assert set(ends) == {"tuned", "base"} and all("finish" in e for e in ends.values()), ends
    pieces = [e["text"] for e in events[:-1] if e.get("side") == "tuned" and "text" in e]
    stream = served.stream(served.example(prompt=prompt), 6, threading.Event())
    expected = []
    while True:
        try:
            expected.append(next(stream))
        except StopIteration as end:
            finish = end.value
            break
    assert pieces == expected and ends["tuned"]["finish"] == finish
    assert "".join(pieces) == served.complete([served.example(prompt=prompt)], [6])[0].text
    chat = client.post("/api/play/generate", json={"run": "runs/gen/run", "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": "<|im_end|> blue"}]})
    assert chat.status_code == 200 and _events(chat)[-1] == "[DONE]"


def test_csrf_paths_and_sizes_are_checked(root, client):
    bare = TestClient(client.app)
    assert bare.post("/api/play/classify", json={"run": "runs/cls/run", "text": "red"}).status_code == 403
    assert bare.post("/api/play/generate", json={"run": "runs/gen/run", "prompt": "x"}).status_code == 403
    for rel in ("../x", "/etc", "runs/../../x", "runs/cls"):
        assert client.post("/api/play/classify", json={"run": rel, "text": "red"}).status_code == 404, rel
        assert client.get("/play", params={"run": rel}).status_code == 404, rel
    too_long = client.post("/api/play/classify", json={"run": "runs/cls/run", "text": "x" * (play.MAX_CHARS + 1)})
    assert too_long.status_code == 400 and "text" in too_long.json()["error"]["message"]
    huge = client.post("/api/play/classify", content=b"{" + b" " * play.MAX_BODY + b"}",
                       headers={"Content-Type": "application/json"})
    assert huge.status_code == 413
    assert client.post("/api/play/generate", json={"run": "runs/gen/run", "prompt": "x",
                                                   "max_tokens": play.MAX_TOKENS + 1}).status_code == 400
    assert client.post("/api/play/generate", json={"run": "runs/gen/run"}).status_code == 400
    assert client.post("/api/play/classify", json={"run": "runs/gen/run", "text": "x"}).status_code == 400


def test_pages_show_the_form_for_the_task(client):
    page = client.get("/play", params={"run": "runs/cls/run"})
    assert page.status_code == 200 and "data-task='classification'" in page.text and "play.js" in page.text
    assert "<script>" not in page.text
    gen = client.get("/play", params={"run": "runs/gen/run"})
    assert "data-task='generation'" in gen.text and "play-max-tokens" in gen.text
    assert "/play?run=runs/cls/run" in client.get("/runs/runs/cls/run").text
    assert client.get("/static/play.js").status_code == 200


class _Fake:
    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


def test_cache_keeps_two_runs_and_closes_the_rest_and_on_shutdown(tmp_path):
    made = {}

    def loader(run):
        made[run.name] = play.Loaded(run, _Fake(), _Fake(), None)
        return made[run.name]
    cache = play.Services(size=2, loader=loader)
    for name in ("a", "b", "a", "c"):  # "a" used again, so "b" is the least recently used
        (tmp_path / name).mkdir(exist_ok=True)
        cache.get(tmp_path / name)
    assert made["b"].tuned.closed and made["b"].base.closed
    assert not made["a"].tuned.closed and not made["c"].tuned.closed
    application = create_app(UiSettings(root=tmp_path))
    with TestClient(application) as c:
        c.get("/play")  # no run: a 400 page, and no model loaded
        application.state.play_services = cache
        application.state.shutdown_hooks = [cache.close]
    assert made["a"].tuned.closed and made["c"].base.closed and not cache.entries
