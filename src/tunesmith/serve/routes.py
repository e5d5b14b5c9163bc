"""The server's routes, one APIRouter per group over the app's ServerState: health and metrics
(`ops_router`), OpenAI-compatible models, completions and chat (`openai_router`), and per-label
probabilities (`classify_router`). Request bodies are validated here; a text that is not valid
Unicode is a 400 for that request alone. Every refusal of a request as given is a 400 (`BadRequest`,
OpenAI's status) naming the field at fault in the error's `param`.

Every answered text gets a fresh `request_id` (replies.new_answer_id): in the answer's body (one per
result of a `texts` batch), in the X-Tunesmith-Request-ID header when the request has one answer, and
in its request-log row with the run that answered, so that POST /v1/feedback can refer to it. Without a
request log the id is still given (feedback on it then cannot be stored)."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Request, Response
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from tunesmith.config import GenerationSettings, ServeConfig
from tunesmith.config.settings import NumbersNotBools
from tunesmith.serve.metrics import OTHER_LABEL
from tunesmith.serve.replies import ANSWER_ID, BadRequest, error, new_answer_id
from tunesmith.serve.service import Completion, Service, TokenPrompt, is_blank
from tunesmith.serve.state import ServerState
from tunesmith.serve.streaming import open_stream
from tunesmith.serve.swap import answered_by
from tunesmith.tasks.sampling import generate_kwargs


def unicode_text(text: str | None) -> str | None:
    """Refuse text that is not valid Unicode (a lone surrogate such as "\\ud800" is valid JSON but no
    tokenizer or database can encode it): a 400 for that request alone."""
    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text is not valid Unicode (lone surrogate at character {e.start})") from None
    return text


class _Body(NumbersNotBools):
    # OpenAI clients send more fields than we use (top_p, user, ...); unknown ones are ignored.
    # Strict types: `stream: "yes"`, `max_tokens: "5"` or `true`, and token ids `[true, false]` are a 400,
    # not read as true, 5, 1 and [1, 0] (an int is still taken where a number with a fraction goes).
    model_config = ConfigDict(extra="ignore", strict=True)


def _classifiable(text: str) -> str:
    """The text, valid Unicode and not blank: a label for no input would be a confident guess, logged
    and open to feedback as if it were an answer."""
    unicode_text(text)
    if is_blank(text):
        raise ValueError("the text is empty (only spaces, control or invisible characters); give the text to classify")
    return text


class ClassifyRequest(_Body):
    """POST /v1/classify: one `text` or a list of `texts`."""

    text: str | None = None
    texts: list[str] | None = Field(None, min_length=1)

    @field_validator("text")
    @classmethod
    def _valid_text(cls, v: str | None) -> str | None:
        return v if v is None else _classifiable(v)

    @field_validator("texts")
    @classmethod
    def _valid_texts(cls, v: list[str] | None) -> list[str] | None:
        for i, t in enumerate(v or []):
            try:
                _classifiable(t)
            except ValueError as e:
                raise ValueError(f"texts[{i}]: {e}") from None
        return v

    @model_validator(mode="after")
    def _one(self) -> ClassifyRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of `text` or `texts`")
        return self


# Request fields that map onto GenerationSettings (top_k and repetition_penalty as vLLM names them).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed")


class _Sampling(_Body):
    """OpenAI's decoding fields. Absent ones keep the server's greedy default; values out of range, and
    fields this server cannot honour (penalties other than 0, n other than 1), are a 400 naming the field."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    n: int | None = None
    # Asked for, these would be answered without (a null `logprobs`, an unbiased answer): refused instead.
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None
    response_format: dict | None = None
    # No function calling, no audio: answered without them, a reply would claim what it did not do.
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    modalities: list[str] | None = None
    audio: dict | None = None

    def sampling(self) -> GenerationSettings | None:
        """The request's settings, None for plain greedy decoding; BadRequest naming a bad field."""
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0):
                raise BadRequest(f"{name} is not supported by this server; use repetition_penalty (1 to 2) instead",
                                 name)
        if self.logprobs is not None and self.logprobs is not False:  # `is`: 0 == False, and 0 asks for them
            raise BadRequest("logprobs is not supported by this server; leave it out", "logprobs")
        for name, off in (("top_logprobs", (None, 0)), ("logit_bias", (None, {})),
                          ("echo", (None, False)), ("best_of", (None, 1)), ("suffix", (None, "")),
                          ("response_format", (None, {"type": "text"})), ("tools", (None, [])),
                          ("functions", (None, [])), ("tool_choice", (None, "none", "auto")),
                          ("function_call", (None, "none", "auto")), ("modalities", (None, ["text"])),
                          ("audio", (None,))):
            if getattr(self, name) not in off:
                raise BadRequest(f"{name} is not supported by this server; leave it out", name)
        if self.n not in (None, 1):
            raise BadRequest("n must be 1: this server answers one choice per request", "n")
        given = {k: v for k in SAMPLING_FIELDS if (v := getattr(self, k)) is not None}
        if isinstance(given.get("stop"), str):
            given["stop"] = [given["stop"]]
        try:
            settings = GenerationSettings(**{"seed": None, **given})
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise BadRequest(f"{where}: {first['msg']}", where) from None
        return None if settings == GenerationSettings(seed=None) else settings


