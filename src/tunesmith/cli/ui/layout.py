"""The frame every workbench page shares: navigation, the CSRF token for ui.js, the stylesheet.

No inline scripts or styles (the CSP is `default-src 'self'`): pages pass data to their scripts
through `data-*` attributes or JSON endpoints, and every text that comes from a user or a file is
escaped with `esc`.
"""

from __future__ import annotations

import html

from fastapi import Request
from fastapi.responses import HTMLResponse

NAV = (("/", "Runs"), ("/new", "New run"), ("/review", "Review labels"))


def esc(text: object) -> str:
    """`text` as HTML text or attribute value (quotes escaped too)."""
    return html.escape(str(text), quote=True)


def page(request: Request, title: str, body: str, scripts: list[str] | tuple[str, ...] = (),
         status_code: int = 200) -> HTMLResponse:
    """A whole page: `body` (HTML, already escaped) in the common frame, with ui.js and `scripts`
    (file names under /static/) loaded after it."""
    token = request.app.state.ui.csrf_token
    here = request.url.path
    links = "".join(f"<a href='{href}'{' aria-current=page' if _current(here, href) else ''}>{name}</a>"
                    for href, name in NAV)
    tags = "".join(f"<script src='/static/{esc(name)}' defer></script>" for name in ("ui.js", *scripts))
    return HTMLResponse(
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<meta name='csrf-token' content='{esc(token)}'><title>{esc(title)} · tunesmith</title>"
        f"<link rel='icon' href='/static/favicon.svg' type='image/svg+xml'>"
        f"<link rel='stylesheet' href='/static/ui.css'>{tags}</head><body>"
        f"<header><a class='brand' href='/'>tunesmith</a><nav>{links}</nav></header>"
        f"<main>{body}</main></body></html>", status_code=status_code)


def _current(path: str, href: str) -> bool:
    return path == "/" if href == "/" else path.startswith(href)
