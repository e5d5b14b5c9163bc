"""The server under attack and overload (issue 16, items 1-4, 6 and 7): linear-time PII patterns and a
request log off the event loop, model calls within a token budget, 503 + Retry-After when the
queue is full or a deadline passes, failures isolated per request, and failures operators can see."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from conftest import FILLER, PROJECT, free_port, make_texts, start_server, wait_until, write_jsonl
from tunesmith.cli import app as cli
from tunesmith.config import DriftSettings, ServeConfig
from tunesmith.data.examples import Example
from tunesmith.data.pii import ORDER, find_pii
from tunesmith.serve import store as store_module
from tunesmith.serve.app import create_app
from tunesmith.serve.batcher import MicroBatcher, Overloaded
from tunesmith.serve.metrics import ServeMetrics
from tunesmith.serve.monitoring import DriftWatch
from tunesmith.serve.service import Completion, load_service, token_batches
from tunesmith.serve.store import STORED_CHARS, RequestLog
from tunesmith.tasks.predict import answer_budget, encode_prompts

MAX_LENGTH = 64  # task.max_length of the run below: small, so texts of that length are cheap on CPU
LABELS = {"alpha", "beta", "gamma"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model) -> str:
    folder = tmp_path_factory.mktemp("reliability")
    write_jsonl(folder / "train.jsonl", make_texts(30, 1))
    write_jsonl(folder / "test.jsonl", make_texts(9, 2))
    text = PROJECT.format(model=tiny_model, method="lora").replace(
        '  instruction: "Classify."\n', f'  instruction: "Classify."\n  max_length: {MAX_LENGTH}\n')
    (folder / "project.yaml").write_text(text, encoding="utf-8")
    result = CliRunner().invoke(cli, ["run", str(folder / "project.yaml"), "--out", str(folder / "run"), "--quiet"])
    assert result.exit_code in (0, 3), result.output
    return str(folder / "run")


@pytest.fixture()
def service(run_dir):
    return load_service(run_dir)


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


# -- item 1: regex bomb -------------------------------------------------------------------------------
def test_item1_pii_patterns_are_linear_on_hostile_text():
    """Each of these took seconds to minutes before (the email pattern is quadratic on the dot
    bomb, and thousands of findings made the overlap check quadratic); now each is well under a
    second of work, so 5 s is a bound that only a super-linear pattern can break."""
    hostile = {"dot bomb": "a." * 200_000 + "@", "local parts": ("a." * 32 + "a@" + "a.aa1" * 50) * 1000,
               "phone groups": "12-" * 100_000, "dotted digits": "1." * 200_000, "spaces after a name": "Amy" +
               " " * 200_000 + "x", "titles": "Mr " * 100_000, "colons": "1:" * 100_000 + ":" * 100_000,
               "ipv6 groups": "1:2:3:4:5:6:7:8:" * 20_000, "ipv4 tails": "::1.1.1." * 30_000}
    for name, text in hostile.items():
        started = time.perf_counter()
        find_pii(text, ORDER)
        assert time.perf_counter() - started < 5, name
    text = "write to jane.doe@example.com or call +44 20 7946 0958, " + "a." * 50_000 + "@"
    assert [f.kind for f in find_pii(text)] == ["email", "phone"]


def test_item1_request_log_redacts_a_bounded_prefix(tmp_path):
    log = RequestLog(tmp_path / "log.db")
    at_cut = "x" * (STORED_CHARS - 10) + " ann.lee@example.com " + "y" * 100_000  # an email across the cut
    log.write([{"route": "/v1/classify", "input": "mail bob@example.com " + "z" * 50_000},
               {"route": "/v1/classify", "input": at_cut}, {"route": "/v1/classify", "input": "bad \ud800 text"},
               {"route": "/v1/classify", "input": "reach ｊｏｈｎ＠ｅｘａｍｐｌｅ．ｃｏｍ"},  # full-width look-alikes
               {"route": "/v1/classify", "input": "x² and ﬁne, no address"}])  # kept as given: nothing hidden
    log.close()
    rows = [r[0] for r in sqlite3.connect(tmp_path / "log.db").execute("SELECT input FROM requests ORDER BY id")]
    assert rows[0].startswith("mail [EMAIL] zzz") and rows[0].endswith(" characters not stored]")
    assert len(rows[0]) < STORED_CHARS + 100 and "@" not in rows[0]
    assert "[EMAIL]" in rows[1] and "@" not in rows[1] and "ann.lee" not in rows[1]
    assert rows[1].endswith(" [EMAIL] [+100001 characters not stored]")  # the cut moved past the email
    assert rows[2] == "bad ? text"  # an unencodable character is stored as "?", never a failed write
    assert rows[3] == "reach [EMAIL]"  # NFKC first: the address was stored verbatim
    assert rows[4] == "x² and ﬁne, no address"


def test_item1_healthz_answers_while_the_request_log_works(service, tmp_path, monkeypatch):
    """Redaction runs off the event loop: while it is stuck (here: held on an event) the request
    waits for its own log row, but /healthz and other routes answer. Then the dot bomb itself is
    answered and logged quickly."""
    held, entered = threading.Event(), threading.Event()
    real = store_module.find_pii

    def slow_find(text, *a, **k):
        entered.set()
        held.wait(60)
        return real(text, *a, **k)
    monkeypatch.setattr(store_module, "find_pii", slow_find)
    app = create_app(service, ServeConfig(), [], tmp_path / "log.db")
    url, stop = start_server(app)
    answers = {}
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            pending = threading.Thread(target=lambda: answers.update(
                first=c.post("/v1/classify", json={"text": "red card, mail me at a@example.com"}, timeout=60)))
            pending.start()
            assert entered.wait(10)  # the request is inside the (held) redaction now
            for _ in range(3):
                assert c.get("/healthz").json() == {"status": "ok"}
            assert c.get("/metrics").status_code == 200 and pending.is_alive()
            held.set()
            monkeypatch.setattr(store_module, "find_pii", real)
            pending.join(30)
            assert answers["first"].status_code == 200
            started = time.perf_counter()
            bomb = c.post("/v1/classify", json={"text": "a." * 200_000 + "@"}, timeout=60)
            assert bomb.status_code == 200 and time.perf_counter() - started < 30
            assert c.get("/healthz").status_code == 200
    finally:
        held.set()
        stop()
    rows = [r[0] for r in sqlite3.connect(tmp_path / "log.db").execute("SELECT input FROM requests ORDER BY id")]
    assert rows[0] == "red card, mail me at [EMAIL]"
    assert len(rows[1]) < STORED_CHARS + 100 and rows[1].endswith("characters not stored]")


# -- item 2: token budget -----------------------------------------------------------------------------
def test_item2_model_calls_stay_within_max_batch_tokens(service, tmp_path, monkeypatch):
    budget = 8 * MAX_LENGTH
    predictor, calls = service.predictor, []
    real = predictor.predict

    answer = answer_budget(predictor.tokenizer, predictor.fmt)  # label scoring runs each answer after the prompt

    def spy(examples, batch_size):
        prompts = encode_prompts(predictor.tokenizer, predictor.fmt, examples)
        calls.append((len(examples), len(examples) * (max(len(p) for p in prompts) + answer)))
        return real(examples, batch_size)
    monkeypatch.setattr(predictor, "predict", spy)
    long_text = " ".join(FILLER * 4)  # over task.max_length tokens: truncated to it
    assert len(encode_prompts(predictor.tokenizer, predictor.fmt, [Example(long_text, "", "x")])[0]) >= MAX_LENGTH - 8
    app = create_app(service, ServeConfig(max_batch_tokens=budget, max_wait_ms=50, request_timeout_s=600), [])

    async def burst():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=600) as c:
            texts = [f"{['red', 'blue', 'green'][i % 3]} {long_text} {i}" for i in range(64)]
            return await asyncio.gather(*(c.post("/v1/classify", json={"texts": texts}) for _ in range(32)))
    answers = asyncio.run(burst())
    assert all(a.status_code == 200 and len(a.json()["results"]) == 64 for a in answers)
    assert sum(n for n, _ in calls) == 32 * 64
    assert max(tokens for _, tokens in calls) <= budget, "a model call went over serve.max_batch_tokens"


def test_item2_token_batches_fill_the_budget_without_passing_it():
    costs = [5, 3, 10, 2, 7, 100, 10]
    groups = token_batches(costs, 20)
    assert sorted(i for g in groups for i in g) == list(range(len(costs)))
    assert all(len(g) * max(costs[i] for i in g) <= 20 for g in groups if len(g) > 1)
    assert [5] in groups  # a row over the budget goes alone


def test_item2_budget_prices_padding_and_the_largest_max_tokens():
    """generate left-pads every prompt to the longest and decodes max(max_tokens) for every row: a
    1000-token prompt with max_tokens 1 beside a 10-token prompt with max_tokens 1000 is a forward of
    2 x 2000 tokens, not 2 x 1010, so under a budget of 2048 they go in separate calls."""
    from types import SimpleNamespace

    from tunesmith.serve.model_calls import Pacer, run_batch
    from tunesmith.serve.service import Service, TokenPrompt
    from tunesmith.tasks.prompts import PromptFormat

    class Tok:  # what Service.complete asks of a tokenizer
        eos_token_id = pad_token_id = 0
        unk_token_id = None

        def convert_tokens_to_ids(self, token):
            return None

        def decode(self, ids, skip_special_tokens=True):
            return "x" * len(ids)
    forwards = []

    def complete(prompts, limits):  # the runtime's view: padded prompts, max(limits) new tokens each
        forwards.append(len(prompts) * (max(len(p) for p in prompts) + max(limits)))
        return [[7] * n for n in limits]
    fmt = PromptFormat(task_type="generation", instruction="", labels=None, list_labels=False, max_length=1024)
    service = Service("fake", SimpleNamespace(tokenizer=Tok(), fmt=fmt, complete=complete, module=None), "fp32", 0.0)
    items = [(TokenPrompt(tuple([5] * 1000), "long"), 1), (TokenPrompt(tuple([5] * 10), "short"), 1000)]
    delivered = {}
    run_batch(service, "complete", items, lambda i, done: delivered.update({i: done}), lambda i: True,
              budget=2048, pacer=Pacer(60))
    assert forwards == [1001, 1010], "a model call went over serve.max_batch_tokens"
    assert delivered[0].completion_tokens == 1 and delivered[1].completion_tokens == 1000


def test_item2_classifier_budget_includes_the_label_answer(service, monkeypatch):
    """Label scoring runs each label's answer tokens after the prompt: a call costs rows x (longest
    prompt + longest answer). Prompts cut to task.max_length - answer tokens, under a budget of two
    such prompts (without answers) plus one, go one per call."""
    from tunesmith.serve.model_calls import Pacer, run_batch

    predictor, rows = service.predictor, []
    answer = answer_budget(predictor.tokenizer, predictor.fmt)
    real = predictor.predict

    def spy(examples, batch_size):
        prompts = encode_prompts(predictor.tokenizer, predictor.fmt, examples)
        rows.append((len(examples), len(examples) * (max(len(p) for p in prompts) + answer)))
        return real(examples, batch_size)
    monkeypatch.setattr(predictor, "predict", spy)
    texts = [f"red {' '.join(FILLER * 4)} {i}" for i in range(3)]
    prompt = max(len(p) for p in encode_prompts(predictor.tokenizer, predictor.fmt,
                                                [Example(t, "", "x") for t in texts]))
    assert answer >= 1 and prompt + answer <= MAX_LENGTH
    budget = 2 * prompt + 1
    delivered = []
    run_batch(service, "classify", [texts], lambda i, result: delivered.append(result), lambda i: True,
              budget=budget, pacer=Pacer(60))
    assert len(delivered) == 1 and len(delivered[0]) == 3
    assert sum(n for n, _ in rows) == 3 and max(tokens for _, tokens in rows) <= budget


def test_item2_a_budget_smaller_than_one_row_is_refused(service, monkeypatch):
    from tunesmith.errors import InputError

    monkeypatch.setattr(service.predictor.fmt, "max_length", 128)
    with pytest.raises(InputError, match="serve.max_batch_tokens"):
        create_app(service, ServeConfig(max_batch_tokens=100))


# -- item 3: overload ---------------------------------------------------------------------------------
def test_item3_full_queue_and_deadline_answer_503_with_retry_after(service, monkeypatch):
    held = threading.Event()
    real = service.classify

    def blocked(texts):
        held.wait(30)
        return real(texts)
    monkeypatch.setattr(service, "classify", blocked)
    app = create_app(service, ServeConfig(max_queue=2, max_batch=1, max_wait_ms=0, request_timeout_s=1), [])

    async def flood():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            first = asyncio.create_task(c.post("/v1/classify", json={"text": "red"}))
            await asyncio.sleep(0.2)  # the model thread has taken it and is stuck
            started = time.monotonic()
            rest = await asyncio.gather(*(c.post("/v1/classify", json={"text": "blue"}) for _ in range(5)))
            waited = time.monotonic() - started
            answers = [await first, *rest]
            held.set()
            after = await c.post("/v1/classify", json={"text": "green"})
            return answers, waited, after, (await c.get("/metrics")).text
    try:
        answers, waited, after, metrics = asyncio.run(flood())
    finally:
        held.set()
    assert [a.status_code for a in answers] == [503] * 6 and waited < 10
    assert all(int(a.headers["Retry-After"]) >= 1 for a in answers)
    reasons = sorted(a.json()["error"]["message"] for a in answers)
    assert sum("queue full" in r for r in reasons) == 3 and sum("request_timeout_s" in r for r in reasons) == 3
    assert after.status_code == 200
    assert _metric(metrics, 'tunesmith_rejected_total{reason="queue_full"}') == 3
    assert _metric(metrics, 'tunesmith_rejected_total{reason="deadline"}') == 3


def test_item3_a_request_past_its_deadline_is_answered_before_the_deadline(service, monkeypatch):
    """The 503 for a request the model cannot reach leaves before serve.request_timeout_s, with a
    margin for a busy event loop (answer_margin), not at or after it."""
    from tunesmith.serve.app import answer_margin

    assert answer_margin(30) == 1.0 and answer_margin(4) == pytest.approx(0.2)
    held = threading.Event()
    monkeypatch.setattr(service, "classify", lambda texts: held.wait(30) and [])
    app = create_app(service, ServeConfig(request_timeout_s=4), [])

    async def one():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            started = time.monotonic()
            answer = await c.post("/v1/classify", json={"text": "red"})
            return answer, time.monotonic() - started
    try:
        answer, took = asyncio.run(one())
    finally:
        held.set()
    assert answer.status_code == 503 and 4 - 0.2 - 0.05 <= took < 4


def test_item3_model_calls_are_paced_and_skip_requests_past_their_deadline():
    """Requests are answered as their own rows finish; a request no longer waiting costs no model time;
    once a row is measured, a call holds no more rows than fit in the pacer's cap."""
    from tunesmith.serve.model_calls import Pacer, run_batch

    class Fake:
        labels, calls = ["x"], []

        def row_tokens(self, kind, rows):
            return [10] * len(rows)

        def classify(self, texts):
            self.calls.append(list(texts))
            return [(t.upper(), {}) for t in texts]
    fake, delivered, gone = Fake(), [], {1}
    pacer = Pacer(cap_s=1.0)
    pacer.observe(1, 0.5)  # 0.5 s a row: two rows per call
    run_batch(fake, "classify", [["a", "b"], ["dead"], ["c", "d", "e"]],
              lambda i, result: delivered.append((i, [label for label, _ in result])),
              lambda i: i not in gone, budget=1000, pacer=pacer)
    assert delivered == [(0, ["A", "B"]), (2, ["C", "D", "E"])]
    assert fake.calls == [["a", "b"], ["c", "d"], ["e"]]  # "dead" never computed, two rows per call


