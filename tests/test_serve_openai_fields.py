"""The OpenAI request and stream forms that clients send beyond the basics, on a tiny random model:
content as a list of text parts, the "developer" role, stream_options.include_usage, the role in the
first chat chunk; and the fields the server cannot honour (suffix, a JSON response_format) refused."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tunesmith.config import ServeConfig
from tunesmith.serve.app import create_app
from tunesmith.serve.service import load_service

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def service(tiny_model):
    return load_service(tiny_model)


@pytest.fixture()
def client(service, tmp_path):
    with TestClient(create_app(service, ServeConfig(max_tokens=8), None, tmp_path / "requests.db")) as c:
        yield c


def _answer(c, body: dict) -> dict:
    r = c.post(CHAT, json={"max_tokens": 4, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _events(c, route: str, body: dict) -> list[dict]:
    with c.stream("POST", route, json={"max_tokens": 4, **body, "stream": True}) as s:
        assert s.status_code == 200
        lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_content_given_as_text_parts_is_the_same_message_as_the_joined_text(client):
    parts = [{"type": "text", "text": "my card"}, {"type": "text", "text": "was declined"}]
    as_parts = _answer(client, {"messages": [{"role": "user", "content": parts}]})
    as_text = _answer(client, {"messages": [{"role": "user", "content": "my card\nwas declined"}]})
    assert as_parts["choices"][0]["message"] == as_text["choices"][0]["message"]
    assert as_parts["usage"] == as_text["usage"]


def test_the_developer_role_is_the_system_message(client):
    said = [{"role": "developer", "content": "Answer briefly."}, {"role": "user", "content": "hello"}]
    as_developer = _answer(client, {"messages": said})
    as_system = _answer(client, {"messages": [{**said[0], "role": "system"}, said[1]]})
    assert as_developer["choices"][0]["message"] == as_system["choices"][0]["message"]
    assert as_developer["usage"] == as_system["usage"]


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                                  {"type": "text"}, {"type": "text", "text": 5}, "plain string"])
def test_a_part_that_is_not_text_is_a_400_naming_it(client, part):
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]})
    assert r.status_code == 400, r.text
    assert "content[1]: only text parts" in r.json()["error"]["message"]


@pytest.mark.parametrize("route, body, field", [
    ("/v1/completions", {"prompt": "x", "suffix": "the end"}, "suffix"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
     "response_format"),
])
def test_fields_the_server_cannot_honour_are_a_400(client, route, body, field):
    r = client.post(route, json=body)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(field), r.text


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("extra, field", [
    ({"tools": [TOOL]}, "tools"), ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"functions": [TOOL["function"]]}, "functions"), ({"function_call": {"name": "get_weather"}}, "function_call"),
    ({"modalities": ["text", "audio"]}, "modalities"), ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
])
def test_function_calling_and_audio_are_refused_not_answered_without(client, extra, field):
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": "x"}], **extra})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(f"{field} is not supported"), r.text
    plain = {"tools": [], "tool_choice": "auto", "parallel_tool_calls": False, "modalities": ["text"]}
    assert client.post(CHAT, json={"messages": [{"role": "user", "content": "x"}], **plain}).status_code == 200


@pytest.mark.parametrize("message", [
    {"role": "tool", "tool_call_id": "c1", "content": "22 C"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                             "function": {"name": "f", "arguments": "{}"}}]},
])
def test_tool_turns_in_a_conversation_are_named_as_such(client, message):
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": "weather?"}, message]})
    assert r.status_code == 400 and "tool and function-call messages are not supported" in r.text


@pytest.mark.parametrize("prompt", [["a", "b"], [[1, 2], [3]]])
def test_a_list_of_prompts_is_named_not_a_type_error(client, prompt):
    r = client.post("/v1/completions", json={"prompt": prompt})
    assert r.status_code == 400 and "a list of prompts is not supported" in r.text


@pytest.mark.parametrize("one,batch", [("red card", ["red card"]), ([5, 6, 7], [[5, 6, 7]])])
def test_a_batch_of_one_prompt_is_that_prompt(client, one, batch):
    """OpenAI's clients may send a single prompt as a list of one: answered as the prompt itself."""
    answers = [client.post("/v1/completions", json={"prompt": p, "max_tokens": 3}) for p in (one, batch)]
    assert [r.status_code for r in answers] == [200, 200], answers[1].text
    assert answers[0].json()["choices"][0]["text"] == answers[1].json()["choices"][0]["text"]


def test_one_model_is_retrieved_by_its_id(client, service):
    assert client.get(f"/v1/models/{service.name}").json()["id"] == service.name
    missing = client.get("/v1/models/gpt-4o")
    assert missing.status_code == 404 and "no model 'gpt-4o' here" in missing.json()["error"]["message"]