class StreamOptions(_Body):
    """OpenAI's `stream_options`: `include_usage` adds a last chunk with the token counts."""

    include_usage: bool = False


class _Streamed(_Sampling):
    stream: bool | None = False  # null: not streamed, as OpenAI reads it
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def _options_need_a_stream(self) -> _Streamed:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def usage_chunk(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Streamed):
    """POST /v1/completions (OpenAI's fields that the server uses)."""

    model: str | None = None
    # Text goes through the run's prompt format; token ids (OpenAI's other form) are used as given.
    prompt: str | list[int]
    logprobs: int | None = None  # legacy completions: how many top tokens; 0 still asks for the chosen one's
    # Unsaid: OpenAI's 16, or serve.max_tokens where that is smaller (not a 400 for a field never sent).
    max_tokens: int | None = Field(None, ge=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):  # OpenAI's batch of one
            return v[0]
        if isinstance(v, list) and any(isinstance(x, (str, list)) for x in v):
            raise ValueError("a list of prompts is not supported: send one prompt (a string, or a list of token ids) "
                             "per request")
        return v

    @field_validator("prompt")
    @classmethod
    def _valid_prompt(cls, v: str | list[int]) -> str | list[int]:
        return unicode_text(v) if isinstance(v, str) else v


class ChatMessage(_Body):
    """One message of a chat request."""

    # "developer" is OpenAI's newer name for the system message; chat templates know only "system".
    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @model_validator(mode="before")
    @classmethod
    def _no_tool_turns(cls, data):
        if isinstance(data, dict) and (data.get("role") in ("tool", "function") or data.get("tool_calls")
                                       or data.get("function_call")):
            raise ValueError("tool and function-call messages are not supported: this server does no function calling")
        return data

    @field_validator("role")
    @classmethod
    def _system(cls, v: str) -> str:
        return "system" if v == "developer" else v

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v):
        """OpenAI's other form of content, a list of parts: the text parts joined by newlines. Other
        parts (images, audio, files) are refused: answered without them, the reply would pretend."""
        if not isinstance(v, list):
            return v
        texts = []
        for i, part in enumerate(v):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = str(part.get("type"))[:40] if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"content[{i}]: only text parts ({{'type': 'text', 'text': ...}}) are supported, "
                                 f"not {kind!r}")
            texts.append(part["text"])
        return "\n".join(texts)

    @field_validator("content")
    @classmethod
    def _valid_content(cls, v: str) -> str:
        return unicode_text(v)