def test_item3_serve_sets_its_concurrency_limit(run_dir, monkeypatch):
    import uvicorn

    from tunesmith.serve.server import serve

    seen = {}

    class FakeServer:
        def __init__(self, config):
            seen["config"], self.started = config, True

        def run(self, sockets=None):
            seen["ran"] = True
    monkeypatch.setattr(uvicorn, "Server", FakeServer)
    monkeypatch.delenv("TUNESMITH_API_KEYS", raising=False)
    serve(Path(run_dir), "127.0.0.1", free_port())
    capacity = seen["config"].http.keywords["capacity"]  # connections.HeadDeadline counts into it
    assert seen["ran"] and capacity.limit == ServeConfig().max_concurrency
    assert seen["config"].http.keywords["seconds"] == ServeConfig().body_timeout_s
    assert seen["config"].app.capacity is capacity  # the CapacityGuard around the app reads it
    # X-Forwarded-For must not rewrite the client address refused connections are counted out by
    assert seen["config"].proxy_headers is False


def test_connections_that_send_no_request_head_are_closed_and_free_their_slots():
    """serve.max_concurrency counts open connections (as uvicorn's limit_concurrency does): sockets that
    send nothing, or trickle their header lines, would hold every slot (503 for everyone, no key
    needed). HeadDeadline closes them once the deadline has passed; a request being answered, however
    slowly, is never cut."""
    import socket

    from tunesmith.serve.connections import Capacity, CapacityGuard, head_deadline_protocol

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] == "/slow":
            await asyncio.sleep(2.5)  # longer than the deadline: an answer in progress is not a waiting head
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
    capacity, rejected = Capacity(4), []
    url, stop = start_server(CapacityGuard(app, capacity, lambda scope: rejected.append(1)),
                             http=head_deadline_protocol(1.0, capacity))
    port = int(url.rsplit(":", 1)[1])
    try:
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        trickler = socket.create_connection(("127.0.0.1", port))
        trickler.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        time.sleep(0.3)
        busy = httpx.get(url + "/", timeout=5)  # every slot held: the API's JSON 503, not a plain-text one
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and rejected == [1]
        assert "serve.max_concurrency" in busy.json()["error"]["message"]
        for _ in range(5):  # a header line every 0.3 s does not keep the connection
            time.sleep(0.3)
            try:
                trickler.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
        for sock in silent + [trickler]:
            sock.settimeout(5)
            assert sock.recv(100) == b"", "the server closes a connection that sent no whole request head"
            sock.close()
        with httpx.Client(timeout=10) as client:  # slots free again; keep-alive and a slow answer both work
            assert client.get(url + "/slow").text == "ok" and client.get(url + "/").text == "ok"
            # The client's kept-alive connection; the request is counted out after its last byte is sent,
            # which the client may read first on a busy machine.
            wait_until(lambda: (capacity.connections, capacity.requests) == (1, 0), 5, "the answered request out")
        wait_until(lambda: capacity.connections == 0, 10, "the closed connection to be counted out")
    finally:
        stop()


