"""The official OpenAI Python SDK against `tunesmith serve`, on a tiny random model: what "OpenAI-compatible"
means to the people who call it. The SDK sends its requests through the app in-process (Starlette's
TestClient is the httpx client it is given), so its own request building, response parsing, stream
decoding and error mapping are what is tested, not a hand-written imitation of them."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tunesmith.config import ServeConfig
from tunesmith.serve.app import create_app
from tunesmith.serve.service import load_service

openai = pytest.importorskip("openai")  # in the test extra; skipped only where it is not installed

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def service(tiny_model):
    return load_service(tiny_model)


@pytest.fixture()
def sdk(service, tmp_path):
    app = create_app(service, ServeConfig(max_tokens=8), [KEY], tmp_path / "requests.db")
    with TestClient(app, base_url="http://127.0.0.1") as http:
        yield openai.OpenAI(base_url="http://127.0.0.1/v1", api_key=KEY, http_client=http, max_retries=0)


def test_models_are_listed_and_retrieved_and_another_id_is_not_found(sdk, service):
    assert [m.id for m in sdk.models.list()] == [service.name]
    assert sdk.models.retrieve(service.name).id == service.name
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("gpt-4o")


def test_a_chat_completion_parses_with_its_usage(sdk, service):
    answer = sdk.chat.completions.create(model=service.name, max_tokens=4,
                                         messages=[{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "hello"}])
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length") and answer.usage.completion_tokens <= 4
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_a_streamed_chat_is_the_plain_answer_and_ends_with_the_usage_asked_for(sdk, service):
    messages = [{"role": "user", "content": "hello"}]
    whole = sdk.chat.completions.create(model=service.name, max_tokens=6, messages=messages)
    chunks = list(sdk.chat.completions.create(model=service.name, max_tokens=6, messages=messages, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_text_completion_streamed_and_not_gives_the_same_text(sdk, service):
    whole = sdk.completions.create(model=service.name, prompt="hello", max_tokens=5)
    pieces = sdk.completions.create(model=service.name, prompt="hello", max_tokens=5, stream=True)
    assert "".join(c.choices[0].text for c in pieces) == whole.choices[0].text
    assert whole.usage.completion_tokens <= 5


def test_a_refused_request_raises_bad_request_with_the_field_in_param(sdk, service):
    with pytest.raises(openai.BadRequestError) as too_long:
        sdk.completions.create(model=service.name, prompt="hello", max_tokens=9)
    assert too_long.value.status_code == 400 and too_long.value.param == "max_tokens"
    assert "max_tokens must be at most 8" in too_long.value.message
    with pytest.raises(openai.BadRequestError) as tools:
        sdk.chat.completions.create(model=service.name, messages=[{"role": "user", "content": "hi"}],
                                    tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert tools.value.param == "tools"


def test_a_wrong_key_raises_authentication_error(service, tmp_path):
    app = create_app(service, ServeConfig(max_tokens=8), [KEY], tmp_path / "requests.db")
    with TestClient(app, base_url="http://127.0.0.1") as http:
        wrong = openai.OpenAI(base_url="http://127.0.0.1/v1", api_key="sk-wrong", http_client=http, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
