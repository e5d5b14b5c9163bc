"""The HTTP server: OpenAI-compatible completions and chat, /v1/classify, health, readiness and
Prometheus metrics, with API keys, rate limits, body limits, micro-batching, a request log and
drift gauges. `create_app` builds it around a loaded Service; `tunesmith serve` runs it."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.config import ServeConfig
from tunesmith.serve.auth import KeyChecker, RateLimiter
from tunesmith.serve.batcher import MicroBatcher
from tunesmith.serve.limits import BodyLimit
from tunesmith.serve.metrics import ServeMetrics
from tunesmith.serve.monitoring import DriftWatch
from tunesmith.errors import EngineError
from tunesmith.serve.service import Completion, Service
from tunesmith.serve.store import RequestLog

OPEN_ROUTES = {"/healthz"}


class _Body(BaseModel):
    # OpenAI clients send more fields than we use (top_p, user, ...); unknown ones are ignored.
    model_config = ConfigDict(extra="ignore")


class ClassifyRequest(_Body):
    text: str | None = None
    texts: list[str] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> ClassifyRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of `text` or `texts`")
        return self


class CompletionRequest(_Body):
    model: str | None = None
    prompt: str
    max_tokens: int = Field(16, ge=1)
    stream: bool = False


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False


def create_app(service: Service, cfg: ServeConfig, keys: list[str] | None = None,
               log_path: Path | None = None) -> FastAPI:
    """The FastAPI app serving `service` under the limits of `cfg`."""
    metrics = ServeMetrics()
    metrics.load_seconds.set(service.load_seconds)
    metrics.info.labels(service.name, service.variant).set(1)
    checker, limiter = KeyChecker(keys or []), RateLimiter(cfg.rate_limit_per_minute)
    executor = ThreadPoolExecutor(max_workers=service.threads, thread_name_prefix="model")
    batcher = MicroBatcher(lambda kind, items: _run_batch(service, kind, items), cfg.max_batch, cfg.max_wait_ms,
                           executor, on_batch=lambda kind, n: metrics.batch_size.labels(kind).observe(n))
    store = RequestLog(log_path, cfg.request_log.retention_days, cfg.request_log.redact_pii) \
        if cfg.request_log.enabled and log_path else None
    watch = DriftWatch(service.run_dir, store, cfg.drift, metrics) if store and service.run_dir else None

    @asynccontextmanager
    async def lifespan(_app):
        yield
        executor.shutdown(wait=False, cancel_futures=True)
        service.close()
        if watch:
            watch.close()
        if store:
            store.close()

    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.service, app.state.store, app.state.watch, app.state.metrics = service, store, watch, metrics

    @app.middleware("http")
    async def guard(request: Request, call_next):
        route, started, response = request.url.path, time.perf_counter(), None
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
            except Exception:  # never a stack trace in a response, never a dead process
                metrics.errors.labels(_route_label(route)).inc()
                response = _error(500, "internal error", "server_error")
            return response
        finally:
            metrics.in_flight.dec()
            status = str(response.status_code) if response is not None else "500"
            metrics.requests.labels(_route_label(route), status).inc()
            metrics.latency.labels(_route_label(route)).observe(time.perf_counter() - started)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(EngineError)
    async def engine_failed(request: Request, exc: EngineError):
        metrics.errors.labels(_route_label(request.url.path)).inc()
        return _error(502, str(exc), "server_error")

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
        results = await batcher.submit("classify", texts)
        latency = (time.perf_counter() - started) * 1000
        out = [{"label": label, "probabilities": probs} for label, probs in results]
        for r in out:
            metrics.labels.labels(r["label"]).inc()
        _log(store, watch, [{"route": "/v1/classify", "key_id": request.state.key_id, "input": t, "output": r["label"],
                             "label": r["label"], "confidence": r["probabilities"][r["label"]],
                             "latency_ms": latency} for t, r in zip(texts, out)])
        answer = {"model": service.name, "variant": service.variant, "results": out}
        return {**out[0], **answer} if body.text is not None else answer

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        limit = _limit(body.max_tokens, cfg)
        example = service.example(prompt=body.prompt)
        if body.stream:
            return _stream(service, executor, example, limit, "text_completion",
                           _stream_logger(metrics, store, watch, service, request, "/v1/completions", body.prompt))
        done: Completion = await batcher.submit("complete", (example, limit))
        _account(metrics, store, watch, service, request, "/v1/completions", body.prompt, done)
        return _openai(service, "text_completion", {"text": done.text, "index": 0, "logprobs": None,
                                                    "finish_reason": done.finish_reason}, done)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        limit = _limit(body.max_completion_tokens or body.max_tokens or cfg.max_tokens, cfg)
        example = service.example(messages=[m.model_dump() for m in body.messages])
        if body.stream:
            return _stream(service, executor, example, limit, "chat.completion.chunk",
                           _stream_logger(metrics, store, watch, service, request, "/v1/chat/completions",
                                          example.input))
        done: Completion = await batcher.submit("complete", (example, limit))
        _account(metrics, store, watch, service, request, "/v1/chat/completions", example.input, done)
        return _openai(service, "chat.completion", {"index": 0, "message": {"role": "assistant", "content": done.text},
                                                    "finish_reason": done.finish_reason}, done)

    return BodyLimit(app, cfg.max_body_bytes)


def _limit(requested: int, cfg: ServeConfig) -> int:
    if requested > cfg.max_tokens:
        from fastapi import HTTPException

        raise HTTPException(422, f"max_tokens must be at most {cfg.max_tokens}")
    return requested


def _run_batch(service: Service, kind: str, items: list) -> list:
    """One model call for a batch of requests (on the model thread)."""
    if kind == "classify":
        flat = [t for texts in items for t in texts]
        results = service.classify(flat)
        out, at = [], 0
        for texts in items:
            out.append(results[at:at + len(texts)])
            at += len(texts)
        return out
    return service.complete([e for e, _ in items], [n for _, n in items])


def _stream_logger(metrics, store, watch, service, request, route, text):
    """What a finished stream reports: its tokens to the metrics, its text to the request log."""
    def done(pieces: list[str], finish: str) -> None:
        _account(metrics, store, watch, service, request, route, text,
                 Completion("".join(pieces), finish, 0, len(pieces)))
    return done


def _stream(service, executor, example, limit, kind, on_done) -> StreamingResponse:
    """Server-sent events, one chunk per decoded piece, then [DONE]; stops if the client goes."""
    cancelled = threading.Event()
    ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(piece: str | None, finish: str | None) -> str:
        if kind == "text_completion":
            choice = {"text": piece or "", "index": 0, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "delta": {"content": piece} if piece else {}, "finish_reason": finish}
        return "data: " + json.dumps({"id": ident, "object": kind, "created": created, "model": service.name,
                                      "choices": [choice]}) + "\n\n"

    async def events():
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def produce():
            n = 0
            try:
                for piece in service.stream(example, limit, cancelled):
                    n += 1
                    loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece))
                loop.call_soon_threadsafe(queue.put_nowait, ("end", "length" if n >= limit else "stop"))
            except Exception:
                loop.call_soon_threadsafe(queue.put_nowait, ("error", None))
        loop.run_in_executor(executor, produce)
        pieces: list[str] = []
        try:
            while True:
                what, value = await queue.get()
                if what == "piece":
                    pieces.append(value)
                    yield chunk(value, None)
                elif what == "end":
                    on_done(pieces, value)
                    yield chunk(None, value)
                    yield "data: [DONE]\n\n"
                    return
                else:
                    yield 'data: {"error": {"message": "internal error", "type": "server_error"}}\n\n'
                    return
        finally:
            cancelled.set()  # the client went away or the stream ended: the decoder stops at its next token
    return StreamingResponse(events(), media_type="text/event-stream")


def _account(metrics, store, watch, service, request, route, text, done: Completion) -> None:
    metrics.tokens_in.inc(done.prompt_tokens)
    metrics.tokens_out.inc(done.completion_tokens)
    if service.labels:
        metrics.labels.labels(done.text).inc()
    _log(store, watch, [{"route": route, "key_id": request.state.key_id, "input": text, "output": done.text,
                         "label": done.text if service.labels else None, "tokens_in": done.prompt_tokens,
                         "tokens_out": done.completion_tokens}])


def _log(store, watch, rows: list[dict]) -> None:
    if store:
        store.add(rows)
    if watch:
        watch.seen(len(rows))


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
