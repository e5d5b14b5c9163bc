"""Text normalisation for cleaning, and the normalised key that exact deduplication hashes."""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata

from tunesmith.config import NormalizeSettings

# Every pattern here runs on user text, so each is linear-time: none can cross a `<` (tags) or the
# character it starts at (entities), so a failed attempt costs at most the distance to the next start.
# Comments (`<!-- ... -->`) are found with str.find in `_strip_tags` instead: a lazy `.*?` would rescan
# to the end of the text from every unclosed `<!--` (quadratic).
_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9-]*(?:\s[^<>]*)?/?>")
_ENTITY = re.compile(r"&(?:#\d+|#x[0-9a-fA-F]+|[a-zA-Z]+);")
# C0/C1 control characters other than tab and newline, zero-width characters and every bidi control (the
# embeddings and overrides, the isolates U+2066-2069, the marks, U+061C) and the soft hyphen (an invisible
# break hint: "co\u00adoperate" is "cooperate"). ZWNJ and ZWJ stay: Persian and Indic words and emoji
# sequences are spelled with them; so do tag characters (the flags of England, Scotland, Wales).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\xad\u061c\u200b\u200e\u200f\u202a-\u202e\u2060"
                      r"\u2066-\u2069\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0]+")
# Three or more newlines; the lines are stripped first, so only newlines lie between them.
_BLANK_LINES = re.compile(r"\n{3,}")
_PUNCT_SPACE = re.compile(r"[\W_]+", re.UNICODE)


def normalize_text(text: str, cfg: NormalizeSettings, task_type: str = "classification") -> tuple[str, list[str]]:
    """An input text cleaned, and the kinds of change made ("unicode", "control_chars", "html", "whitespace").

    Unicode, markup and layout steps run on the inputs of the task types `cfg` names (by default
    classification only: a generation prompt may hold code, markup or the very span the answer quotes)."""
    changes = []
    steps = [("unicode", cfg.applies("unicode", task_type), lambda t: unicodedata.normalize("NFKC", t)),
             ("control_chars", cfg.control_chars, lambda t: _CONTROL.sub("", t)),
             ("html", cfg.applies("html", task_type), _strip_html),
             ("whitespace", cfg.applies("whitespace", task_type), _collapse_whitespace)]
    for name, on, fn in steps:
        if on:
            new = fn(text)
            if new != text:
                changes.append(name)
                text = new
    return text, changes


def _strip_html(text: str) -> str:
    if "<" not in text and "&" not in text:
        return text
    text = _strip_tags(text) if "<" in text else text
    return html.unescape(text) if _ENTITY.search(text) else text


def _strip_tags(text: str) -> str:
    """Each tag and comment replaced by a space, scanning left to right (what a regex sub would do),
    in linear time: comment ends are found with str.find, and once one `<!--` has no `-->` after it,
    no later one can have either."""
    out, pos = [], 0
    comments_can_close = True
    start = text.find("<")
    while start != -1:
        end = -1
        if text.startswith("<!--", start):
            if comments_can_close:
                close = text.find("-->", start + 4)
                comments_can_close = close != -1
                end = close + 3 if close != -1 else -1
        else:
            m = _TAG.match(text, start)
            end = m.end() if m else -1
        if end == -1:
            start = text.find("<", start + 1)
            continue
        out += [text[pos:start], " "]
        pos = end
        start = text.find("<", end)
    return "".join(out) + text[pos:]


def _collapse_whitespace(text: str) -> str:
    lines = [_SPACES.sub(" ", line).strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def dedup_text(text: str) -> str:
    """Case, punctuation and spacing folded away: texts equal here are exact duplicates. A text with no
    letters or digits (emoji, punctuation: "😀😀" and "!!!" would both fold to "") keeps its symbols."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return _PUNCT_SPACE.sub(" ", folded).strip() or " ".join(folded.split())


def dedup_key(text: str) -> bytes:
    """A 12-byte digest of dedup_text (a million keys fit in a few tens of MB)."""
    return hashlib.blake2b(dedup_text(text).encode("utf-8"), digest_size=12).digest()
