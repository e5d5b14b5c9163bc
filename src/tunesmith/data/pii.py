"""Personal data in text: emails, phone numbers, card numbers (Luhn-checked), IBANs (mod-97
checked) and IP addresses, found by pattern and validated where a checksum exists, so a long
order number is not taken for a card; and, when asked for (`person`), person names.

No named-entity model is available offline, so names are found with the 1990 U.S. Census name
lists (data/names, public domain): a known first name followed by a known surname ("Amy Jones"),
a title or "my name is" and a capitalised word ("Dr. Okafor", "my name is Siobhan"), or a known
first name after "this is" / "I am". A capitalised word alone is never enough, which keeps
sentence starts and product names ("Will you", "Apple Pay") out.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
import re
from collections import Counter
from dataclasses import dataclass
from importlib import resources

# Every pattern runs in time linear in the text (this scans request bodies and training data): each
# repetition is bounded (an e-mail local part has at most 64 characters, a domain at most 253) and
# possessive (`++`, `{m,n}+`) wherever giving characters back could never lead to a match, so no
# start position costs more than a bounded number of steps. On ordinary text they find exactly what
# the unbounded patterns did.
_PATTERNS = {
    "email": re.compile(r"\b[A-Za-z0-9._%+-]{1,64}+@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}\b"),
    "iban": re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"),
    "card": re.compile(r"\b(?:\d[ -]?){12,18}\d\b"),
    # IP addresses, scanned one form after another (a failed IPv6 candidate must not hide an IPv4 inside it:
    # `12:30:10.0.0.1`). IPv6 in every written form (`::`-compressed, an IPv4 tail, a zone: fe80::1%eth0) as a
    # run of hex groups and colons that ipaddress then validates, not starting inside a word, a number or a
    # subscript (`xs[::2]`, `std::vector`); the full 8-group form also after a label (`IPv6:2001:...`).
    # Each group ends at its colon, so a failed start costs at most the 8 groups' 40 characters.
    "ip": (re.compile(r"(?<![\w.])(?<![\w\])]\[)(?:[0-9A-Fa-f]{0,4}+:){2,8}+"
                      r"(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{0,4}+)(?:%[0-9A-Za-z_.-]{0,31}[0-9A-Za-z_-])?(?![\w:])"),
           re.compile(r"\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b"),
           re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")),
    "phone": re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?!\w)"
                        r"|(?<![\w+])\+\d{9,14}(?!\w)|(?<![\w+])0\d{9,10}(?!\w)"),
}
# Checked in this order so a card number is not also reported as a phone number.
ORDER = ("email", "iban", "card", "ip", "phone", "person")
_QUICK = re.compile(r"[@\d]")
_WORD = r"[A-Z][a-z]++(?:[-'][A-Z][a-z]++)?"
_FULL_NAME = re.compile(rf"\b({_WORD})\s++({_WORD})\b")
# Strong cues: any capitalised word after them is taken for a name.
_TITLED = re.compile(rf"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof)\.?\s++({_WORD}(?:\s++{_WORD})?)\b|"
                     rf"\b[Mm]y name is\s++({_WORD}(?:\s++{_WORD})?)\b")
# Weak cues ("this is Visa", "I'm Canadian"): the word must be a known first name.
_INTRODUCED = re.compile(rf"\b(?:[Tt]his is|I am|I'm)\s++({_WORD}(?:\s++{_WORD})?)\b")


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int


def find_pii(text: str, kinds: tuple[str, ...] | list[str] = ORDER[:-1]) -> list[Finding]:
    """Non-overlapping findings in `text`, by position (`person` only when in `kinds`)."""
    found: list[Finding] = []
    taken = _Spans()
    if "person" in kinds:
        for span in person_spans(text):
            found.append(Finding("person", *span))
        taken.add([(f.start, f.end) for f in found])
    if not _QUICK.search(text):  # every other kind needs a digit or an @: most texts stop here
        return sorted(found, key=lambda f: f.start)
    for kind in ORDER[:-1]:
        if kind not in kinds:
            continue
        for pattern in _PATTERNS[kind] if isinstance(_PATTERNS[kind], tuple) else (_PATTERNS[kind],):
            new = [m.span() for m in pattern.finditer(text)
                   if not taken.overlaps(*m.span()) and _VALID[kind](m.group())]
            found += [Finding(kind, *span) for span in new]
            taken.add(new)
    return sorted(found, key=lambda f: f.start)


class _Spans:
    """Non-overlapping (start, end) spans, sorted, so an overlap test is a binary search rather than
    a scan of every earlier finding (which made texts with thousands of findings quadratic)."""

    def __init__(self):
        self.starts: list[int] = []
        self.ends: list[int] = []

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_left(self.starts, end) - 1  # the last span starting before `end`
        return i >= 0 and self.ends[i] > start

    def add(self, spans: list[tuple[int, int]]) -> None:
        merged = sorted(zip(self.starts, self.ends)) + spans
        merged.sort()
        self.starts, self.ends = [s for s, _ in merged], [e for _, e in merged]


def person_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of person names (see the module docstring for the rules)."""
    first, last = _name_lists()
    spans = [m.span(1 if m.group(1) else 2) for m in _TITLED.finditer(text)]
    spans += [m.span(1) for m in _INTRODUCED.finditer(text) if m.group(1).split()[0] in first]
    spans += [m.span() for m in _FULL_NAME.finditer(text) if m.group(1) in first and m.group(2) in last]
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


