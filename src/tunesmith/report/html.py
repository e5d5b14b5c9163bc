"""Pieces every page of the report package shares (report.html, the compare page, the data page):
the style sheet, the page shell, number formatting, inline images, and reading a run's training log."""

from __future__ import annotations

import html
from pathlib import Path

from tunesmith import fsio

CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.met{color:#0a7d28;font-weight:bold}
.unmet{color:#b00020;font-weight:bold}img{max-width:100%}.warn{color:#8a5a00}"""


def page(title: str, body: str) -> str:
    """A whole HTML document: `title` (escaped here) and the shared style sheet around `body` (already HTML)."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>")


def img(b64: str, alt: str) -> str:
    """A paragraph holding a base64 PNG inline; `alt` is inserted as given (escape user text first)."""
    return f"<p><img alt='{alt}' src='data:image/png;base64,{b64}'></p>"


def fmt(v) -> str:
    """A table cell's text: floats to 4 decimals (large ones with thousands separators), None as n/a."""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:,.1f}"
    return html.escape(str(v)) if v is not None else "n/a"


def read_log(path: Path) -> list[dict]:
    """The records of a run's train_log.jsonl; none when the run has no log."""
    return fsio.read_jsonl(path, missing_ok=True)