def test_a_plain_text_response_format_and_an_empty_suffix_are_taken(client):
    assert client.post(CHAT, json={"messages": [{"role": "user", "content": "x"}],
                                   "response_format": {"type": "text"}}).status_code == 200
    assert client.post("/v1/completions", json={"prompt": "x", "suffix": ""}).status_code == 200


def test_a_chat_stream_names_the_role_first_and_adds_usage_on_request(client):
    messages = [{"role": "user", "content": "my card was declined"}]
    plain = _events(client, CHAT, {"messages": messages})
    assert plain[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("usage" not in ch for ch in plain)
    counted = _events(client, CHAT, {"messages": messages, "stream_options": {"include_usage": True}})
    *chunks, last = counted
    assert last["choices"] == [] and all(ch["usage"] is None for ch in chunks)
    whole = _answer(client, {"messages": messages})
    streamed = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks)
    assert streamed == whole["choices"][0]["message"]["content"]  # the same text, as decoded
    # The same counts as the whole answer's: the prompt as the model read it, the tokens decoded
    assert last["usage"] == whole["usage"] and last["usage"]["prompt_tokens"] > 0


def test_a_completion_stream_has_no_role_and_counts_usage_too(client):
    *chunks, last = _events(client, "/v1/completions", {"prompt": "hello", "stream_options": {"include_usage": True}})
    assert all("role" not in ch["choices"][0] for ch in chunks)
    whole = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4}).json()
    assert last["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"] > 0


def test_a_null_stream_is_no_stream(client):
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": None})
    assert r.status_code == 200 and r.json()["object"] == "text_completion"


def test_stream_options_without_a_stream_is_a_400(client):
    r = client.post("/v1/completions", json={"prompt": "x", "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and "stream_options is only allowed when stream is true" in r.text


def test_a_completion_without_max_tokens_takes_the_servers_limit_when_it_is_below_16(client):
    r = client.post("/v1/completions", json={"prompt": "hello"})  # served with max_tokens 8
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 8, r.text
    too_many = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 9})
    assert too_many.status_code == 400 and "at most 8" in too_many.json()["error"]["message"]


@pytest.mark.parametrize("body,param", [({"max_tokens": 9}, "max_tokens"), ({"n": 2}, "n"),
                                        ({"frequency_penalty": 1}, "frequency_penalty"),
                                        ({"temperature": 9}, "temperature"),
                                        ({"prompt": [10 ** 9]}, "prompt"), ({"stream": 1}, "stream")])
def test_a_refused_request_is_a_400_in_openais_error_shape_naming_the_field(client, body, param):
    """OpenAI answers an invalid request 400 with {"message", "type", "param", "code"}: its SDKs raise
    BadRequestError from that status (a 422 became UnprocessableEntityError), and `param` names the field."""
    r = client.post("/v1/completions", json={"prompt": "hello", **body})
    err = r.json()["error"]
    assert r.status_code == 400 and set(err) == {"message", "type", "param", "code"}, r.text
    assert err["type"] == "invalid_request_error" and err["code"] == 400 and err["param"].startswith(param), r.text


def test_a_character_split_across_tokens_is_streamed_whole_and_the_text_after_it_too(service, tmp_path, monkeypatch):
    """A token ending inside a multi-byte character decoded to U+FFFD and was sent; the decoded text
    then never began with the text sent, so nothing after it was streamed (one piece, finish 'length')."""
    import tunesmith.serve.service as service_module

    tok = service.predictor.tokenizer
    ids = tok.encode("🌟🌟 fine", add_special_tokens=False)
    assert any("\ufffd" in tok.decode(ids[:n]) for n in range(1, len(ids)))  # the emoji spans tokens
    script = iter(ids)
    monkeypatch.setattr(service_module, "next_token", lambda *args: next(script))
    with TestClient(create_app(service, ServeConfig(max_tokens=64), None, tmp_path / "requests.db")) as client:
        *chunks, last = _events(client, "/v1/completions", {"prompt": "hello", "max_tokens": len(ids),
                                                             "stream_options": {"include_usage": True}})
    pieces = [ch["choices"][0]["text"] for ch in chunks]
    assert "".join(pieces) == "🌟🌟 fine" and not any("\ufffd" in p for p in pieces)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert last["usage"]["completion_tokens"] == len(ids) > len([p for p in pieces if p])  # tokens, not pieces


def test_a_chat_limit_over_the_servers_is_refused_under_the_name_it_was_sent_by(client):
    msgs = [{"role": "user", "content": "hi"}]
    for field in ("max_completion_tokens", "max_tokens"):
        r = client.post(CHAT, json={"messages": msgs, field: 9})  # served with max_tokens 8
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == field and error["message"] == f"{field} must be at most 8"
