"""Identity-term lexicon (data/lexicon.json): find terms in text, swap them for counterfactuals."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

CATEGORIES = ("gender", "race_ethnicity", "religion", "age", "disability", "nationality", "sexual_orientation")


@lru_cache(maxsize=1)
def terms() -> dict[str, list[str]]:
    data = json.loads((Path(__file__).parent / "lexicon.json").read_text(encoding="utf-8"))
    return {c: data[c] for c in CATEGORIES}


@lru_cache(maxsize=None)
def _pattern(category: str) -> re.Pattern:
    words = sorted(terms()[category], key=len, reverse=True)  # "african american" before "african"
    return re.compile(r"(?<![\w-])(" + "|".join(re.escape(w) for w in words) + r")(?![\w-])", re.IGNORECASE)


def find_term(text: str, category: str) -> str | None:
    """The first identity term of `category` in `text` (lower case), or None."""
    m = _pattern(category).search(text)
    return m.group(1).lower() if m else None


def swap(text: str, category: str, new_term: str) -> str:
    """`text` with every term of `category` replaced by `new_term` (capitalised where the original was)."""
    def repl(m: re.Match) -> str:
        return new_term[:1].upper() + new_term[1:] if m.group(1)[:1].isupper() else new_term
    return _pattern(category).sub(repl, text)