def test_a_burst_past_max_concurrency_refuses_only_the_connections_past_it():
    """A refused connection kept its slot until it closed: in a burst of 30 connections at a limit of 20,
    every request saw 30 and was refused until refusals had closed (4 answered, 26 refused). Now the
    first N - limit are refused, their slots counted out at once, and the rest answered."""
    import socket

    from tunesmith.serve.connections import Capacity, CapacityGuard, head_deadline_protocol

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await asyncio.sleep(0.3)  # every answered request is still running when the last one arrives
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
    capacity = Capacity(4)
    url, stop = start_server(CapacityGuard(app, capacity), http=head_deadline_protocol(5.0, capacity))
    port = int(url.rsplit(":", 1)[1])
    try:
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(7)]
        wait_until(lambda: capacity.connections == 7, 10, "the burst's connections to be counted")
        for sock in socks:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        codes = []
        for sock in socks:
            sock.settimeout(10)
            codes.append(sock.recv(4096).split(b" ", 2)[1])
            sock.close()
        assert sorted(codes) == [b"200"] * 4 + [b"503"] * 3, codes
        wait_until(lambda: capacity.connections == 0 and not capacity.refused, 10, "every slot to be free")
    finally:
        stop()


def test_requests_refused_in_front_of_the_app_are_counted_by_route_and_status(service, tmp_path):
    """A foreign Host (421) or Origin (403) and a 503 past serve.max_concurrency were answered before the
    app and missing from tunesmith_requests_total, "requests by route and status"."""
    from tunesmith.serve.connections import Capacity
    from tunesmith.serve.server import guarded

    capacity = Capacity(4)
    front = guarded(create_app(service, ServeConfig(), [], tmp_path / "log.db"), "127.0.0.1", capacity)
    with TestClient(front, base_url="http://localhost") as c:
        assert c.get("/v1/models", headers={"Host": "evil.example"}).status_code == 421
        assert c.get("/v1/nope", headers={"Origin": "https://evil.example"}).status_code == 403
        capacity.connections = 9  # past the limit (the test client's requests open no real connection)
        assert c.get("/v1/models").status_code == 503
        capacity.connections = 0
        text = c.get("/metrics").text
    assert 'tunesmith_requests_total{route="/v1/models",status="421"} 1.0' in text
    assert 'tunesmith_requests_total{route="other",status="403"} 1.0' in text
    assert 'tunesmith_requests_total{route="/v1/models",status="503"} 1.0' in text
    assert 'tunesmith_rejected_total{reason="connections"} 1.0' in text


