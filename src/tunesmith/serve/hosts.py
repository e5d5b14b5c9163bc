"""The Host-header check of a server bound to loopback (a defence against DNS rebinding).

A web page on `http://evil.example` can make its domain resolve to 127.0.0.1 and then read the
answers of a server on the user's own machine: the browser thinks it talks to evil.example, so it
sends `Host: evil.example`. A server bound to loopback only ever has a legitimate caller on this
machine, who names it `localhost`, `127.0.0.1` or `[::1]`; anything else is refused before the app
sees the request.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from tunesmith.serve.replies import send_error

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server reachable from this machine only."""
    name = host.strip().lower().strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str | None:
    """The host part of a Host header, lower-cased and without its port; None if malformed.

    `name`, `name:port`, `[v6]` and `[v6]:port`; parsed by hand, in one pass (no regex).
    """
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        name, rest = header[1:end], header[end + 1:]
        if end < 0 or not (rest == "" or (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return name
    name, colon, port = header.partition(":")
    if colon and not port.isdigit():
        return None
    return name or None


class HostCheck:
    """ASGI wrapper: HTTP and WebSocket requests whose Host is not one of `allowed` get a 421 JSON
    error (400 when the header is missing or malformed), and those a browser sends from a page of another
    site (an `Origin` header naming another host) a 403: a page on the web cannot post to a keyless
    server on this machine, even with a "simple" request that needs no preflight. Lifespan events pass."""

    def __init__(self, app, allowed: set[str] | frozenset[str] = LOOPBACK_NAMES,
                 on_refuse: Callable[[dict, int], None] = lambda scope, status: None):
        self.app, self.allowed = app, frozenset(a.lower().strip("[]") for a in allowed)
        self.on_refuse = on_refuse  # (scope, status) of each HTTP request refused here: the server counts it

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        raw = headers.get(b"host")
        name = host_name(raw.decode("latin-1")) if raw is not None else None
        if name in self.allowed and not self._foreign(headers.get(b"origin")):
            return await self.app(scope, receive, send)
        if name in self.allowed:  # a page of another site
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            self.on_refuse(scope, 403)
            return await send_error(send, 403, "requests from pages of other sites are refused")
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        status, message = (421, f"this server answers only to {', '.join(sorted(self.allowed))}") \
            if name is not None else (400, "missing or malformed Host header")
        self.on_refuse(scope, status)
        await send_error(send, status, message)


    def _foreign(self, origin: bytes | None) -> bool:
        """Whether an Origin header names a host other than the allowed ones ("null": a sandboxed page)."""
        if origin is None:
            return False
        text = origin.decode("latin-1").strip()
        scheme, sep, rest = text.partition("://")
        return not sep or host_name(rest) not in self.allowed


def loopback_guard(app, host: str, on_refuse: Callable[[dict, int], None] = lambda scope, status: None):
    """`app` behind a HostCheck when `host` is a loopback bind (the bound name is accepted too);
    `app` itself otherwise, where keys, not the Host header, protect it."""
    if not is_loopback(host):
        return app
    return HostCheck(app, LOOPBACK_NAMES | {host.strip().lower().strip("[]")}, on_refuse)
