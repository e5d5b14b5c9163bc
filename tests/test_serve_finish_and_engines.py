"""Serve on engines that decode greedily only (ct2, ORT) refuses what it cannot honour instead of ignoring
it, and a stream reports finish_reason "length" by tokens decoded, not by pieces sent."""

from __future__ import annotations

import dataclasses
import json

import pytest
from fastapi.testclient import TestClient

from tunesmith.config import ServeConfig
from tunesmith.serve.app import create_app
from tunesmith.serve.service import load_service


@pytest.fixture(scope="module")
def service(tiny_model):
    return load_service(tiny_model)


def _greedy_only(service):
    """The tiny model behind a `complete` hook, as the ct2 and ORT variants are served."""
    def complete(prompts, limits):
        return [[5, 6, 7][:n] for n in limits]
    return dataclasses.replace(service, predictor=dataclasses.replace(service.predictor, complete=complete))


@pytest.mark.parametrize("fields,named", [({"temperature": 0.7}, "temperature"),
                                          ({"repetition_penalty": 1.3}, "repetition_penalty"),
                                          ({"temperature": 0, "repetition_penalty": 1.3}, "repetition_penalty")])
def test_a_greedy_only_engine_refuses_what_it_would_ignore(service, tmp_path, fields, named):
    assert not _greedy_only(service).samples
    with TestClient(create_app(_greedy_only(service), ServeConfig(), None, tmp_path / "r.db")) as c:
        for route, body in (("/v1/completions", {"prompt": "x"}),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
            r = c.post(route, json={**body, **fields})
            assert r.status_code == 400, r.text
            message = r.json()["error"]["message"]
            assert "greedily" in message and named in message, message


def test_a_greedy_only_engine_takes_what_greedy_decoding_honours(service, tmp_path):
    """Stop strings are cut from the decoded text; a seed, top_p and top_k change nothing greedy (as on torch)."""
    with TestClient(create_app(_greedy_only(service), ServeConfig(), None, tmp_path / "r.db")) as c:
        for fields in ({"stop": "y"}, {"seed": 3}, {"temperature": 0, "top_p": 0.5, "top_k": 3},
                       {"repetition_penalty": 1.0}):
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, **fields})
            assert r.status_code == 200, (fields, r.text)


def _stream(c, body: dict) -> tuple[str, str]:
    with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line and line != "data: [DONE]"]
    return "".join(e["choices"][0]["text"] for e in events), events[-1]["choices"][0]["finish_reason"]


def test_a_stream_that_ran_out_of_tokens_says_length_even_with_stop_strings(service, tmp_path):
    """A stop string that the answer's start keeps looking like holds every piece back until the end: the
    stream sends one piece for max_tokens tokens, yet it ran out of tokens all the same."""
    with TestClient(create_app(service, ServeConfig(max_tokens=32), None, tmp_path / "r.db")) as c:
        body = next(b for b in ({"prompt": "my card bank", "temperature": 1.0, "seed": s, "max_tokens": 8}
                                for s in range(11, 40))
                    if c.post("/v1/completions", json=b).json()["choices"][0]["finish_reason"] == "length")
        text, finish = _stream(c, body)
        assert finish == "length" and len(text.strip()) > 1
        never = text[:40] + "\u2603"  # the answer so far, then a character it never reaches
        held, finish = _stream(c, {**body, "stop": [never]})
        assert held == text and finish == "length"