def test_item3_a_blocked_log_write_never_holds_an_answer_past_the_deadline(service, tmp_path, monkeypatch,
                                                                             caplog):
    """The request log is written after the model answers: a write that hangs (here: held on an
    event) is waited for only until the request's deadline, then goes on in the background. At most
    2 x serve.max_queue writes may be pending; past that a request's rows are dropped, counted and logged."""
    held, entered = threading.Event(), []
    real = RequestLog.write

    def stuck(self, rows):
        entered.append(len(rows))
        held.wait(60)
        real(self, rows)
    monkeypatch.setattr(RequestLog, "write", stuck)
    monkeypatch.setattr(store_module, "WAIT_CAP_S", 60.0)  # so the deadline is what bounds the wait
    cfg = ServeConfig(request_timeout_s=3, max_queue=1)  # at most 2 writes pending
    try:
        with caplog.at_level(logging.ERROR, logger="tunesmith.serve"):
            with TestClient(create_app(service, cfg, [], tmp_path / "log.db")) as c:
                answers = []
                for text in ("red", "blue", "green", "red again"):
                    started = time.monotonic()
                    answers.append((c.post("/v1/classify", json={"text": text}).status_code,
                                    time.monotonic() - started))
                metrics = c.get("/metrics").text
                held.set()  # the two pending writes finish before the app closes
    finally:
        held.set()
    assert [status for status, _ in answers] == [200] * 4
    assert all(seconds < cfg.request_timeout_s + 5 for _, seconds in answers), answers  # not the held 60 s
    assert entered == [1, 1]  # the third and fourth requests found 2 writes pending
    assert _metric(metrics, 'tunesmith_request_log_failures_total{reason="dropped"}') == 2
    assert len([r for r in caplog.records if "rows dropped" in r.getMessage()]) == 1  # rate-limited
    rows = [r[0] for r in sqlite3.connect(tmp_path / "log.db").execute("SELECT input FROM requests ORDER BY id")]
    assert sorted(rows) == ["blue", "red"]  # the held writes completed in the background


