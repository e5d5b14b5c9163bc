"""Small pieces every part of the server answers with: the OpenAI-style error body, the trace id
that log lines carry (X-Request-ID), and the answer's own id (`request_id`, X-Tunesmith-Request-ID)
that POST /v1/feedback refers to."""

from __future__ import annotations

import json
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse

# The header naming an answer's request_id (its row in the request log, what feedback refers to).
# Not X-Request-ID: that one is a trace id, and a caller may choose it.
ANSWER_ID = "X-Tunesmith-Request-ID"


class BadRequest(Exception):
    """A request the server refuses as given: answered 400 (OpenAI's and vLLM's status for an invalid
    request, so SDKs raise their BadRequestError) naming the request field at fault in `param`."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def error_body(status: int, message: str, kind: str, param: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}; `code` is the HTTP status
    (as vLLM gives it), `param` the request field at fault or null."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


async def send_error(send, status: int, message: str, kind: str = "invalid_request_error",
                     headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """The same error body sent straight from an ASGI wrapper that answers before the app (the Host
    check, the body limit, the connection cap), with `headers` added (Retry-After, Connection: close)."""
    body = json.dumps(error_body(status, message, kind)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    """An OpenAI-style error answer (`error_body`) with `status`."""
    return JSONResponse(error_body(status, message, kind, param), status_code=status)


def invalid_body(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for a request body that failed validation (FastAPI's `RequestValidationError.errors()`):
    the first problem and the field it is in; a body that is not JSON at all names no field."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":  # its loc is a character position, not a field
        reason = first.get("ctx", {}).get("error", "invalid")
        return f"the body is not valid JSON ({reason} at character {first['loc'][-1]})", None
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return first.get("msg", "invalid request") + (f" ({where})" if where else ""), where or None


def request_id(request: Request) -> str:
    """The X-Request-ID given to this request (see app.RequestIds), "-" when there is none."""
    return getattr(request.state, "request_id", None) or "-"


def new_answer_id() -> str:
    """A fresh id for one answered text: server-made (uuid4 hex, unguessable), never the caller's."""
    return uuid.uuid4().hex