# Census first names that are also everyday English words at the start of a phrase ("My Bank",
# "So Long", "May Day"); a title or "my name is" still finds people who carry them.
_COMMON_WORDS = {"An", "In", "My", "Ok", "So", "Un", "Ha", "Pa", "Ma", "Else", "See", "Sun", "Love", "Major", "King",
                 "Summer", "Delta", "Sterling", "Royal", "Page", "Young", "Long", "May", "Hope", "Joy", "Grant"}


@functools.lru_cache(maxsize=1)
def _name_lists() -> tuple[frozenset[str], frozenset[str]]:
    folder = resources.files("tunesmith.data") / "names"
    first, last = ((folder / f).read_text(encoding="utf-8").split() for f in ("first.txt", "last.txt"))
    return frozenset(first) - _COMMON_WORDS, frozenset(last)


def redact(text: str, findings: list[Finding]) -> str:
    """Each finding (non-overlapping, as find_pii gives them) replaced by a placeholder such as [EMAIL].
    Built in one pass: rebuilding the text once per finding was quadratic (13.6 s for 1M characters
    of e-mail addresses)."""
    pieces, at = [], 0
    for f in sorted(findings, key=lambda f: f.start):
        pieces += [text[at:f.start], f"[{f.kind.upper()}]"]
        at = f.end
    pieces.append(text[at:])
    return "".join(pieces)


def count_kinds(findings: list[Finding]) -> Counter:
    return Counter(f.kind for f in findings)


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies."""
    nums = [int(c) for c in digits if c.isdigit()]
    if not 13 <= len(nums) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(nums)):
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    """ISO 13616 mod-97 check."""
    s = text.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    number = "".join(str(int(c, 36)) for c in moved)
    return int(number) % 97 == 1


def _ip_ok(text: str) -> bool:
    # An IPv6 address without a digit is valid (`a::b`, `dead::beef`) but in text it is far more often code
    # (a C++ scope, `x :: Int`) than an address: only one with a digit counts.
    if ":" in text and not any(c.isdigit() for c in text.split("%")[0]):
        return False
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _phone_ok(text: str) -> bool:
    digits = sum(c.isdigit() for c in text)
    # Dates (2024-01-15) and times are digit groups too: require phone-like length and no date shape.
    return (7 <= digits <= 15
            and not re.fullmatch(r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}", text))


_VALID = {"email": lambda t: True, "iban": iban_ok, "card": luhn_ok, "ip": _ip_ok, "phone": _phone_ok}