def test_item3_a_locked_database_cannot_hold_requests(service, tmp_path, monkeypatch):
    """Another connection holds the request log exclusively: each write waits SQLite's busy timeout
    and fails, but requests are answered after at most WAIT_CAP_S of it, and the failures are counted."""
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", 4.0)
    monkeypatch.setattr(store_module, "WAIT_CAP_S", 0.1)
    path = tmp_path / "log.db"
    RequestLog(path).close()  # the schema, then the lock
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with TestClient(create_app(service, ServeConfig(max_queue=1), [], path)) as c:
            answers = []
            for text in ("red", "blue", "green"):
                started = time.monotonic()
                answers.append((c.post("/v1/classify", json={"text": text}).status_code, time.monotonic() - started))
            for _ in range(300):  # the two pending writes fail after the busy timeout, one after the other
                metrics = c.get("/metrics").text
                if _metric(metrics, 'tunesmith_request_log_failures_total{reason="write"}') >= 2:
                    break
                time.sleep(0.1)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert [status for status, _ in answers] == [200] * 3
    assert all(seconds < store_module.BUSY_TIMEOUT_S - 1 for _, seconds in answers), answers
    assert _metric(metrics, 'tunesmith_request_log_failures_total{reason="write"}') == 2
    assert _metric(metrics, 'tunesmith_request_log_failures_total{reason="dropped"}') == 1


def test_item3_a_trickled_body_gets_408(service, caplog):
    """A client that sends part of a body and then nothing more is answered 408 once
    serve.body_timeout_s has passed, instead of holding its connection for as long as it likes."""
    from pydantic import ValidationError

    app = create_app(service, ServeConfig(body_timeout_s=0.3), [])
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/classify", "raw_path": b"/v1/classify", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"), (b"content-length", b"100")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    sent, parts = [], iter([{"type": "http.request", "body": b'{"text": "re', "more_body": True}])

    async def receive():
        part = next(parts, None)
        if part is None:
            await asyncio.Event().wait()  # the rest of the body never comes
        return part

    async def send(message):
        sent.append(message)
    with caplog.at_level(logging.ERROR, logger="tunesmith.serve"):
        asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 408
    error = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"]
    assert error["code"] == 408 and "serve.body_timeout_s" in error["message"]
    assert not [r for r in caplog.records if "answered 500" in r.getMessage()]
    assert _metric(app.state.metrics.exposition().decode(),
                   'tunesmith_requests_total{route="/v1/classify",status="408"}') == 1
    with pytest.raises(ValidationError):
        ServeConfig(body_timeout_s=0)


# -- item 4: failure isolation ------------------------------------------------------------------------
def test_item4_a_lone_surrogate_fails_only_its_own_request(service, tmp_path):
    app = create_app(service, ServeConfig(max_wait_ms=100), [], tmp_path / "log.db")

    async def mixed():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            json_type = {"content-type": "application/json"}
            bad = c.post("/v1/classify", content=b'{"text": "red \\ud800"}', headers=json_type)
            good = [c.post("/v1/classify", json={"text": f"blue {i}"}) for i in range(10)]
            chat = c.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
                          headers=json_type)
            return await asyncio.gather(bad, chat, *good)
    bad, chat, *good = asyncio.run(mixed())
    assert bad.status_code == 400 and "Unicode" in bad.json()["error"]["message"]
    assert chat.status_code == 400
    assert [g.status_code for g in good] == [200] * 10 and all(g.json()["label"] in LABELS for g in good)


