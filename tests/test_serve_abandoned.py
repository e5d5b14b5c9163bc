"""A model call whose every request has gone (its client left, or past its deadline) stops decoding
at the next token: a long answer nobody waits for held the model thread, and every request queued
behind it timed out in turn."""

from __future__ import annotations

import pytest

from tunesmith.serve.model_calls import Pacer, run_batch
from tunesmith.serve.service import load_service


@pytest.fixture(scope="module")
def service(tiny_model):
    return load_service(tiny_model)


def test_decoding_stops_at_the_next_token_once_the_call_is_abandoned(service):
    example = service.example(prompt="tell me a long story")
    whole = service.complete([example], [24])[0]
    assert whole.completion_tokens > 3
    asked = []

    def gone() -> bool:  # asked once a token: gone after the third
        asked.append(1)
        return len(asked) >= 3
    cut = service.complete([example], [24], abandoned=gone)[0]
    assert cut.completion_tokens == 3 and whole.text.startswith(cut.text)
    assert service.complete([example], [24], abandoned=lambda: False)[0] == whole  # never gone: the same answer


def test_a_batch_decodes_on_while_one_request_waits_and_stops_when_none_does(service):
    items = [(service.example(prompt=p), 24) for p in ("one story", "another story")]
    asked = []

    def first_leaves(i: int) -> bool:  # request 0 goes once the call runs; request 1 stays
        asked.append(i)
        return i == 1 or len(asked) <= 2
    delivered = {}
    run_batch(service, "complete", items, lambda i, done: delivered.update({i: done}), first_leaves, budget=4096,
              pacer=Pacer(60))
    assert delivered[1].completion_tokens > 3  # decoded on: one request still waited
    answers = iter([True, True])  # both waiting when the call starts, both gone at its first token

    def both_leave(i: int) -> bool:
        return next(answers, False)
    pacer = Pacer(60)
    run_batch(service, "complete", items, lambda i, done: delivered.update({i: done}), both_leave, budget=4096,
              pacer=pacer)
    assert delivered[0].completion_tokens <= 1 and delivered[1].completion_tokens <= 1
    assert pacer.per_row == 0  # a call cut short is not a measure of what a row costs



def test_a_client_that_leaves_a_completion_stops_its_decoding(service, monkeypatch):
    """The deadline alone stopped it: a client that gave up after 1 s still held the model for the
    whole request_timeout_s, and every request queued behind it waited that long."""
    import threading

    import httpx

    from conftest import start_server
    from tunesmith.config import ServeConfig
    from tunesmith.serve.app import create_app

    stopped, real = threading.Event(), service.complete

    def slow_complete(examples, limits, sampling=None, abandoned=None):
        for _ in range(600):  # up to 60 s, as a long answer on a slow CPU would take
            if abandoned is not None and abandoned():
                stopped.set()
                break
            stopped.wait(0.1)
        return real(examples, [1] * len(examples))
    monkeypatch.setattr(service, "complete", slow_complete)
    url, stop = start_server(create_app(service, ServeConfig(request_timeout_s=120)))
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={"prompt": "a long story", "max_tokens": 8}, timeout=1.0)
        assert stopped.wait(30), "the model call went on after its client left"
        answered = httpx.post(f"{url}/v1/completions", json={"prompt": "next", "max_tokens": 2}, timeout=60)
        assert answered.status_code == 200  # the server serves on
    finally:
        stop()
