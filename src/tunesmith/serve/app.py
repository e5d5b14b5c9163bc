"""The HTTP server: OpenAI-compatible completions and chat, /v1/classify, feedback on answers
(/v1/feedback), health, readiness and Prometheus metrics, with API keys, rate limits, body limits,
micro-batching, a request log and drift gauges. `create_app` builds it around a loaded Service;
`tunesmith serve` runs it.

Under load every request gets an answer: model work waits in a bounded queue (`serve.max_queue`),
each model call holds at most `serve.max_batch_tokens` tokens, and a request not answered within
`serve.request_timeout_s` (or one that finds the queue full) gets 503 with Retry-After; the deadline
starts when the request arrives, and a request-log write still running at the deadline goes on in the
background. A body not read within `serve.body_timeout_s` gets 408. Every response carries an
X-Request-ID (a trace id); an answer also carries its own `request_id` (X-Tunesmith-Request-ID), the
id feedback refers to. A 500 logs one line with the trace id and the exception type."""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.config import ServeConfig
from tunesmith.errors import EngineError
from tunesmith.serve.batcher import Overloaded
from tunesmith.serve.feedback import feedback_router
from tunesmith.serve.limits import BodyLimit
from tunesmith.serve.replies import BadRequest, error, invalid_body, request_id
from tunesmith.serve.routes import classify_router, openai_router, ops_router
from tunesmith.serve.service import Service
from tunesmith.serve.state import ServerState, build_state

OPEN_ROUTES = {"/healthz"}
REQUEST_ID = "X-Request-ID"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # a caller's own request id is kept when it looks like one
log = logging.getLogger("tunesmith.serve")


def create_app(service: Service, cfg: ServeConfig, keys: list[str] | None = None,
               log_path: Path | None = None) -> FastAPI:
    """The FastAPI app serving `service` under the limits of `cfg`: the routers over one ServerState,
    behind the guard (keys, rate limits, 500s, metrics), the body limit and request ids."""
    state = build_state(service, cfg, keys, log_path)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        state.close()

    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.service, app.state.store, app.state.watch, app.state.metrics = \
        state.service, state.store, state.watch, state.metrics
    app.state.batcher, app.state.writer, app.state.quality = state.batcher, state.writer, state.quality
    app.state.before_close = state.before_close  # build_app adds the registry follower's stop
    routers = (ops_router(state), openai_router(state), classify_router(state), feedback_router(state))
    for router in routers:
        app.include_router(router)
    # The metrics' route labels, from the routers themselves (an included router hides its routes' paths).
    app.state.routes = frozenset(route.path for router in routers for route in router.routes)
    _add_guard(app, state)
    _add_error_handlers(app, state)
    return RequestIds(BodyLimit(app, cfg.max_body_bytes, cfg.body_timeout_s,
                                on_declared_413=partial(_count_413, app.state.routes, state.metrics)))


def _count_413(routes: frozenset, metrics, scope: dict) -> None:
    """Count a body refused by its declared length (BodyLimit answers it before the guard would)."""
    path = scope.get("path", "")
    metrics.requests.labels(path if path in routes else "other", "413").inc()


def _add_guard(app: FastAPI, state: ServerState) -> None:
    """The middleware every request passes: API key and rate limit, its deadline, a 500 (never a
    stack trace) for an unhandled failure, and the request metrics."""
    cfg, metrics = state.cfg, state.metrics

    @app.middleware("http")
    async def guard(request: Request, call_next):
        route, started, response = request.url.path, time.perf_counter(), None
        # From the request's arrival (RequestIds), so the deadline covers all the server does for it;
        # the server stops waiting a little early, so that its 503 also leaves in time on a busy CPU.
        request.state.deadline = getattr(request.state, "arrived", time.monotonic()) + \
            cfg.request_timeout_s - answer_margin(cfg.request_timeout_s)
        metrics.in_flight.inc()
        try:
            response = _refusal(state, request, route)
            if response is None:
                response = await _call(call_next, request, state)
            return response
        finally:
            metrics.in_flight.dec()
            status = str(getattr(request.state, "refused", None)  # a body cut off by BodyLimit: 408 or 413
                         or (response.status_code if response is not None else 500))
            label = _route_label(request)
            metrics.requests.labels(label, status).inc()
            metrics.latency.labels(label).observe(time.perf_counter() - started)