def test_item4_a_failing_batch_fails_only_the_request_at_fault():
    from concurrent.futures import ThreadPoolExecutor

    calls = []

    def run_batch(kind, items, deliver, alive):
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("cannot encode")
        for i, item in enumerate(items):
            deliver(i, item.upper())

    async def go():
        batcher = MicroBatcher(run_batch, max_batch=16, max_wait_ms=50, executor=ThreadPoolExecutor(1))
        return await asyncio.gather(*(batcher.submit("classify", t) for t in ["a", "b", "bad", "c"]),
                                    return_exceptions=True)
    results = asyncio.run(go())
    assert results[:2] == ["A", "B"] and results[3] == "C" and isinstance(results[2], ValueError)
    assert calls[0] == ["a", "b", "bad", "c"]  # one batch first, then each request alone


def test_item4_request_log_failures_never_fail_a_request(service, tmp_path, monkeypatch, caplog):
    def full(self, rows):
        raise sqlite3.OperationalError("database or disk is full")
    monkeypatch.setattr(RequestLog, "write", full)
    with caplog.at_level(logging.ERROR, logger="tunesmith.serve"):
        with TestClient(create_app(service, ServeConfig(), [], tmp_path / "log.db")) as c:
            answers = [c.post("/v1/classify", json={"text": t}).status_code for t in ("red", "blue", "green")]
            chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "red"}]})
            metrics = c.get("/metrics").text
    assert answers == [200, 200, 200] and chat.status_code == 200
    assert _metric(metrics, 'tunesmith_request_log_failures_total{reason="write"}') == 4
    lines = [r.getMessage() for r in caplog.records if "request log write failed" in r.getMessage()]
    assert len(lines) == 1 and "OperationalError" in lines[0]  # logged, at most once per interval


# -- item 6 (server part): bounded label set ----------------------------------------------------------
def test_item6_free_text_answers_count_as_one_metric_label(service, monkeypatch):
    monkeypatch.setattr(service, "complete", lambda examples, limits, **_: [
        Completion(f"free text {i} from upstream", "stop", 3, 4) for i, _ in enumerate(examples)])
    with TestClient(create_app(service, ServeConfig())) as c:
        for i in range(3):
            assert c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": f"q{i}"}]}
                          ).status_code == 200
        metrics = c.get("/metrics").text
    assert _metric(metrics, 'tunesmith_predicted_label_total{label="other"}') == 3
    assert "free text" not in metrics


def test_item6_a_stream_failing_before_its_first_piece_is_a_502(service, monkeypatch, caplog):
    """A stream sends its headers with the first piece: an engine (upstream) failure before it is an
    ordinary 502, any other failure a 500 with one log line; after it an error event is all SSE allows."""
    from tunesmith.errors import EngineError

    def failing(error, pieces=()):
        def stream(example, max_tokens, cancelled):
            yield from pieces
            raise error
        return stream
    body = {"prompt": "red", "max_tokens": 4, "stream": True}
    with caplog.at_level(logging.ERROR, logger="tunesmith.serve"):
        with TestClient(create_app(service, ServeConfig())) as c:
            monkeypatch.setattr(service, "stream", failing(EngineError("upstream answered 500")))
            upstream = c.post("/v1/completions", json=body)
            monkeypatch.setattr(service, "stream", failing(RuntimeError("boom")))
            internal = c.post("/v1/completions", json=body)
            monkeypatch.setattr(service, "stream", failing(EngineError("upstream went away"), ["re", "d"]))
            late = c.post("/v1/completions", json=body)
            metrics = c.get("/metrics").text
    assert upstream.status_code == 502 and upstream.headers["content-type"] == "application/json"
    assert upstream.json()["error"]["code"] == 502 and "upstream answered 500" in upstream.json()["error"]["message"]
    assert internal.status_code == 500 and internal.json()["error"]["message"] == "internal error"
    rid = internal.headers["X-Request-ID"]
    assert len([r for r in caplog.records if rid in r.getMessage()]) == 1
    assert late.status_code == 200 and late.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in late.text.splitlines() if line.startswith("data: {")]
    assert [e["choices"][0]["text"] for e in events[:2]] == ["re", "d"] and events[-1]["error"]["code"] == 502
    assert _metric(metrics, 'tunesmith_errors_total{route="/v1/completions"}') == 2


# -- item 7: operators see failures -------------------------------------------------------------------
def test_item7_a_500_logs_one_line_with_the_request_id(service, monkeypatch, caplog):
    monkeypatch.setattr(service, "classify", lambda texts: (_ for _ in ()).throw(RuntimeError("boom secret")))
    with caplog.at_level(logging.ERROR, logger="tunesmith.serve"):
        with TestClient(create_app(service, ServeConfig())) as c:
            failed = c.post("/v1/classify", json={"text": "red"})
            health = c.get("/healthz", headers={"X-Request-ID": "client-id-7"})
            invalid = c.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    rid = failed.headers["X-Request-ID"]
    assert failed.status_code == 500 and re.fullmatch(r"[0-9a-f]{32}", rid)
    assert health.headers["X-Request-ID"] == "client-id-7"
    assert re.fullmatch(r"[0-9a-f]{32}", invalid.headers["X-Request-ID"])
    lines = [r.getMessage() for r in caplog.records if rid in r.getMessage()]
    assert len(lines) == 1 and "RuntimeError" in lines[0] and "/v1/classify" in lines[0]
    assert "boom secret" not in lines[0]  # the type, never the message: it may carry user text


