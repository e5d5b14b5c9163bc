"""Small pieces every part of the server answers with: the OpenAI-style error body, and the
request id that log lines carry."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse


def error(status: int, message: str, kind: str) -> JSONResponse:
    """An OpenAI-style error answer: {"error": {"message", "type", "code"}} with `status`."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def request_id(request: Request) -> str:
    """The X-Request-ID given to this request (see app.RequestIds), "-" when there is none."""
    return getattr(request.state, "request_id", None) or "-"
