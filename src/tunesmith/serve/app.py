"""The HTTP server: OpenAI-compatible completions and chat, /v1/classify, health, readiness and
Prometheus metrics, with API keys, rate limits, body limits, micro-batching, a request log and
drift gauges. `create_app` builds it around a loaded Service; `tunesmith serve` runs it.

Under load every request gets an answer: model work waits in a bounded queue (`serve.max_queue`),
each model call holds at most `serve.max_batch_tokens` tokens, and a request not answered within
`serve.request_timeout_s` (or one that finds the queue full) gets 503 with Retry-After; the deadline
starts when the request arrives, and a request-log write still running at the deadline goes on in the
background. A body not read within `serve.body_timeout_s` gets 408. Every response carries an
X-Request-ID; a 500 logs one line with that id and the exception type."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.config import ServeConfig
from tunesmith.errors import EngineError, InputError
from tunesmith.serve.auth import KeyChecker, RateLimiter
from tunesmith.serve.batcher import MicroBatcher, Overloaded
from tunesmith.serve.limits import BodyLimit
from tunesmith.serve.metrics import OTHER_LABEL, ServeMetrics
from tunesmith.serve.monitoring import DriftWatch
from tunesmith.serve.service import Completion, Service, first_batch
from tunesmith.serve.store import LogWriter, RequestLog

OPEN_ROUTES = {"/healthz"}
REQUEST_ID = "X-Request-ID"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # a caller's own request id is kept when it looks like one
LOG_THREADS = 2  # request-log writes at once (SQLite takes one writer at a time anyway)
PENDING_WRITES_PER_QUEUED = 2  # request-log writes waiting or running, per serve.max_queue
log = logging.getLogger("tunesmith.serve")


def _unicode(text: str | None) -> str | None:
    """Refuse text that is not valid Unicode (a lone surrogate such as "\\ud800" is valid JSON but no
    tokenizer or database can encode it): a 422 for that request alone."""
    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text is not valid Unicode (lone surrogate at character {e.start})") from None
    return text


class _Body(BaseModel):
    # OpenAI clients send more fields than we use (top_p, user, ...); unknown ones are ignored.
    model_config = ConfigDict(extra="ignore")


class ClassifyRequest(_Body):
    text: str | None = None
    texts: list[str] | None = Field(None, min_length=1)

    @field_validator("text")
    @classmethod
    def _valid_text(cls, v: str | None) -> str | None:
        return _unicode(v)

    @field_validator("texts")
    @classmethod
    def _valid_texts(cls, v: list[str] | None) -> list[str] | None:
        for t in v or []:
            _unicode(t)
        return v

    @model_validator(mode="after")
    def _one(self) -> ClassifyRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of `text` or `texts`")
        return self


class CompletionRequest(_Body):
    model: str | None = None
    # Text goes through the run's prompt format; token ids (OpenAI's other form) are used as given.
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=1)
    stream: bool = False

    @field_validator("prompt")
    @classmethod
    def _valid_prompt(cls, v: str | list[int]) -> str | list[int]:
        return _unicode(v) if isinstance(v, str) else v


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _valid_content(cls, v: str) -> str:
        return _unicode(v)


class ChatRequest(_Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False


def create_app(service: Service, cfg: ServeConfig, keys: list[str] | None = None,
               log_path: Path | None = None) -> FastAPI:
    """The FastAPI app serving `service` under the limits of `cfg`."""
    _check_budget(service, cfg)
    metrics = ServeMetrics()
    metrics.load_seconds.set(service.load_seconds)
    metrics.info.labels(service.name, service.variant).set(1)
    checker, limiter = KeyChecker(keys or []), RateLimiter(cfg.rate_limit_per_minute)
    executor = ThreadPoolExecutor(max_workers=service.threads, thread_name_prefix="model")
    pacer = Pacer(cfg.request_timeout_s / 4)
    batcher = MicroBatcher(lambda kind, items, deliver, alive: _run_batch(service, kind, items, deliver, alive,
                                                                          cfg.max_batch_tokens, pacer),
                           cfg.max_batch, cfg.max_wait_ms, executor, max_queue=cfg.max_queue,
                           on_batch=lambda kind, n: metrics.batch_size.labels(kind).observe(n))
    streams = threading.BoundedSemaphore(cfg.max_queue)  # streams bypass the batcher: bounded on their own
    store = RequestLog(log_path, cfg.request_log.retention_days, cfg.request_log.redact_pii,
                       on_failure=lambda reason: metrics.log_failures.labels(reason).inc()) \
        if cfg.request_log.enabled and log_path else None
    watch = DriftWatch(service.run_dir, store, cfg.drift, metrics) if store and service.run_dir else None
    # Redaction and SQLite writes run there, two at a time, never on the event loop, and a bounded number pending.
    writer = LogWriter(store, LOG_THREADS, PENDING_WRITES_PER_QUEUED * cfg.max_queue,
                       after=watch.seen if watch else None) if store else None
    record = _recorder(writer)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        executor.shutdown(wait=False, cancel_futures=True)
        if writer:
            writer.close()
        service.close()
        if watch:
            watch.close()
        if store:
            store.close()

    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.service, app.state.store, app.state.watch, app.state.metrics = service, store, watch, metrics
    app.state.batcher, app.state.writer = batcher, writer

    @app.middleware("http")
    async def guard(request: Request, call_next):
        route, started, response = request.url.path, time.perf_counter(), None
        # From the request's arrival (RequestIds), so the deadline covers all the server does for it;
        # the server stops waiting a little early, so that its 503 also leaves in time on a busy CPU.
        request.state.deadline = getattr(request.state, "arrived", time.monotonic()) + \
            cfg.request_timeout_s - answer_margin(cfg.request_timeout_s)
        metrics.in_flight.inc()
        try:
            key = None
            if checker.enabled and route not in OPEN_ROUTES:
                key = checker.check(request.headers.get("authorization"))
                if key is None:
                    response = _error(401, "missing or invalid API key", "authentication_error")
                    return response
                allowed, wait = limiter.allow(key)
                if not allowed:
                    response = _error(429, "rate limit exceeded", "rate_limit_error")
                    response.headers["Retry-After"] = str(max(1, round(wait)))
                    return response
            request.state.key_id = key
            try:
                response = await call_next(request)
            except Exception as e:  # never a stack trace in a response, never a dead process
                metrics.errors.labels(_route_label(route)).inc()
                log.error("request %s: %s %s failed: %s (answered 500)", _request_id(request), request.method,
                          _route_label(route), type(e).__name__)
                response = _error(500, "internal error", "server_error")
            return response
        finally:
            metrics.in_flight.dec()
            status = str(getattr(request.state, "refused", None)  # a body cut off by BodyLimit: 408 or 413
                         or (response.status_code if response is not None else 500))
            metrics.requests.labels(_route_label(route), status).inc()
            metrics.latency.labels(_route_label(route)).observe(time.perf_counter() - started)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(EngineError)
    async def engine_failed(request: Request, exc: EngineError):
        metrics.errors.labels(_route_label(request.url.path)).inc()
        return _error(502, str(exc), "server_error")

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded):
        metrics.rejected.labels(exc.kind).inc()
        response = _error(503, exc.reason, "server_error")
        response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, f"{first.get('msg', 'invalid request')}" + (f" ({where})" if where else ""),
                      "invalid_request_error")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not await asyncio.to_thread(service.ready):
            return _error(503, "the model engine is not answering", "server_error")
        return {"status": "ready", "model": service.name, "variant": service.variant}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": 0,
                                            "owned_by": "tunesmith"}]}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request):
        if not service.labels:
            return _error(400, "this model is not a classifier; use /v1/completions", "invalid_request_error")
        if not service.scores_labels:
            return _error(501, "per-label probabilities need the built-in engine; on this engine use "
                               "/v1/chat/completions, which answers with the label", "invalid_request_error")
        texts = body.texts if body.texts is not None else [body.text]
        if len(texts) > cfg.max_texts:
            return _error(422, f"at most {cfg.max_texts} texts per request", "invalid_request_error")
        started = time.perf_counter()
        results = await batcher.submit("classify", texts, request.state.deadline)
        latency = (time.perf_counter() - started) * 1000
        out = [{"label": label, "probabilities": probs} for label, probs in results]
        for r in out:
            metrics.labels.labels(_label(service, r["label"])).inc()
        await record([{"route": "/v1/classify", "key_id": request.state.key_id, "input": t, "output": r["label"],
                       "label": r["label"], "confidence": r["probabilities"][r["label"]],
                       "latency_ms": latency} for t, r in zip(texts, out)], request.state.deadline)
        answer = {"model": service.name, "variant": service.variant, "results": out}
        return {**out[0], **answer} if body.text is not None else answer

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        limit = _limit(body.max_tokens, cfg)
        if isinstance(body.prompt, list) and service.labels:
            return _error(400, "a classifier takes text prompts (its prompt format is applied to them)",
                          "invalid_request_error")
        try:
            example = service.example(prompt=body.prompt)
        except ValueError as e:  # a token prompt out of range
            return _error(422, f"{e} (prompt)", "invalid_request_error")
        if body.stream:
            return await _stream(service, executor, example, limit, "text_completion", request, streams,
                                 _stream_logger(metrics, record, service, request, "/v1/completions", example.input))
        done: Completion = await batcher.submit("complete", (example, limit), request.state.deadline)
        await _account(metrics, record, service, request, "/v1/completions", example.input, done)
        return _openai(service, "text_completion", {"text": done.text, "index": 0, "logprobs": None,
                                                    "finish_reason": done.finish_reason}, done)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        limit = _limit(body.max_completion_tokens or body.max_tokens or cfg.max_tokens, cfg)
        example = service.example(messages=[m.model_dump() for m in body.messages])
        if body.stream:
            return await _stream(service, executor, example, limit, "chat.completion.chunk", request, streams,
                                 _stream_logger(metrics, record, service, request, "/v1/chat/completions",
                                                example.input))
        done: Completion = await batcher.submit("complete", (example, limit), request.state.deadline)
        await _account(metrics, record, service, request, "/v1/chat/completions", example.input, done)
        return _openai(service, "chat.completion", {"index": 0, "message": {"role": "assistant", "content": done.text},
                                                    "finish_reason": done.finish_reason}, done)

    return RequestIds(BodyLimit(app, cfg.max_body_bytes, cfg.body_timeout_s))


class RequestIds:
    """ASGI wrapper (outermost, so a 413 from the body limit carries one too): every response gets
    an X-Request-ID header, the caller's own when it sent a plausible one, otherwise a new one; the
    app finds it in `request.state.request_id` for its log lines, and the time the request arrived
    (time.monotonic(), where its deadline starts) in `request.state.arrived`."""

    def __init__(self, app):
        self.app = app
        self.state = getattr(app, "state", None)  # tests and servers reach the app's state through this

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(REQUEST_ID.lower().encode(), b"").decode("latin-1")
        rid = given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["arrived"] = rid, time.monotonic()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REQUEST_ID.encode(), rid.encode())]}
            await send(message)
        await self.app(scope, receive, send_with_id)


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", None) or "-"


def _check_budget(service, cfg: ServeConfig) -> None:
    """One row must fit in a model call: a prompt of task.max_length tokens (plus max_tokens to
    generate, for a generation model)."""
    if not hasattr(service, "row_tokens"):  # an upstream engine bounds its own batches
        return
    row = service.fmt.max_length + (0 if service.labels else cfg.max_tokens)
    if cfg.max_batch_tokens < row:
        raise InputError(f"serve.max_batch_tokens ({cfg.max_batch_tokens}) is smaller than one request "
                         f"({row} tokens: task.max_length" + ("" if service.labels else " + serve.max_tokens") + ")",
                         "serve.max_batch_tokens", f"set it to at least {row}")


def answer_margin(timeout_s: float) -> float:
    """Seconds before serve.request_timeout_s at which the server stops waiting for the model and
    answers 503: time to build and send that answer while the event loop is busy (measured: up to
    0.35 s late with a CPU hog beside the server; see BENCHMARKS.md)."""
    return min(1.0, 0.05 * timeout_s)


def _limit(requested: int, cfg: ServeConfig) -> int:
    if requested > cfg.max_tokens:
        from fastapi import HTTPException

        raise HTTPException(422, f"max_tokens must be at most {cfg.max_tokens}")
    return requested


class Pacer:
    """Seconds per row of recent model calls, so that one call is cut to what fits in `cap_s`
    (a quarter of the request deadline): on a slow or busy CPU a call of many rows would outlast
    the deadline of every request in it, and none would be answered."""

    def __init__(self, cap_s: float):
        self.cap_s, self.per_row = cap_s, 0.0

    def max_rows(self) -> int | None:
        return max(1, int(self.cap_s / self.per_row)) if self.per_row > 0 else None

    def observe(self, rows: int, seconds: float) -> None:
        now = seconds / max(rows, 1)
        self.per_row = now if self.per_row == 0 else 0.7 * self.per_row + 0.3 * now


def _run_batch(service: Service, kind: str, items: list, deliver, alive, budget: int, pacer: Pacer) -> None:
    """The model calls for a batch of requests (on the model thread): rows in arrival order, each
    call within `budget` tokens (rows x (longest prompt + largest answer or max_tokens), see
    service.call_tokens) and the pacer's row count; a request is
    answered (`deliver`) as soon as its last row is done, and rows of requests that are no longer
    waiting (`alive` False: gone, or past the deadline) are never computed."""
    if kind == "classify":
        rows = [t for texts in items for t in texts]
        owner = [i for i, texts in enumerate(items) for _ in texts]
        call = service.classify
    else:
        rows, owner = items, list(range(len(items)))
        call = lambda part: service.complete([e for e, _ in part], [n for _, n in part])  # noqa: E731
    if not hasattr(service, "row_tokens"):  # an upstream engine batches and bounds memory itself
        out = call(rows)
        for i, result in enumerate(_regroup(out, owner, len(items)) if kind == "classify" else out):
            deliver(i, result)
        return
    costs, results = service.row_tokens(kind, rows), [None] * len(rows)
    left = [sum(1 for o in owner if o == i) for i in range(len(items))]
    pending = list(range(len(rows)))
    while pending := [r for r in pending if alive(owner[r])]:
        part = pending[:first_batch([costs[r] for r in pending], budget, pacer.max_rows())]
        started = time.monotonic()
        for r, result in zip(part, call([rows[r] for r in part])):
            results[r] = result
        pacer.observe(len(part), time.monotonic() - started)
        pending = pending[len(part):]
        for o in dict.fromkeys(owner[r] for r in part):
            left[o] -= sum(1 for r in part if owner[r] == o)
            if left[o] == 0:
                deliver(o, [results[r] for r in range(len(rows)) if owner[r] == o] if kind == "classify"
                        else results[o])


def _regroup(results: list, owner: list[int], n: int) -> list:
    """Flat per-text results back into one list per classify request."""
    out: list = [[] for _ in range(n)]
    for o, r in zip(owner, results):
        out[o].append(r)
    return out


def _stream_logger(metrics, record, service, request, route, text):
    """What a finished stream reports: its tokens to the metrics, its text to the request log."""
    async def done(pieces: list[str], finish: str) -> None:
        await _account(metrics, record, service, request, route, text,
                       Completion("".join(pieces), finish, 0, len(pieces)))
    return done


async def _stream(service, executor, example, limit, kind, request, slots, on_done) -> StreamingResponse:
    """Server-sent events, one chunk per decoded piece, then [DONE]; stops if the client goes.
    At most `slots` streams wait or run at once. The headers go out with the first piece, so until
    then the answer is an ordinary one: 503 when it misses the request's deadline, 502 when the
    engine fails (EngineError), 500 for any other failure. After it only an error event can say so."""
    if not slots.acquire(blocking=False):
        raise Overloaded("queue_full", "the server is at capacity (too many streams)", 1)
    cancelled = threading.Event()
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def produce():
        n = 0
        try:
            for piece in ([] if cancelled.is_set() else service.stream(example, limit, cancelled)):
                n += 1
                loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece))
            loop.call_soon_threadsafe(queue.put_nowait, ("end", "length" if n >= limit else "stop"))
        except Exception as e:  # raised or logged by the reader: before the first piece, or after it
            loop.call_soon_threadsafe(queue.put_nowait, ("error", e))
        finally:
            slots.release()  # the producer always ends (a cancelled one at its next token), so a slot never leaks
    loop.run_in_executor(executor, produce)
    try:
        first = await asyncio.wait_for(queue.get(), max(0.0, request.state.deadline - time.monotonic()))
    except (asyncio.TimeoutError, asyncio.CancelledError) as e:
        cancelled.set()
        if isinstance(e, asyncio.CancelledError):
            raise
        raise Overloaded("deadline", "the request was not answered within serve.request_timeout_s", 1) from None
    if first[0] == "error":  # nothing sent yet: a 502 (EngineError's handler) or the guard's 500
        cancelled.set()
        raise first[1]
    return StreamingResponse(_events(service, kind, first, queue, cancelled, on_done, _request_id(request)),
                             media_type="text/event-stream")


async def _events(service, kind, first, queue, cancelled, on_done, request_id: str):
    ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(piece: str | None, finish: str | None) -> str:
        if kind == "text_completion":
            choice = {"text": piece or "", "index": 0, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "delta": {"content": piece} if piece else {}, "finish_reason": finish}
        return "data: " + json.dumps({"id": ident, "object": kind, "created": created, "model": service.name,
                                      "choices": [choice]}) + "\n\n"
    pieces: list[str] = []
    what, value = first
    try:
        while True:
            if what == "piece":
                pieces.append(value)
                yield chunk(value, None)
            elif what == "end":
                await on_done(pieces, value)
                yield chunk(None, value)
                yield "data: [DONE]\n\n"
                return
            else:  # the status (200) is sent: an error event is all server-sent events allow
                log.error("request %s: stream failed after its first piece: %s (error event sent)", request_id,
                          type(value).__name__)
                code = 502 if isinstance(value, EngineError) else 500
                message = "the model engine failed" if code == 502 else "internal error"
                error = {"error": {"message": message, "type": "server_error", "code": code}}
                yield "data: " + json.dumps(error) + "\n\n"
                return
            what, value = await queue.get()
    finally:
        cancelled.set()  # the client went away or the stream ended: the decoder stops at its next token


async def _account(metrics, record, service, request, route, text, done: Completion) -> None:
    metrics.tokens_in.inc(done.prompt_tokens)
    metrics.tokens_out.inc(done.completion_tokens)
    if service.labels:
        metrics.labels.labels(_label(service, done.text)).inc()
    await record([{"route": route, "key_id": request.state.key_id, "input": text, "output": done.text,
                   "label": done.text if service.labels else None, "tokens_in": done.prompt_tokens,
                   "tokens_out": done.completion_tokens}], request.state.deadline)


def _label(service, text: str) -> str:
    """A metric label from the model's label set; any other answer (free text from an upstream
    engine) is counted as one label, so answers cannot create unbounded series."""
    return text if text in service.labels else OTHER_LABEL


def _recorder(writer: LogWriter | None):
    """`await record(rows, deadline)`: the request-log write (redaction included) off the event loop,
    waited for until the deadline at most (see LogWriter); it never raises (see RequestLog.add)."""
    async def record(rows: list[dict], deadline: float | None = None) -> None:
        if writer:
            await writer.record(rows, deadline)
    return record


def _openai(service: Service, kind: str, choice: dict, done: Completion) -> dict:
    return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()), "model": service.name,
            "choices": [choice], "usage": {"prompt_tokens": done.prompt_tokens,
                                           "completion_tokens": done.completion_tokens,
                                           "total_tokens": done.prompt_tokens + done.completion_tokens}}


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _route_label(path: str) -> str:
    """Known routes by name; anything else as one label, so scanners cannot blow up the series count."""
    known = {"/healthz", "/readyz", "/metrics", "/v1/models", "/v1/classify", "/v1/completions",
             "/v1/chat/completions"}
    return path if path in known else "other"
