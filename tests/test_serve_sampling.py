"""The server honours OpenAI's decoding fields (temperature, top_p, stop, seed, ...) on a tiny random
model: seeded answers repeat, stop strings cut (streamed or not), bad values are a 400 naming the field."""

from __future__ import annotations

import dataclasses
import json

import pytest
from fastapi.testclient import TestClient

from tunesmith.config import GenerationSettings, ServeConfig
from tunesmith.data.examples import Example
from tunesmith.serve.app import create_app
from tunesmith.serve.remote import RemoteService
from tunesmith.serve.service import load_service

HOT = {"temperature": 1.0, "max_tokens": 16}


@pytest.fixture(scope="module")
def service(tiny_model):
    return load_service(tiny_model)


@pytest.fixture()
def client(service, tmp_path):
    with TestClient(create_app(service, ServeConfig(max_tokens=32), None, tmp_path / "requests.db")) as c:
        yield c


def _text(c, route: str, body: dict) -> tuple[str, str]:
    r = c.post(route, json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice.get("text", choice.get("message", {}).get("content")), choice["finish_reason"]


def _streamed(c, body: dict) -> str:
    with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1])


def test_same_seed_same_answer_other_seed_differs(client):
    body = {"prompt": "my card bank", **HOT}
    first = _text(client, "/v1/completions", {**body, "seed": 11})[0]
    assert _text(client, "/v1/completions", {**body, "seed": 11})[0] == first
    others = {_text(client, "/v1/completions", {**body, "seed": s})[0] for s in (12, 13, 14)}
    assert others != {first}
    greedy = _text(client, "/v1/completions", {"prompt": "my card bank", "max_tokens": 16})[0]
    assert greedy == _text(client, "/v1/completions", {"prompt": "my card bank", "max_tokens": 16,
                                                       "temperature": 0, "seed": 5})[0]
    assert first != greedy  # the fields are used, not ignored


def test_chat_takes_the_same_fields(client):
    body = {"messages": [{"role": "user", "content": "red blue"}], **HOT, "top_p": 0.9, "seed": 3}
    assert _text(client, "/v1/chat/completions", body) == _text(client, "/v1/chat/completions", body)


def test_stop_strings_cut_whole_and_streamed_answers(client):
    # The tiny random model ends its greedy answers at once: a seeded sample has text to cut.
    body = {"prompt": "my card bank", **HOT, "seed": 11}
    full, _ = _text(client, "/v1/completions", body)
    assert len(full) > 6
    stop = full[3:5]
    cut, finish = _text(client, "/v1/completions", {**body, "stop": stop})
    assert cut == full[:full.find(stop)] and finish == "stop"
    assert _streamed(client, {**body, "stop": [stop, "never there"]}) == cut


def test_a_seeded_stream_is_the_seeded_answer(client):
    body = {"prompt": "help me now", **HOT, "seed": 21, "repetition_penalty": 1.2, "top_k": 40}
    assert _streamed(client, body) == _text(client, "/v1/completions", body)[0]


@pytest.mark.parametrize("bad,field", [({"temperature": 2.5}, "temperature"), ({"top_p": 0}, "top_p"),
                                       ({"top_k": -2}, "top_k"), ({"stop": ["a"] * 5}, "stop"),
                                       ({"stop": "x" * 65}, "stop"), ({"seed": -1}, "seed"),
                                       ({"repetition_penalty": 3}, "repetition_penalty"),
                                       ({"repetition_penalty": 1e-300}, "repetition_penalty"),
                                       ({"frequency_penalty": 0.5}, "frequency_penalty"),
                                       ({"presence_penalty": -1}, "presence_penalty"), ({"n": 2}, "n must be 1"),
                                       ({"logprobs": 5}, "logprobs"), ({"logprobs": True}, "logprobs"),
                                       ({"logit_bias": {"5": 100}}, "logit_bias"), ({"echo": True}, "echo"),
                                       ({"best_of": 3}, "best_of"), ({"top_logprobs": 2}, "top_logprobs")])
