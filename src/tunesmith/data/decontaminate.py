"""Train/test decontamination: training rows that overlap held-out rows by word n-grams.

A training row is contaminated when at least `min_overlap` of its word n-grams also occur in a
validation or test row; a text shorter than n words counts as one n-gram of itself, so short
copies are caught too. Matching runs on the case- and punctuation-folded text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from tunesmith.data.normalize import dedup_text


@dataclass(frozen=True)
class Contamination:
    index: int          # the training row
    overlap: float      # share of its n-grams found in held-out rows
    held_out: int       # one held-out row it overlaps (index into the held-out list)


def _grams(text: str, n: int) -> list[int]:
    words = dedup_text(text).split()
    if len(words) <= n:
        spans = [" ".join(words)]
    else:
        spans = [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
    # 8-byte digests keep the held-out index small for large test sets.
    return [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") for s in spans]


def contaminated(train: list[str], held_out: list[str], ngram: int = 8,
                 min_overlap: float = 0.5) -> list[Contamination]:
    """Training rows overlapping the held-out texts; indices refer to `train`."""
    index: dict[int, int] = {}
    for j, text in enumerate(held_out):
        for g in _grams(text, ngram):
            index.setdefault(g, j)
    found = []
    for i, text in enumerate(train):
        grams = _grams(text, ngram)
        hits = [index[g] for g in grams if g in index]
        share = len(hits) / len(grams) if grams else 0.0
        if hits and share >= min_overlap:
            found.append(Contamination(i, round(share, 4), hits[0]))
    return found
