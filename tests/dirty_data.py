"""Known problems injected into real data, to measure what `tunesmith data clean` finds.

Injected rows are appended after the originals (so the original is the copy that is kept), PII
and flipped labels are written into original rows in place. `truth` maps each problem kind to the
indices of the rows that carry it.
"""

from __future__ import annotations

import csv
import random
import re
from pathlib import Path

BANKING77 = Path(__file__).parent / "data" / "banking77"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, rows: list[dict]) -> list[int]:
    """Write the rows; returns each row's first physical line (texts may hold line breaks)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "category"])
        writer.writeheader()
        writer.writerows(rows)
    starts, line = [], 2
    for r in rows:
        starts.append(line)
        line += 1 + len(re.findall(r"\r\n|\r|\n", r["text"]))
    return starts


def luhn_card(rng: random.Random) -> str:
    digits = [4] + [rng.randrange(10) for _ in range(14)]
    total = 0
    for i, d in enumerate(reversed(digits)):
        total += (d * 2 - 9 if d > 4 else d * 2) if i % 2 == 0 else d
    digits.append((10 - total % 10) % 10)
    s = "".join(map(str, digits))
    return " ".join(s[i:i + 4] for i in range(0, 16, 4))


def iban(rng: random.Random) -> str:
    bban = "".join(str(rng.randrange(10)) for _ in range(18))
    check = 98 - int("".join(str(int(c, 36)) for c in bban + "DE00")) % 97
    return f"DE{check:02d}{bban}"


PII_MAKERS = [
    ("email", lambda rng: f"my email is {rng.choice(['anna', 'li.wei', 'j_smith'])}{rng.randrange(99)}@example.org"),
    ("phone", lambda rng: f"call me on +44 20 {rng.randrange(1000, 9999)} {rng.randrange(1000, 9999)}"),
    ("card", lambda rng: f"my card number is {luhn_card(rng)}"),
    ("iban", lambda rng: f"my IBAN is {iban(rng)}"),
    ("ip", lambda rng: f"I was on 10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"),
]


def _typo(text: str, rng: random.Random) -> str:
    i = rng.randrange(1, max(2, len(text) - 1))
    return text[:i] + text[i + 1:] if rng.random() < 0.5 else text[:i] + text[i:i + 2][::-1] + text[i + 2:]


def _near(text: str, rng: random.Random) -> str:
    return _typo(text, rng) if rng.random() < 0.5 else f"{text} {rng.choice(['please', 'thanks', 'asap'])}"


def _exact(text: str, rng: random.Random) -> str:
    """Same text up to case, punctuation and spacing."""
    variant = rng.choice([text.upper(), text.lower(), f"  {text}  ", text.rstrip("?.!") + "!!"])
    return variant.replace(" ", "  ", 1)


def make_dirty(train: list[dict], test: list[dict], n: int = 50,
               seed: int = 0) -> tuple[list[dict], dict[str, set[int]]]:
    """Train rows with n of each problem injected; returns (rows, truth: row indices by kind)."""
    rng = random.Random(seed)
    rows = [dict(r) for r in train]
    labels = sorted({r["category"] for r in rows})
    picks = rng.sample(range(len(rows)), 2 * n)
    truth: dict[str, set[int]] = {"pii": set(), "flipped": set(), "exact": set(), "near": set(), "test_copy": set()}
    for k, i in enumerate(picks[:n]):  # PII written into original rows
        kind, make = PII_MAKERS[k % len(PII_MAKERS)]
        rows[i]["text"] = f"{rows[i]['text']} {make(rng)}"
        truth["pii"].add(i)
    for i in picks[n:]:  # flipped labels
        rows[i]["category"] = rng.choice([lab for lab in labels if lab != rows[i]["category"]])
        truth["flipped"].add(i)
    untouched = [i for i in range(len(train)) if i not in set(picks)]
    for kind, make in (("exact", _exact), ("near", _near)):
        for i in rng.sample(untouched, n):
            rows.append({"text": make(train[i]["text"], rng), "category": train[i]["category"]})
            truth[kind].add(len(rows) - 1)
    for r in rng.sample(test, n):
        rows.append(dict(r))
        truth["test_copy"].add(len(rows) - 1)
    return rows, truth


def stratified_head(rows: list[dict], per_label: int) -> list[dict]:
    """The first `per_label` rows of each label, in file order."""
    seen: dict[str, int] = {}
    out = []
    for r in rows:
        if seen.get(r["category"], 0) < per_label:
            seen[r["category"]] = seen.get(r["category"], 0) + 1
            out.append(r)
    return out
