"""The workbench's security layer: paths confined to `--root`, CSRF tokens on every state-changing
route, API keys (Bearer header or a session cookie) when the server is reachable from other
machines, and the security headers every answer carries.

The rules match `tunesmith serve`: loopback by default (serve/hosts.py checks the Host header
there), keys required on any other host, keys compared in constant time (serve/auth.py).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from tunesmith.serve.auth import KeyChecker
from tunesmith.serve.replies import error

router = APIRouter()

CSRF_HEADER = "X-Tunesmith-CSRF"
COOKIE = "tunesmith_ui_session"
MAX_REL = 1024            # characters in a relative path: longer is not a path a page links to
MAX_LOGIN_BODY = 4096     # bytes in the key form's body
BODY_SECONDS = 30.0       # to receive a whole request body (app.asgi_app): 408 past it
PAGE_CSP = ("default-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'self'")
# A run's own HTML (report.html, the compare page) has inline styles and data: images and no scripts:
# sandboxed (an opaque origin), it cannot reach the app even if a data text slipped through unescaped.
FILE_CSP = "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; frame-ancestors 'self'; sandbox"
OPEN_PATHS = ("/login", "/static/")


def inside_root(request_or_root: Request | Path, rel: str) -> Path:
    """`rel` resolved under the workbench root; HTTPException 404 for anything that could leave it.

    Refused: NUL, absolute paths (`/x`, `\\x`, `C:x`), any `..` part, over-long paths, and paths
    whose resolved form (symlinks followed) is outside the root. The answer is the same 404 for
    all of them, so a refusal does not tell whether the file exists."""
    root = _root_of(request_or_root)
    rel = str(rel)
    parts = rel.replace("\\", "/").split("/")
    if ("\x00" in rel or len(rel) > MAX_REL or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":")
            or ".." in parts):
        raise HTTPException(404, "not found")
    try:
        path = (root / rel).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a bad name
        raise HTTPException(404, "not found") from None
    if path != root and not path.is_relative_to(root):
        raise HTTPException(404, "not found")
    return path


def _root_of(request_or_root: Request | Path) -> Path:
    if isinstance(request_or_root, Request):
        return request_or_root.app.state.ui.root
    return Path(request_or_root).resolve()


def csrf(request: Request) -> None:
    """Dependency of every POST/PUT/DELETE route: the page's token in X-Tunesmith-CSRF (compared in
    constant time) and, when the browser sends an Origin, this app's own origin; else 403."""
    token = request.headers.get(CSRF_HEADER, "").encode()
    if not hmac.compare_digest(token, request.app.state.ui.csrf_token.encode()):
        raise HTTPException(403, f"missing or wrong {CSRF_HEADER} token: reload the page")
    if not same_origin(request):
        raise HTTPException(403, "cross-origin request refused")


async def read_capped(request: Request, limit: int) -> bytes:
    """The request's body, read at most `limit` bytes: 413 as soon as the declared length or the bytes
    streamed so far pass it, so an oversized body is never held whole in memory."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def same_origin(request: Request) -> bool:
    """No Origin header (not a browser's cross-site request), or the app's own scheme://host:port."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return origin == f"{request.url.scheme}://{request.headers.get('host', '')}"


class SecurityHeaders:
    """ASGI wrapper adding the security headers to every HTTP answer (a route's own CSP stays)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                names = {name.lower() for name, _ in headers}
                for name, value in ((b"content-security-policy", PAGE_CSP), (b"x-frame-options", "SAMEORIGIN"),
                                    (b"x-content-type-options", "nosniff"), (b"referrer-policy", "no-referrer")):
                    if name not in names:
                        headers.append((name, value.encode()))
                message = {**message, "headers": headers}
            await send(message)
        await self.app(scope, receive, with_headers)


class KeyCheck:
    """ASGI wrapper: with API keys set, every request but the key form and static files needs a
    valid `Authorization: Bearer KEY` or the session cookie the key form sets; else 401 (pages get
    the key form, everything else the JSON error)."""

    def __init__(self, app, keys: list[str]):
        self.app, self.checker = app, KeyChecker(keys)
        self.keys = [k.encode() for k in keys]
        self.secret = secrets.token_bytes(32)  # a new one per start: old cookies die with the server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})["key_check"] = self
        if scope["type"] != "http" or not self.keys or scope["path"].startswith(OPEN_PATHS):
            return await self.app(scope, receive, send)
        request = Request(scope)
        if self.checker.check(request.headers.get("authorization")) or self.session_ok(request.cookies.get(COOKIE)):
            return await self.app(scope, receive, send)
        await _unauthorized(request)(scope, receive, send)

    def session_value(self, key: bytes) -> str:
        """The cookie for a user who gave `key`: a MAC of it under this start's secret, never the key."""
        return hmac.new(self.secret, key, hashlib.sha256).hexdigest()

    def session_ok(self, cookie: str | None) -> bool:
        given, ok = (cookie or "").encode(), False
        for key in self.keys:  # no early exit, as KeyChecker: the time does not say which key matched
            ok |= hmac.compare_digest(given, self.session_value(key).encode())
        return ok

    def key_ok(self, given: str) -> bytes | None:
        found = None
        for key in self.keys:
            if hmac.compare_digest(given.encode(), key) and found is None:
                found = key
        return found


def _unauthorized(request: Request) -> Response:
    if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
        return HTMLResponse(login_html(request.url.path, ""), status_code=401)
    return error(401, "missing or invalid API key", "authentication_error")


def login_html(next_path: str, message: str) -> str:
    """The key form (a page of its own: the app frame needs a session to link anywhere)."""
    from html import escape

    note = f"<p class='error'>{escape(message)}</p>" if message else ""
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>tunesmith ui: API key</title>"
            "<link rel='stylesheet' href='/static/ui.css'></head><body><main class='login'>"
            f"<h1>tunesmith ui</h1><p>This workbench needs an API key.</p>{note}"
            "<form method='post' action='/login'><label>API key <input type='password' name='key' "
            f"autocomplete='current-password' required></label><input type='hidden' name='next' "
            f"value='{escape(_local(next_path))}'><button type='submit'>Sign in</button></form></main></body></html>")


def _local(path: str) -> str:
    """`path` when it is a path of this app, else "/" (never a redirect to another site)."""
    return path if path.startswith("/") and not path.startswith(("//", "/\\")) else "/"


@router.get("/login")
def login_page(next: str = "/") -> HTMLResponse:
    """The key form on its own (a page without a session gets it with its 401 too)."""
    return HTMLResponse(login_html(next, ""))


@router.post("/login")
async def login(request: Request) -> Response:
    """The key form: a right key sets the HttpOnly, SameSite=Strict session cookie and goes back."""
    check: KeyCheck | None = request.scope.get("state", {}).get("key_check")
    if check is None or not check.keys:
        return RedirectResponse("/", status_code=303)
    if not same_origin(request):
        return error(403, "cross-origin request refused", "invalid_request_error")
    body = await read_capped(request, MAX_LOGIN_BODY)
    form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=4)
    given, next_path = (form.get("key") or [""])[0], _local((form.get("next") or ["/"])[0])
    key = check.key_ok(given)
    if key is None:
        return HTMLResponse(login_html(next_path, "wrong API key"), status_code=401)
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(COOKIE, check.session_value(key), httponly=True, samesite="strict", path="/")
    return response