def test_item7_drift_update_failures_are_counted(run_dir, tmp_path, monkeypatch, caplog):
    metrics = ServeMetrics()
    log = RequestLog(tmp_path / "log.db")
    watch = DriftWatch(Path(run_dir), log, DriftSettings(update_every=1), metrics)
    monkeypatch.setattr(watch, "update_now", lambda: (_ for _ in ()).throw(OSError("reference unreadable")))
    with caplog.at_level(logging.ERROR, logger="tunesmith.serve"):
        for _ in range(2):
            watch.seen(1)
            watch.close()
    log.close()
    assert _metric(metrics.exposition().decode(), "tunesmith_drift_update_failures_total") == 2
    assert any("drift update failed: OSError" in r.getMessage() for r in caplog.records)


# -- the app is routers over one ServerState ---------------------------------------------------------
class _EchoEngine:
    """An engine in the shape of an upstream one (no row_tokens: it bounds its own batches) that
    answers each prompt upper-cased, so the routes, the state and the request log run without a model."""

    name, variant, load_seconds, threads, labels, scores_labels, run_dir = "echo", "fp32", 0.0, 1, None, False, None

    def __init__(self):
        self.closed = 0

    def example(self, prompt=None, messages=None):
        return Example(input=prompt if prompt is not None else messages[-1]["content"], target="", source="request")

    def complete(self, examples, max_tokens):
        return [Completion(e.input.upper(), "stop", len(e.input), 1) for e in examples]

    def stream(self, example, max_tokens, cancelled):
        yield from example.input.upper().split()

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        self.closed += 1


def test_server_state_is_built_shared_by_the_routes_and_closed_once(tmp_path):
    from tunesmith.serve.state import build_state

    engine, path = _EchoEngine(), tmp_path / "log.db"
    state = build_state(engine, ServeConfig(), [], path)
    assert state.store is not None and state.writer is not None and state.watch is None  # no run dir: no drift
    asyncio.run(state.record([{"route": "/v1/completions", "key_id": None, "input": "hi", "output": "HI"}]))
    state.close()
    assert engine.closed == 1 and [r["output"] for r in store_module.recent(path, 10)] == ["HI"]
    bare = build_state(_EchoEngine(), ServeConfig(), [], None)
    assert bare.store is None and bare.writer is None and bare.watch is None
    asyncio.run(bare.record([{"route": "/v1/completions", "input": "x"}]))  # no log: nothing to do, no error
    bare.close()


def test_every_route_group_answers_through_the_composed_app(tmp_path):
    engine, path = _EchoEngine(), tmp_path / "log.db"
    with TestClient(create_app(engine, ServeConfig(), ["sk-test"], path)) as c:
        auth = {"Authorization": "Bearer sk-test"}
        assert c.get("/healthz").json() == {"status": "ok"}  # open without a key
        assert c.get("/readyz").status_code == 401
        assert c.get("/readyz", headers=auth).json()["status"] == "ready"
        assert c.get("/v1/models", headers=auth).json()["data"][0]["id"] == "echo"
        done = c.post("/v1/completions", headers=auth, json={"prompt": "hello there"}).json()
        chat = c.post("/v1/chat/completions", headers=auth, json={"messages": [{"role": "user", "content": "hi"}]})
        streamed = c.post("/v1/completions", headers=auth, json={"prompt": "a b", "stream": True}).text
        refused = c.post("/v1/classify", headers=auth, json={"text": "x"})
        too_long = c.post("/v1/completions", headers=auth, json={"prompt": "x", "max_tokens": 10**6})
        exposition = c.get("/metrics", headers=auth).text
    assert engine.closed == 1  # the lifespan closed the state
    assert done["choices"][0]["text"] == "HELLO THERE" and done["usage"]["total_tokens"] == 12
    assert chat.json()["choices"][0]["message"] == {"role": "assistant", "content": "HI"}
    assert streamed.count("data: ") == 4 and streamed.endswith("data: [DONE]\n\n")  # A, B, finish, [DONE]
    assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request_error"
    assert too_long.status_code == 400 and "max_tokens must be at most" in too_long.json()["error"]["message"]
    assert _metric(exposition, 'tunesmith_requests_total{route="/v1/completions",status="200"}') == 2
    assert [r["output"] for r in store_module.recent(path, 10)] == ["HELLO THERE", "HI", "AB"]


def test_retry_after_prices_each_kind_at_its_own_call_time():
    """One average over every call priced a queue of slow generations at the speed of quick
    classifications (and the other way round): each kind has its own."""
    from concurrent.futures import ThreadPoolExecutor

    async def go():
        loop = asyncio.get_running_loop()
        batcher = MicroBatcher(lambda *a: None, max_batch=4, max_wait_ms=1, executor=ThreadPoolExecutor(1))
        assert batcher.retry_after() == 1  # nothing measured, nothing queued
        batcher.batch_seconds = {"classify": 0.5, "complete": 6.0}
        batcher.waiting.extend(("classify", i, loop.create_future()) for i in range(8))  # 2 calls of 0.5 s
        quick = batcher.retry_after()
        batcher.waiting.extend(("complete", i, loop.create_future()) for i in range(5))  # 2 calls of 6 s
        slow = batcher.retry_after()
        gone = loop.create_future()
        gone.cancel()  # a request past its deadline holds no place in the estimate
        batcher.waiting.extend(("complete", 9, gone) for _ in range(40))
        return quick, slow, batcher.retry_after()
    quick, slow, with_gone = asyncio.run(go())
    assert quick == 7  # the call running (up to the slowest kind, 6 s) + 2 x 0.5 s
    assert slow == 19 and with_gone == 19  # + 2 x 6 s; capped at 60 either way


