"""The data report: sizes, labels, lengths, diversity and group representation per split."""

from __future__ import annotations

from collections import Counter

import numpy as np

from tunesmith.data.examples import Example

LENGTH_BINS = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def split_profile(rows: list[Example], with_labels: bool) -> dict:
    """Size, length figures and histogram, label and group counts, lexical diversity of one split."""
    lengths = sorted(len(e.input) for e in rows)
    entry: dict = {"rows": len(rows), "augmented_rows": sum(e.augmented is not None for e in rows),
                   "chars_median": lengths[len(lengths) // 2] if lengths else 0,
                   "chars_max": lengths[-1] if lengths else 0,
                   "chars_histogram": length_histogram(lengths), **lexical_diversity([e.input for e in rows])}
    if with_labels:
        entry["label_counts"] = dict(sorted(Counter(e.target for e in rows).items()))
    groups = Counter(e.group for e in rows if e.group is not None)
    if groups:
        entry["group_counts"] = dict(sorted(groups.items()))
        if with_labels:
            entry["group_label_counts"] = {g: dict(sorted(Counter(e.target for e in rows if e.group == g).items()))
                                           for g in sorted(groups)}
    return entry


def length_histogram(lengths: list[int]) -> dict[str, int]:
    """Counts of texts per character-length bin, e.g. {"32-63": 120}; empty bins are left out."""
    which = np.searchsorted(LENGTH_BINS, lengths, side="right") - 1
    counts = np.bincount(which, minlength=len(LENGTH_BINS)) if len(lengths) else np.zeros(len(LENGTH_BINS), int)
    names = [f"{lo}-{hi - 1}" for lo, hi in zip(LENGTH_BINS, LENGTH_BINS[1:])] + [f"{LENGTH_BINS[-1]}+"]
    return {name: int(c) for name, c in zip(names, counts) if c}


def lexical_diversity(texts: list[str]) -> dict[str, float]:
    """distinct-1 and distinct-2: distinct word unigrams / bigrams over all of them.

    Streams over the texts (only the distinct n-grams are held, as hashes), so a million rows
    do not become tens of millions of word objects at once.
    """
    uni, bi = set(), set()
    n_uni = n_bi = 0
    for text in texts:
        words = text.lower().split()
        uni.update(map(hash, words))
        bi.update(hash(pair) for pair in zip(words, words[1:]))
        n_uni += len(words)
        n_bi += max(0, len(words) - 1)
    return {"distinct_1": round(len(uni) / n_uni, 4) if n_uni else 0.0,
            "distinct_2": round(len(bi) / n_bi, 4) if n_bi else 0.0}


def embedding_spread(vectors: np.ndarray) -> float:
    """Mean cosine distance of the texts' embeddings from their centroid (0: all alike)."""
    if len(vectors) == 0:
        return 0.0
    centroid = vectors.mean(axis=0)
    centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
    return round(float(1.0 - (vectors @ centroid).mean()), 4)