def test_bad_values_are_a_400_naming_the_field(client, bad, field):
    for route, body in (("/v1/completions", {"prompt": "x"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        r = client.post(route, json={**body, **bad})
        assert r.status_code == 400 and field in r.json()["error"]["message"], r.text


def test_a_temperature_too_small_to_sample_with_decodes_greedily(client):
    """Logits divided by 1e-39 overflow to inf and sampling failed (500): below 1e-5 the answer is the
    greedy one, as vLLM does; a penalty small enough to overflow is a 400 (above)."""
    greedy = _text(client, "/v1/completions", {"prompt": "my card bank", "max_tokens": 8})
    for tiny in (1e-39, 5e-324, 9e-6):
        for stream in (False, True):
            body = {"prompt": "my card bank", "max_tokens": 8, "temperature": tiny, "seed": 3}
            got = _streamed(client, body) if stream else _text(client, "/v1/completions", body)[0]
            assert got == greedy[0], (tiny, stream)
    assert GenerationSettings(temperature=1e-5).temperature == 1e-5 and not GenerationSettings(temperature=1e-5).greedy


def test_zero_penalties_and_one_choice_are_accepted(client):
    plain = _text(client, "/v1/completions", {"prompt": "red", "max_tokens": 4})
    assert _text(client, "/v1/completions", {"prompt": "red", "max_tokens": 4, "frequency_penalty": 0,
                                             "presence_penalty": 0, "n": 1, "logprobs": None, "echo": False,
                                             "logit_bias": {}, "best_of": 1}) == plain


def test_a_greedy_only_engine_refuses_sampling(service, tmp_path):
    greedy_only = dataclasses.replace(service, predictor=dataclasses.replace(
        service.predictor, complete=lambda prompts, limits: [[] for _ in prompts]))
    with TestClient(create_app(greedy_only, ServeConfig(), None, tmp_path / "r.db")) as c:
        r = c.post("/v1/completions", json={"prompt": "x", "temperature": 0.7})
        assert r.status_code == 400 and "greedily" in r.json()["error"]["message"]
        assert c.post("/v1/completions", json={"prompt": "x", "stop": "y"}).status_code == 200


def test_the_sidecar_sends_the_settings_upstream(service):
    remote = object.__new__(RemoteService)
    remote.served_name, remote.tokenizer, remote.fmt = "up", service.predictor.tokenizer, service.fmt
    example = Example("hi", "", "request")
    assert remote.request_body(example, 5)["temperature"] == 0
    body = remote.request_body(example, 5, sampling=GenerationSettings(temperature=0.5, stop=["\n"], seed=0))
    assert body["temperature"] == 0.5 and body["stop"] == ["\n"] and body["seed"] == 0 and "top_k" not in body


@pytest.mark.parametrize("bad", [{"max_tokens": True}, {"temperature": False}, {"seed": True}])
def test_true_or_false_for_a_number_is_refused_not_read_as_one_or_zero(client, bad):
    for route, body in (("/v1/completions", {"prompt": "x"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        r = client.post(route, json={**body, **bad})
        assert r.status_code == 400 and "not true/false" in r.json()["error"]["message"], r.text


def test_a_checkpoint_with_a_short_context_answers_within_it(tiny_model, tmp_path):
    """A learned position table (GPT-2's) has no row past its context: prompts are cut to it, a token
    prompt longer is a 400, and an answer stops where the context ends (finish_reason "length"), in a
    batch, alone and streamed, instead of an IndexError (500)."""
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2-64"
    shutil.copytree(tiny_model, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    tok = load_service(tiny_model).predictor.tokenizer
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
                    ).save_pretrained(folder, safe_serialization=True)
    service = load_service(folder)
    assert service.fmt.max_length == 64
    with TestClient(create_app(service, ServeConfig(max_tokens=200), None, tmp_path / "r.db")) as c:
        r = c.post("/v1/completions", json={"prompt": [5] * 100, "max_tokens": 5})
        assert r.status_code == 400 and "1 to 64 ids" in r.json()["error"]["message"], r.text
        long_text = " ".join(["card"] * 300)
        for body in ({"prompt": [5] * 60, "max_tokens": 100}, {"prompt": long_text, "max_tokens": 100},
                     {"prompt": "hello", "max_tokens": 100, "temperature": 1.0, "seed": 1}):
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, (body, r.text)
            usage = r.json()["usage"]
            assert usage["prompt_tokens"] + usage["completion_tokens"] <= 64
            assert _streamed(c, body) is not None
        assert len(service.complete([service.example(prompt=[5] * 64), service.example(prompt="hi")], [8, 8])) == 2
        # a long prompt asking little beside a short one asking much: each fits alone, not in one batch
        long, short = service.example(prompt=[5] * 60), service.example(prompt=[5] * 10)
        done = service.complete([long, short], [2, 50])
        assert [d.prompt_tokens + d.completion_tokens <= 64 for d in done] == [True, True]


@pytest.mark.parametrize("bad,field", [({"stream": "yes"}, "stream"), ({"max_tokens": "5"}, "max_tokens"),
                                       ({"n": 1.0}, "n"), ({"seed": "7"}, "seed"),
                                       ({"prompt": [True, False]}, "prompt")])
def test_values_of_the_wrong_json_type_are_a_400_not_coerced(client, bad, field):
    """`stream: "yes"` streamed, `max_tokens: "5"` answered 5 tokens and `[true, false]` was read as token
    ids [1, 0]: request bodies are strictly typed (an int still goes where a float does)."""
    r = client.post("/v1/completions", json={"prompt": "x", **bad})
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"].startswith(field), r.text
    assert _text(client, "/v1/completions", {"prompt": "x", "max_tokens": 2, "temperature": 1, "seed": 1})


def _usage_streamed(c, body: dict) -> tuple[str, dict]:
    with c.stream("POST", "/v1/completions",
                  json={**body, "stream": True, "stream_options": {"include_usage": True}}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line and line != "data: [DONE]"]
    return "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"]), chunks[-1]["usage"]


def test_a_pad_token_sampled_mid_answer_does_not_end_it(service):
    """The unstreamed answer stopped at a sampled pad token and the stream went on past it: the same
    request answered two different texts. Only end-of-turn tokens end an answer (generate pads a row
    only after one)."""
    from tunesmith.models.tokens import stop_ids
    from tunesmith.serve.service import _completion

    tok = service.predictor.tokenizer
    eos, pad = stop_ids(tok)[0], tok.pad_token_id
    assert pad not in stop_ids(tok), "the tiny tokenizer must keep pad apart from its end of turn"
    done = _completion(tok, [40, pad, 41, eos, pad, pad], 7, 6)
    assert (done.completion_tokens, done.finish_reason, done.ids) == (3, "stop", (40, pad, 41))
    assert _completion(tok, [40, 41, 42], 7, 3).finish_reason == "length"


def test_a_stop_string_counts_the_tokens_decoded_up_to_it(client, service):
    """completion_tokens re-encoded the cut text: a sampled undecodable byte (U+FFFD) encodes as several
    tokens, so the count passed max_tokens. It is the tokens decoded until the stop string was complete,
    as the stream of the same request counts them."""
    from tunesmith.serve.service import Completion, _cut

    tok = service.predictor.tokenizer
    ids = tuple(tok.encode("my card bank help", add_special_tokens=False))
    stop = "bank"
    done = _cut(tok, Completion(tok.decode(ids), "length", 3, len(ids), ids), [stop])
    k = done.completion_tokens
    assert done.text == "my card " and done.finish_reason == "stop"
    assert stop in tok.decode(ids[:k]) and stop not in tok.decode(ids[:k - 1])
    compared = 0
    for seed in range(8):  # sampled answers full of odd bytes, cut by a stop string found in them
        body = {"prompt": "my card bank", "temperature": 1.5, "max_tokens": 24, "seed": seed}
        full = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        for stop in {full[len(full) // 2:len(full) // 2 + 2], full[-2:], "e\ufffd"} if len(full) >= 4 else ():
            body["stop"] = [stop]
            answer = client.post("/v1/completions", json=body).json()
            text, usage = _usage_streamed(client, body)
            assert answer["choices"][0]["text"] == text
            assert answer["usage"]["completion_tokens"] == usage["completion_tokens"] <= 24, (seed, stop)
            compared += 1
    assert compared >= 8


def test_logprobs_zero_asks_for_them_and_each_route_takes_its_own_type(client):
    """Legacy completions' `logprobs: 0` asks for the chosen token's log probability (answered null, it
    was a 200); `false` there, and `0` on chat (a switch), are values of the wrong JSON type."""
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    for route, body, value in (("/v1/completions", {"prompt": "x", "max_tokens": 2}, 0),
                               ("/v1/completions", {"prompt": "x", "max_tokens": 2}, False),
                               ("/v1/chat/completions", chat, 0)):
        r = client.post(route, json={**body, "logprobs": value})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs", (route, value, r.text)
    assert client.post("/v1/chat/completions", json={**chat, "logprobs": False}).status_code == 200