def test_a_request_the_queue_ahead_cannot_reach_in_time_is_refused_at_once():
    """Requests measured at >= 0.3 s each, 1 s to answer: in a burst of eight, a request with four or
    more queued ahead cannot be reached, so it is refused on arrival (not after waiting out its
    deadline) and never reaches the model. A kind not yet measured is admitted, whatever the queue."""
    from concurrent.futures import ThreadPoolExecutor

    seen = []

    def run_batch(kind, items, deliver, alive):
        seen.extend(items)
        time.sleep(0.3)
        for i, item in enumerate(items):
            deliver(i, item)

    async def go():
        batcher = MicroBatcher(run_batch, max_batch=1, max_wait_ms=0, executor=ThreadPoolExecutor(1))
        first = await batcher.submit("complete", "warm")  # measures the kind's call time
        while "complete" not in batcher.row_seconds:  # measured when the call returns, after the answer
            await asyncio.sleep(0.01)
        deadline = time.monotonic() + 1.0
        burst = await asyncio.gather(*(batcher.submit("complete", i, deadline) for i in range(8)),
                                     return_exceptions=True)
        unmeasured = await batcher.submit("classify", "new", time.monotonic() + 5.0)
        batcher.row_seconds["complete"] = 100.0  # one slow call must not refuse all that follow
        alone = await batcher.submit("complete", "alone", time.monotonic() + 5.0)
        return first, burst, unmeasured, alone

    first, burst, unmeasured, alone = asyncio.run(go())
    assert first == "warm" and unmeasured == "new" and alone == "alone"  # nothing queued ahead: admitted
    refused = [i for i, r in enumerate(burst) if isinstance(r, Overloaded) and "would not be" in r.reason]
    assert len(refused) >= 4 and refused == list(range(8 - len(refused), 8)), burst  # the last to arrive
    assert all(burst[i].kind == "deadline" and burst[i].retry_after >= 1 for i in refused)
    assert not set(refused) & set(seen), seen
    assert 0 in seen  # the first of the burst was admitted


def test_admission_admits_behind_a_kind_not_yet_measured_and_refuses_without_it():
    """The estimate errs towards admitting: a queue holding a kind with no measured time is not priced."""
    from concurrent.futures import ThreadPoolExecutor

    async def go():
        loop = asyncio.get_running_loop()
        batcher = MicroBatcher(lambda *a: None, max_batch=4, max_wait_ms=1, executor=ThreadPoolExecutor(1))
        batcher.row_seconds, batcher.batch_seconds = {"complete": 2.0}, {"complete": 8.0}  # batched: 3 x 8 s
        batcher.waiting.extend(("complete", i, loop.create_future()) for i in range(10))  # 20 s of work
        unmeasured = ("classify", "x", loop.create_future())
        batcher.waiting.append(unmeasured)
        soon = time.monotonic() + 5.0
        batcher._refuse_hopeless(soon)  # admitted: the classify call's time is unknown
        batcher.waiting.remove(unmeasured)
        try:
            batcher._refuse_hopeless(soon)
        except Overloaded as e:
            return e
        return None
    refused = asyncio.run(go())
    assert refused is not None and refused.kind == "deadline" and "10 queued ahead" in refused.reason


def test_admission_prices_a_request_of_many_texts_by_its_rows():
    """One classify request of 100 texts ahead is 100 rows of model work, not one request's worth, when
    the kind's times were measured on single texts; measured on requests of 50 texts, a queue of such
    requests is priced per call as before (Retry-After too). The server's batcher counts a classify
    request's texts (state.py), any other request as one row."""
    from concurrent.futures import ThreadPoolExecutor

    from tunesmith.serve import state as state_module

    async def go(texts: int, requests: int = 1, measured_rows: float = 1.0):
        loop = asyncio.get_running_loop()
        batcher = MicroBatcher(lambda *a: None, max_batch=4, max_wait_ms=1, executor=ThreadPoolExecutor(1),
                               rows=lambda kind, item: len(item) if kind == "classify" else 1)
        batcher.row_seconds, batcher.batch_seconds = {"classify": 0.1}, {"classify": 0.4}
        batcher.request_rows = {"classify": measured_rows}
        batcher.waiting.extend(("classify", ["t"] * texts, loop.create_future()) for _ in range(requests))
        try:
            batcher._refuse_hopeless(time.monotonic() + 5.0)
        except Overloaded as e:
            return e, batcher.retry_after()
        return None, batcher.retry_after()
    refused, retry = asyncio.run(go(100))  # 100 rows at 0.1 s (a call of 4 single texts: 0.4 s x 100)
    assert refused is not None and "1 queued ahead, about 10.0 s" in refused.reason and retry == 41
    assert asyncio.run(go(8)) == (None, 4)  # 0.8 s of rows; Retry-After: the call running + 0.4 s x 8
    # Measured on requests of 50 texts: 12 such requests are 3 calls of 0.4 s (their rows: 60 s)
    assert asyncio.run(go(50, requests=12, measured_rows=50.0)) == (None, 2)
    served = state_module._batcher(object(), ServeConfig(), ThreadPoolExecutor(1), None, None)
    assert served.rows("classify", ["a", "b", "c"]) == 3 and served.rows("complete", ("prompt", 5)) == 1