class ChatRequest(_Streamed):
    """POST /v1/chat/completions (OpenAI's fields that the server uses)."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None  # chat: a switch
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def ops_router(state: ServerState) -> APIRouter:
    """/healthz (open even with API keys), /readyz (the engine answers) and /metrics (Prometheus)."""
    router, service = APIRouter(), state.service

    @router.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz():
        if not await asyncio.to_thread(service.ready):
            return error(503, "the model engine is not answering", "server_error")
        return {"status": "ready", "model": service.name, "variant": service.variant}

    @router.get("/metrics")
    async def prometheus_metrics():
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return router


def classify_router(state: ServerState) -> APIRouter:
    """/v1/classify: a label and per-label probabilities for each text, micro-batched."""
    router, service, cfg = APIRouter(), state.service, state.cfg

    @router.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request, response: Response):
        if not service.labels:
            raise BadRequest("this model is not a classifier; use /v1/completions")
        if not service.scores_labels:
            return error(501, "per-label probabilities need the built-in engine; on this engine use "
                              "/v1/chat/completions, which answers with the label", "invalid_request_error")
        texts = body.texts if body.texts is not None else [body.text]
        if len(texts) > cfg.max_texts:
            raise BadRequest(f"at most {cfg.max_texts} texts per request", "texts")
        started = time.perf_counter()
        results = await state.batcher.submit("classify", texts, request.state.deadline)
        latency = (time.perf_counter() - started) * 1000
        out = [{"label": label, "probabilities": probs, "request_id": new_answer_id()} for label, probs in results]
        for r in out:
            state.metrics.labels.labels(_label(service, r["label"])).inc()
        await state.record([_row(state, request, ("/v1/classify", r["request_id"]), res, input=t, output=r["label"],
                                 label=r["label"], confidence=r["probabilities"][r["label"]], latency_ms=latency)
                            for t, res, r in zip(texts, results, out)], request.state.deadline)
        answer = {"model": service.name, "variant": service.variant, "results": out}
        if body.text is None:
            return answer
        response.headers[ANSWER_ID] = out[0]["request_id"]
        return {**out[0], **answer}

    return router


def openai_router(state: ServerState) -> APIRouter:
    """/v1/models, /v1/completions and /v1/chat/completions in OpenAI's format, streamed on request."""
    router, service, cfg = APIRouter(), state.service, state.cfg

    def model_card() -> dict:
        return {"id": service.name, "object": "model", "created": 0, "owned_by": "tunesmith"}

    @router.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @router.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str):
        if model_id != service.name:
            return error(404, f"no model {model_id[:80]!r} here; this server serves {service.name!r}",
                         "invalid_request_error")
        return model_card()

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, response: Response):
        limit = _limit(body.max_tokens or min(16, cfg.max_tokens), cfg)
        sampling = _sampling(body, service)
        if isinstance(body.prompt, list) and service.labels:
            raise BadRequest("a classifier takes text prompts (its prompt format is applied to them)", "prompt")
        try:
            example = service.example(prompt=body.prompt)
        except ValueError as e:  # a token prompt out of range
            raise BadRequest(f"{e} (prompt)", "prompt") from None
        return await _complete(state, (request, response), (example, limit, sampling), body,
                               "/v1/completions", "text_completion")

    @router.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request, response: Response):
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        limit = _limit(body.max_completion_tokens or body.max_tokens or cfg.max_tokens, cfg, field)
        sampling = _sampling(body, service)
        try:
            example = service.example(messages=[m.model_dump() for m in body.messages])
        except ValueError as e:
            raise BadRequest(f"{e} (messages)", "messages") from None
        return await _complete(state, (request, response), (example, limit, sampling), body,
                               "/v1/chat/completions", "chat.completion")

    return router


async def _complete(state: ServerState, exchange: tuple[Request, Response], job: tuple, body: _Streamed, route: str,
                    kind: str):
    """One completion of `job` (example, max_tokens, sampling or None) (`kind` "text_completion" or
    "chat.completion"): streamed when `body` asks (with a usage chunk if it asks for that too), or
    micro-batched and answered whole; either way counted in the metrics and the request log, under a
    fresh request_id in the answer and its header."""
    (request, response), (example, limit, sampling) = exchange, job
    answer_id = new_answer_id()
    # Logged so that a token prompt (its input the ids decoded, the prompt format inside) is never
    # taken for a plain text prompt, e.g. by retrain, which would wrap it in the format again.
    prompt_kind = "tokens" if isinstance(example, TokenPrompt) else "text"
    if body.stream:
        chunk_kind = "text_completion" if kind == "text_completion" else "chat.completion.chunk"
        # counted now, by the model that takes the stream (a hot swap may bring another tokenizer by its end)
        prompt = await asyncio.to_thread(_prompt_tokens, state.service, example)
        return await open_stream(state, example, limit, chunk_kind, request,
                                 _stream_logger(state, request, (route, answer_id), (example, prompt), prompt_kind),
                                 sampling, answer_id=answer_id, usage=body.usage_chunk)
    item = (example, limit) if sampling is None else job  # engines see settings only when there are some
    done: Completion | None = await _unless_gone(request, state.batcher.submit("complete", item,
                                                                              request.state.deadline))
    if done is None:  # the client went: no one to answer (and, as for an abandoned stream, nothing logged)
        return Response(status_code=499)
    await _account(state, request, (route, answer_id), example.input, done, prompt_kind=prompt_kind)
    response.headers[ANSWER_ID] = answer_id
    if kind == "text_completion":
        choice = {"text": done.text, "index": 0, "logprobs": None, "finish_reason": done.finish_reason}
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": done.text},
                  "finish_reason": done.finish_reason}
    return {**_openai(state.service, kind, choice, done), "request_id": answer_id}


async def _unless_gone(request: Request, work):
    """The result of `work` (a batcher submit), or None when the client disconnects first: the submit is
    then cancelled, so its row is skipped or its decoding stops at the next token (Service.complete).
    The body is read by now, so the next message is the disconnect. (Awaited, not polled:
    `is_disconnected()` never turns true behind the app's http middleware.)"""
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(request.receive())
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done and not watch.exception() and watch.result().get("type") == "http.disconnect":
            return None
        return await task  # (any other message, none expected: the answer is waited for as before)
    finally:
        watch.cancel()
        task.cancel()