def _refusal(state: ServerState, request: Request, route: str):
    """A 401 (no valid API key) or 429 (over the key's rate limit) answer, or None after setting
    `request.state.key_id` (None when keys are off or the route is open)."""
    key = None
    if state.checker.enabled and route not in OPEN_ROUTES:
        key = state.checker.check(request.headers.get("authorization"))
        if key is None:
            return error(401, "missing or invalid API key", "authentication_error")
        allowed, wait = state.limiter.allow(key)
        if not allowed:
            response = error(429, "rate limit exceeded", "rate_limit_error")
            response.headers["Retry-After"] = str(max(1, round(wait)))
            return response
    request.state.key_id = key
    return None


async def _call(call_next, request: Request, state: ServerState):
    try:
        return await call_next(request)
    except Exception as e:  # never a stack trace in a response, never a dead process
        state.metrics.errors.labels(_route_label(request)).inc()
        log.error("request %s: %s %s failed: %s (answered 500)", request_id(request), request.method,
                  _route_label(request), type(e).__name__)
        return error(500, "internal error", "server_error")


def _add_error_handlers(app: FastAPI, state: ServerState) -> None:
    """Every refusal in the OpenAI error format: HTTP errors as given, engine failures 502,
    overload 503 with Retry-After, invalid requests 400 (OpenAI's status for them, vLLM's too) naming the
    first bad field in the message and in `param`."""
    metrics = state.metrics

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's 400 "error parsing the body": invalid input
            return error(400, f"the body is not valid UTF-8 (byte {exc.__cause__.start})", "invalid_request_error")
        return error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return error(400, str(exc), "invalid_request_error", exc.param)

    @app.exception_handler(EngineError)
    async def engine_failed(request: Request, exc: EngineError):
        metrics.errors.labels(_route_label(request)).inc()
        return error(502, str(exc), "server_error")

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded):
        metrics.rejected.labels(exc.kind).inc()
        response = error(503, exc.reason, "server_error")
        response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, param = invalid_body(exc.errors())
        return error(400, message, "invalid_request_error", param)


class RequestIds:
    """ASGI wrapper (outermost, so a 413 from the body limit carries one too): a form-typed POST body is
    read as JSON (`_json_body`), and every response gets an X-Request-ID header, the caller's own when
    it sent a plausible one, otherwise a new one; the app finds it in `request.state.request_id` for
    its log lines, and the time the request arrived (time.monotonic(), where its deadline starts) in
    `request.state.arrived`."""

    def __init__(self, app):
        self.app = app
        self.state = getattr(app, "state", None)  # tests and servers reach the app's state through this

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(REQUEST_ID.lower().encode(), b"").decode("latin-1")
        rid = given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
        scope = _json_body(scope)
        state = scope.setdefault("state", {})
        state["request_id"], state["arrived"] = rid, time.monotonic()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REQUEST_ID.encode(), rid.encode())]}
            await send(message)
        await self.app(scope, receive, send_with_id)


def _json_body(scope: dict) -> dict:
    """Every body this API takes is JSON: a POST sent as another type (a form: `curl -d '{...}'` without -H,
    the form type being curl's default; text/plain, a fetch() default) is read as the JSON it is, not
    refused as "not a valid dictionary"; nor is one sent with no type at all (`http.client`, `requests`'
    `data=`)."""
    headers = scope.get("headers") or []
    types = [v for k, v in headers if k == b"content-type"]
    if scope.get("method") != "POST" or (types and all(_is_json(v) for v in types)):
        return scope
    kept = [(k, v) for k, v in headers if k != b"content-type"]
    return {**scope, "headers": [*kept, (b"content-type", b"application/json")]}


def _is_json(content_type: bytes) -> bool:
    kind = content_type.split(b";")[0].strip().lower()
    return kind == b"application/json" or (kind.startswith(b"application/") and kind.endswith(b"+json"))


def answer_margin(timeout_s: float) -> float:
    """Seconds before serve.request_timeout_s at which the server stops waiting for the model and
    answers 503: time to build and send that answer while the event loop is busy (measured: up to
    0.35 s late with a CPU hog beside the server; see BENCHMARKS.md)."""
    return min(1.0, 0.05 * timeout_s)


def _route_label(request: Request) -> str:
    """The app's own routes by path; anything else as one label, so scanners cannot blow up the series count."""
    path = request.url.path
    return path if path in request.app.state.routes else "other"
