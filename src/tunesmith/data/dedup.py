"""Exact, near and semantic duplicates. Each finder returns which rows duplicate an earlier row;
the earliest row of every duplicate cluster is the one kept."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tunesmith.data import minhash
from tunesmith.data.normalize import dedup_key, dedup_text


@dataclass(frozen=True)
class Duplicate:
    """Row `index` duplicates row `of` (which is kept); similarity is 1.0 for exact duplicates."""

    index: int
    of: int
    kind: str
    similarity: float


def exact_duplicates(texts: list[str]) -> list[Duplicate]:
    """Rows equal to an earlier row once case, punctuation and spacing are folded away."""
    first: dict[bytes, int] = {}
    found = []
    for i, text in enumerate(texts):
        key = dedup_key(text)
        j = first.setdefault(key, i)
        if j != i:
            found.append(Duplicate(i, j, "exact_duplicate", 1.0))
    return found


def auto_ngram(texts: list[str]) -> int:
    """Character shingle size: 3 for short texts (a typo must not break most shingles), else 5."""
    lengths = sorted(len(t) for t in texts[:10_000])
    return 3 if not lengths or lengths[len(lengths) // 2] < 100 else 5


def near_duplicates(texts: list[str], threshold: float = 0.7, num_perm: int = 128, ngram: int | str = "auto",
                    skip: set[int] | None = None, seed: int = 1) -> list[Duplicate]:
    """Rows whose estimated character-shingle Jaccard with an earlier row reaches `threshold`.

    Candidates come from MinHash LSH; each is confirmed on its signature estimate. Rows in `skip`
    (already removed, e.g. exact duplicates) take no part.
    """
    skip = skip or set()
    keep = [i for i in range(len(texts)) if i not in skip]
    folded = [dedup_text(texts[i]) for i in keep]
    n = auto_ngram(folded) if ngram == "auto" else int(ngram)
    sigs = minhash.signatures(folded, num_perm=num_perm, ngram=n, seed=seed)
    pairs = minhash.candidate_pairs(minhash.band_keys(sigs, minhash.lsh_bands(threshold, num_perm)))
    sims = minhash.estimated_jaccard(sigs, pairs)
    ok = sims >= threshold
    links = [(keep[a], keep[b], float(s)) for (a, b), s in zip(pairs[ok], sims[ok])]
    return _clusters(links, "near_duplicate")


def semantic_duplicates(embeddings: np.ndarray, threshold: float = 0.95, rows: list[int] | None = None,
                        block: int = 2048) -> list[Duplicate]:
    """Rows whose embedding cosine with an earlier row reaches `threshold` (unit-length embeddings).

    `rows` maps embedding rows back to dataset rows (default: the identity).
    """
    rows = rows if rows is not None else list(range(len(embeddings)))
    links = []
    for start in range(0, len(embeddings), block):
        sims = embeddings[start:start + block] @ embeddings.T           # (b, N)
        a, b = np.nonzero(sims >= threshold)
        for i, j in zip(a + start, b):
            if j < i:
                links.append((rows[int(j)], rows[int(i)], float(sims[i - start, j])))
    return _clusters(links, "semantic_duplicate")


def _clusters(links: list[tuple[int, int, float]], kind: str) -> list[Duplicate]:
    """Union-find over linked pairs; every cluster member but the earliest becomes a Duplicate of it."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    best: dict[int, float] = {}
    for a, b, sim in links:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
        best[b] = max(best.get(b, 0.0), sim)
        best[a] = max(best.get(a, 0.0), sim)
    out = [Duplicate(x, root(x), kind, round(best[x], 4)) for x in sorted(parent) if root(x) != x]
    return out