def _sampling(body: _Sampling, service: Service) -> GenerationSettings | None:
    """The request's GenerationSettings (None: plain greedy); a 400 naming the field it cannot take."""
    settings = body.sampling()
    if settings is not None and not getattr(service, "samples", True) and (unused := _beyond_greedy(settings)):
        raise BadRequest(f"this engine decodes greedily only, so it cannot honour {' or '.join(unused)}: "
                         "send temperature 0 (or none) and no repetition_penalty, or serve a torch variant", unused[0])
    return settings


def _beyond_greedy(settings: GenerationSettings) -> list[str]:
    """The request fields a greedy-only engine (ct2, ORT) would silently ignore: whatever makes the
    `generate` keywords more than plain greedy. Stop strings are cut from the decoded text (Service.complete)
    and a seed changes nothing greedy, so those stay allowed; top_p/top_k only act when sampling."""
    if generate_kwargs(settings) == {"do_sample": False}:
        return []
    return (["temperature"] if not settings.greedy else []) + \
        (["repetition_penalty"] if settings.repetition_penalty != 1.0 else [])


def _limit(requested: int, cfg: ServeConfig, field: str = "max_tokens") -> int:
    """`requested` tokens, or a 400 naming `field` (the request's own name for it) when over serve.max_tokens."""
    if requested > cfg.max_tokens:
        raise BadRequest(f"{field} must be at most {cfg.max_tokens}", field)
    return requested


def _stream_logger(state: ServerState, request: Request, logged_as: tuple[str, str], asked: tuple,
                   prompt_kind: str):
    """What a finished stream of `asked` (example, its prompt tokens) reports: its tokens to the metrics,
    its text to the request log; returns the Completion (its usage)."""
    example, prompt = asked

    async def done(pieces: list[str], finish: str) -> Completion:  # `finish` names the run that answered
        tokens = getattr(finish, "tokens", None)  # an upstream engine's stream: one token a piece, the best guess
        completion = Completion("".join(pieces), finish, prompt, len(pieces) if tokens is None else tokens)
        await _account(state, request, logged_as, example.input, completion, finish, prompt_kind)
        return completion
    return done


def _prompt_tokens(service: Service, example) -> int:
    """The prompt's tokens as the model reads it; 0 from an upstream engine, which does not say."""
    if not hasattr(service, "row_tokens"):
        return 0
    return service.row_tokens("complete", [(example, 0)])[0][0]


async def _account(state: ServerState, request: Request, logged_as: tuple[str, str], text,
                   done: Completion, by=None, prompt_kind: str | None = None) -> None:
    """Count a completion in the metrics and log it under (route, request_id); `by` is what names the
    run that answered (default: `done` itself, see swap.answered_by); `prompt_kind` "tokens" or "text"."""
    metrics, service = state.metrics, state.service
    metrics.tokens_in.inc(done.prompt_tokens)
    metrics.tokens_out.inc(done.completion_tokens)
    if service.labels:
        metrics.labels.labels(_label(service, done.text)).inc()
    await state.record([_row(state, request, logged_as, done if by is None else by, input=text, output=done.text,
                             label=done.text if service.labels else None, tokens_in=done.prompt_tokens,
                             tokens_out=done.completion_tokens, prompt_kind=prompt_kind)], request.state.deadline)


def _row(state: ServerState, request: Request, logged_as: tuple[str, str], result, **fields) -> dict:
    """A request-log row under (route, request_id): who asked (the key id) and the run that computed
    `result` (with a hot-swapping server, the model that took the call, not the one serving now),
    as an absolute path so that readers in any folder match it."""
    route, answer_id = logged_as
    run_dir = answered_by(result, state.service)
    return {"route": route, "key_id": request.state.key_id, "request_id": answer_id,
            "run_dir": str(Path(run_dir).resolve()) if run_dir else None, **fields}


def _label(service: Service, text: str) -> str:
    """A metric label from the model's label set; any other answer (free text from an upstream
    engine) is counted as one label, so answers cannot create unbounded series."""
    return text if text in service.labels else OTHER_LABEL


def _openai(service: Service, kind: str, choice: dict, done: Completion) -> dict:
    return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()), "model": service.name,
            "choices": [choice], "usage": {"prompt_tokens": done.prompt_tokens,
                                           "completion_tokens": done.completion_tokens,
                                           "total_tokens": done.prompt_tokens + done.completion_tokens}}
