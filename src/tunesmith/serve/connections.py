"""The server's connection slots: a deadline on each request head (a connection that has not sent a
whole request head within the limit is closed), and `serve.max_concurrency` counted here, so that a
client past it gets the API's own JSON 503 with Retry-After (uvicorn's limit_concurrency answers a
plain-text one).

uvicorn times out an idle keep-alive connection only once a response has gone out, so a client that
connects and sends nothing, or trickles its header lines, would hold one of `serve.max_concurrency`
connection slots for as long as it likes; a few hundred such sockets (no API key needed) lock every
client out with 503s. The body has its own limit in the app (limits.py, 408).
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from tunesmith.serve.replies import send_error

_NOTHING = object()  # no connection state seen yet (a connection's first cycle is None)


RETRY_AFTER_S = 1  # slots free as soon as any answer goes out


class Capacity:
    """`limit` slots for open connections and requests being answered (uvicorn's limit_concurrency rule:
    503 once either count is past it). Counted on the event loop's one thread, so no lock."""

    def __init__(self, limit: int) -> None:
        self.limit, self.connections, self.requests = limit, 0, 0
        self.refused: set[tuple] = set()  # (host, port) of open connections counted out on their 503

    def full(self) -> bool:
        """Whether a request arriving now is refused (its own connection is counted already)."""
        return self.connections > self.limit or self.requests >= self.limit

    def refuse(self, client) -> None:
        """Count out the connection of a refused request now, not when it closes: in a burst of N > limit
        connections every request saw N and was refused until the refused ones had closed (4 of 30 were
        answered at a limit of 20); now the first N - limit are refused and the rest answered."""
        key = _peer(client)
        if key is not None and key not in self.refused:
            self.refused.add(key)
            self.connections -= 1

    def closed(self, peer) -> None:
        """A connection closed: counted out unless its refusal already did."""
        key = _peer(peer)
        if key in self.refused:
            self.refused.discard(key)
        else:
            self.connections -= 1


def _peer(address) -> tuple | None:
    """(host, port) of a TCP peer as the socket (peername, IPv6: 4 fields) or the ASGI scope gives it."""
    return tuple(address[:2]) if isinstance(address, (tuple, list)) and len(address) >= 2 else None


class CapacityGuard:
    """ASGI wrapper: an HTTP request past the capacity gets 503 with Retry-After in the app's error shape
    and the connection closed (`on_reject` counts it, given the request's scope); others are counted while
    the app answers them."""

    def __init__(self, app, capacity: Capacity, on_reject: Callable[[dict], None] = lambda scope: None) -> None:
        self.app, self.capacity, self.on_reject = app, capacity, on_reject

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.capacity.full():
            self.on_reject(scope)
            self.capacity.refuse(scope.get("client"))
            return await _busy(send, self.capacity.limit)
        self.capacity.requests += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.capacity.requests -= 1


async def _busy(send, limit: int) -> None:
    await send_error(send, 503, f"the server is at capacity ({limit} connections or requests at once, "
                     "serve.max_concurrency)", "server_error",
                     ((b"retry-after", str(RETRY_AFTER_S).encode()), (b"connection", b"close")))


class HeadDeadline(asyncio.Protocol):
    """uvicorn's HTTP/1.1 protocol, composed with a timer that closes the connection when it has waited
    for a request head (h11's IDLE: nothing, or only part of a head, received) at two checks
    `seconds / 2` apart within the same request cycle: closed after `seconds` at most."""

    def __init__(self, config, server_state, app_state, _loop=None, *, seconds: float,
                 capacity: Capacity | None = None) -> None:
        self.inner = H11Protocol(config=config, server_state=server_state, app_state=app_state, _loop=_loop)
        self.seconds, self.capacity = seconds, capacity
        self.timer: asyncio.TimerHandle | None = None
        self.seen = _NOTHING
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        if self.capacity is not None:
            self.capacity.connections += 1
        self.inner.connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self.timer = self.inner.loop.call_later(self.seconds / 2, self._check)

    def _check(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        waiting = self.inner.conn.their_state is h11.IDLE
        if waiting and self.inner.cycle is self.seen:  # no new request head since the last check
            self.transport.close()
            return
        self.seen = self.inner.cycle if waiting else _NOTHING
        self._arm()

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.capacity is not None and self.transport is not None:  # counted once, however often called
            self.capacity.closed(self.transport.get_extra_info("peername"))
        self.transport = None
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def head_deadline_protocol(seconds: float, capacity: Capacity | None = None):
    """The protocol factory uvicorn.Config(http=...) takes: HTTP/1.1 with a `seconds` request-head deadline,
    its connections counted in `capacity` (the one a CapacityGuard around the app reads)."""
    return partial(HeadDeadline, seconds=seconds, capacity=capacity)
