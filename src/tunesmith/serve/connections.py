"""A deadline on each request head: a connection that has not sent a whole request head within the
limit is closed.

uvicorn times out an idle keep-alive connection only once a response has gone out, so a client that
connects and sends nothing, or trickles its header lines, would hold one of `serve.max_concurrency`
connection slots for as long as it likes; a few hundred such sockets (no API key needed) lock every
client out with 503s. The body has its own limit in the app (limits.py, 408).
"""

from __future__ import annotations

import asyncio
from functools import partial

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_NOTHING = object()  # no connection state seen yet (a connection's first cycle is None)


class HeadDeadline(asyncio.Protocol):
    """uvicorn's HTTP/1.1 protocol, composed with a timer that closes the connection when it has waited
    for a request head (h11's IDLE: nothing, or only part of a head, received) at two checks
    `seconds / 2` apart within the same request cycle: closed after `seconds` at most."""

    def __init__(self, config, server_state, app_state, _loop=None, *, seconds: float) -> None:
        self.inner = H11Protocol(config=config, server_state=server_state, app_state=app_state, _loop=_loop)
        self.seconds = seconds
        self.timer: asyncio.TimerHandle | None = None
        self.seen = _NOTHING
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
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
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def head_deadline_protocol(seconds: float):
    """The protocol factory uvicorn.Config(http=...) takes: HTTP/1.1 with a `seconds` request-head deadline."""
    return partial(HeadDeadline, seconds=seconds)
