"""Request body limits as an ASGI wrapper: a declared Content-Length over the size limit is refused
before reading, a chunked body is cut off (413) as soon as it passes the limit, and a body not read
in full within the time limit is cut off (408): clients trickling bodies byte by byte would
otherwise hold their connections (and serve.max_concurrency's slots) for as long as they like."""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from tunesmith.serve.replies import send_error

DISCONNECT = {"type": "http.disconnect"}


class BodyLimit:
    """`max_bytes` per body; `timeout_s` (None: no limit) to read the whole body, from the moment the
    request's headers arrived; `timeout_key`: the setting the 408's message names. Once the body is in,
    receive() is not timed (a streaming response waits on it for the client to leave)."""

    def __init__(self, app, max_bytes: int, timeout_s: float | None = None,
                 timeout_key: str = "serve.body_timeout_s", on_declared_413: Callable[[dict], None] | None = None):
        self.app, self.max_bytes, self.timeout_s, self.timeout_key = app, max_bytes, timeout_s, timeout_key
        # A body declared too large is refused before the app sees the request: this counts it there.
        self.on_declared_413 = on_declared_413
        self.state = getattr(app, "state", None)  # tests and servers reach the app's state through this

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            if self.on_declared_413 is not None:
                self.on_declared_413(scope)
            return await _refuse(send, 413, f"request body over {self.max_bytes} bytes")
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        # A request with neither header has no body (HTTP/1.1): nothing to time, so a streaming GET's
        # first receive() (its disconnect watch) is never cut off, however late it comes.
        complete = declared is None and b"transfer-encoding" not in headers
        seen, started, rejected = 0, False, False

        async def reject(status: int, message: str) -> dict:
            # Answer now and tell the app the client is gone; whatever it sends later is dropped.
            nonlocal rejected
            if not started:  # (an answer already under way is left to finish)
                rejected = True
                scope.setdefault("state", {})["refused"] = status  # the status the app's metrics count
                await _refuse(send, status, message)
            return DISCONNECT

        async def counted_receive():
            nonlocal seen, complete
            if rejected:
                return DISCONNECT
            try:
                message = await (receive() if complete or deadline is None
                                 else asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic())))
            except asyncio.TimeoutError:
                return await reject(408, f"request body not received within {self.timeout_s:g} s "
                                         f"({self.timeout_key})")
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_bytes and not started:
                    return await reject(413, f"request body over {self.max_bytes} bytes")
            return message

        async def guarded_send(message):
            nonlocal started
            if rejected:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not rejected:
                raise


async def _refuse(send, status: int, message: str) -> None:
    await send_error(send, status, message, headers=((b"connection", b"close"),))
