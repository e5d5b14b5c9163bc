"""Exact, near and semantic duplicates. Each finder returns which rows duplicate an earlier row that
is kept; rows are taken in file order, so the first of a group of similar rows is the one kept."""

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
    """Rows whose character-shingle Jaccard similarity with an earlier kept row reaches `threshold`.

    Candidates come from MinHash LSH; candidates whose signature estimate is within a few standard
    errors of the threshold are confirmed on their exact Jaccard similarity, so the estimate's noise
    (about 0.04 at 128 permutations) neither joins nor separates rows. Rows in `skip` (already
    removed, e.g. exact duplicates) take no part.
    """
    skip = skip or set()
    keep = [i for i in range(len(texts)) if i not in skip]
    folded = [dedup_text(texts[i]) for i in keep]
    n = auto_ngram(folded) if ngram == "auto" else int(ngram)
    sigs = minhash.signatures(folded, num_perm=num_perm, ngram=n, seed=seed)
    pairs = minhash.candidate_pairs(minhash.band_keys(sigs, minhash.lsh_bands(threshold, num_perm)))
    estimates = minhash.estimated_jaccard(sigs, pairs)
    pairs = pairs[estimates >= threshold - ESTIMATE_MARGIN]
    sims = np.array([shingle_jaccard(folded[a], folded[b], n) for a, b in pairs])
    ok = sims >= threshold
    links = [(keep[a], keep[b], float(s)) for (a, b), s in zip(pairs[ok], sims[ok])]
    return assign_duplicates(links, "near_duplicate")


# How far below the threshold a MinHash estimate may fall and still be checked exactly: 0.15 is more
# than three standard errors of a 128-permutation estimate near 0.7 (sqrt(0.7 * 0.3 / 128) = 0.04).
ESTIMATE_MARGIN = 0.15


def shingle_jaccard(a: str, b: str, ngram: int) -> float:
    """Exact Jaccard similarity of two texts' character n-gram sets (UTF-8 bytes, as MinHash hashes them)."""
    sa, sb = _shingles(a, ngram), _shingles(b, ngram)
    return len(sa & sb) / len(sa | sb)


def _shingles(text: str, ngram: int) -> set[bytes]:
    e = text.encode("utf-8")
    e = e + b"\0" * (ngram - len(e)) if len(e) < ngram else e
    return {e[i:i + ngram] for i in range(len(e) - ngram + 1)}


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
    return assign_duplicates(links, "semantic_duplicate")


def assign_duplicates(links: list[tuple[int, int, float]], kind: str) -> list[Duplicate]:
    """Each row linked to an earlier row that is kept becomes a Duplicate of the most similar such row.

    Rows are taken in order, so a row's earlier neighbours are settled before it. Only direct links
    count: A ~ B and B ~ C do not make C a duplicate of A (single-linkage chaining would remove rows
    far below the threshold from every row that is kept), and a row whose only similar rows were
    themselves removed is kept, so every removed row has a kept row within the threshold.
    """
    earlier: dict[int, list[tuple[int, float]]] = {}
    for a, b, sim in links:
        first, later = min(a, b), max(a, b)
        earlier.setdefault(later, []).append((first, sim))
    removed: set[int] = set()
    out = []
    for row in sorted(earlier):
        kept = [(sim, -j) for j, sim in earlier[row] if j not in removed]
        if kept:
            sim, j = max(kept)  # the most similar kept row; the earliest on a tie
            removed.add(row)
            out.append(Duplicate(row, -j, kind, round(sim, 4)))
    return out
