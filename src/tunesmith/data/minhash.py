"""MinHash signatures and LSH banding, vectorised with numpy over many texts at once.

A text's shingles are its overlapping character n-grams (of the normalised text), so a typo or a
swapped word changes only a few of them: character shingles find near-duplicates of short texts
(chat messages, intents) that word shingles miss. Each shingle is packed into an integer straight
from the UTF-8 bytes; each of the `num_perm` hash functions is a multiply-shift hash
((a * x + b) mod 2^64) >> 32 with random odd a, and a signature slot is the minimum over the
text's shingles. Two texts agree in a slot with probability equal to their Jaccard similarity.

All texts of a chunk are concatenated into one byte buffer, so the work is a handful of numpy
operations per chunk instead of a Python loop per shingle; this is what makes a million texts fit
in minutes on two cores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_PERM_BLOCK = 16
_PAIR_BLOCK = 65_536


@dataclass(frozen=True)
class Bands:
    """LSH banding: `bands` groups of `rows` signature slots; a pair sharing one group is a candidate."""

    bands: int
    rows: int


def lsh_bands(threshold: float, num_perm: int) -> Bands:
    """Bands x rows (<= num_perm) minimising false positives plus false negatives around `threshold`.

    The probability that two texts of Jaccard s share a band is 1 - (1 - s^r)^b; the best (b, r)
    puts that S-curve's step at the threshold (the same criterion datasketch uses).
    """
    grid = np.linspace(0.0, 1.0, 201)
    best, best_err = Bands(1, num_perm), math.inf
    for b in range(1, num_perm + 1):
        r = num_perm // b
        p = 1 - (1 - grid ** r) ** b
        fp = np.trapezoid(np.where(grid < threshold, p, 0.0), grid)
        fn = np.trapezoid(np.where(grid >= threshold, 1 - p, 0.0), grid)
        if fp + fn < best_err:
            best, best_err = Bands(b, r), fp + fn
    return best


def hash_params(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


def signatures(texts: list[str], num_perm: int = 128, ngram: int = 5, seed: int = 1,
               chunk_shingles: int = 500_000) -> np.ndarray:
    """MinHash signatures (N, num_perm) uint32 of `texts` (already normalised).

    Texts shorter than `ngram` bytes count as one shingle (their whole text). Texts are encoded a chunk
    at a time, and one longer than `chunk_shingles` bytes is hashed in overlapping segments, its slots the
    minimum over them (the same signature): memory stays bounded by the chunk, whatever one row holds.
    """
    a, b = hash_params(num_perm, seed)
    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    for start, end in _chunks([len(t) for t in texts], ngram, chunk_shingles):
        pieces, owner = _segments([t.encode("utf-8") for t in texts[start:end]], ngram, chunk_shingles)
        sigs = np.concatenate([_chunk_signatures(pieces[i:j], a, b, ngram)      # (pieces, P)
                               for i, j in _chunks([len(p) for p in pieces], ngram, chunk_shingles)])
        first = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])           # each text's first piece
        out[start:end] = np.minimum.reduceat(sigs, first, axis=0)
    return out


def _chunks(lengths: list[int], ngram: int, budget: int):
    """(start, end) runs of consecutive items of about `budget` shingles each (at least one item)."""
    start = 0
    while start < len(lengths):
        end, size = start, 0
        while end < len(lengths) and (size < budget or end == start):
            size += max(1, lengths[end] - ngram + 1) + ngram  # an upper bound in bytes
            end += 1
        yield start, end
        start = end


def _segments(encoded: list[bytes], ngram: int, size: int) -> tuple[list[bytes], np.ndarray]:
    """Texts cut into pieces of at most max(size, 2 * ngram) bytes overlapping by ngram - 1 bytes, so
    every shingle lies whole in exactly one piece; `owner[i]` is the text piece i came from."""
    size = max(size, 2 * ngram)
    step = size - ngram + 1
    pieces, owner = [], []
    for i, e in enumerate(encoded):
        if len(e) <= size:
            pieces.append(e)
            owner.append(i)
            continue
        for s in range(0, len(e) - ngram + 1, step):
            pieces.append(e[s:s + size])
            owner.append(i)
    return pieces, np.asarray(owner, dtype=np.int64)


def _chunk_signatures(encoded: list[bytes], a: np.ndarray, b: np.ndarray, ngram: int) -> np.ndarray:
    # Pad each text to at least `ngram` bytes so every text has one shingle or more.
    encoded = [e + b"\0" * (ngram - len(e)) if len(e) < ngram else e for e in encoded]
    lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
    buf = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.uint64)  # (total_bytes,)
    n_shingles = lengths - ngram + 1                                           # (N,)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])                    # (N,)
    # Shingle i of text t starts at starts[t] + i.
    owner = np.repeat(np.arange(len(encoded)), n_shingles)                     # (S,)
    offsets = np.arange(n_shingles.sum()) - np.repeat(np.cumsum(n_shingles) - n_shingles, n_shingles)
    pos = starts[owner] + offsets                                              # (S,)
    x = np.zeros(len(pos), dtype=np.uint64)
    for k in range(ngram):  # pack up to 8 bytes; longer n-grams fold in with a rotate
        x = (x << np.uint64(8)) | (x >> np.uint64(56)) if k >= 8 else x << np.uint64(8)
        x ^= buf[pos + k]
    first = np.concatenate([[0], np.cumsum(n_shingles)[:-1]])
    out = np.empty((len(a), len(encoded)), dtype=np.uint32)                    # (P, N)
    # A few hash functions at a time: (16, S) blocks stay in cache, and reducing along the
    # contiguous axis is several times faster than over an (S, P) matrix.
    for k in range(0, len(a), _PERM_BLOCK):
        hashed = np.multiply(a[k:k + _PERM_BLOCK, None], x[None, :])        # (16, S), wraps mod 2^64
        hashed += b[k:k + _PERM_BLOCK, None]
        hashed >>= np.uint64(32)
        out[k:k + _PERM_BLOCK] = np.minimum.reduceat(hashed.astype(np.uint32), first, axis=1)
    return out.T                                                                # (N, P)


def band_keys(sigs: np.ndarray, bands: Bands, seed: int = 7) -> np.ndarray:
    """One 64-bit key per (text, band): (N, bands) uint64; equal keys mean equal band rows."""
    rng = np.random.default_rng(seed)
    mult = rng.integers(1, 2**63, size=bands.rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    keys = np.empty((len(sigs), bands.bands), dtype=np.uint64)
    for j in range(bands.bands):
        block = sigs[:, j * bands.rows:(j + 1) * bands.rows].astype(np.uint64)  # (N, r)
        keys[:, j] = (block * mult[None, :]).sum(axis=1) ^ np.uint64(j)
    return keys


def candidate_pairs(keys: np.ndarray) -> np.ndarray:
    """Pairs (i, j), i < j, sharing a band key; each bucket links its members to its first member."""
    pairs = []
    for j in range(keys.shape[1]):
        col = keys[:, j]
        order = np.argsort(col, kind="stable")
        sorted_keys = col[order]
        same = sorted_keys[1:] == sorted_keys[:-1]
        if not same.any():
            continue
        # Index of each run's first element, propagated along the run.
        run_start = np.where(np.concatenate([[True], ~same]), np.arange(len(col)), 0)
        run_start = np.maximum.accumulate(run_start)
        members = np.nonzero(np.concatenate([[False], same]))[0]
        pairs.append(np.stack([order[run_start[members]], order[members]], axis=1))
    if not pairs:
        return np.empty((0, 2), dtype=np.int64)
    both = np.sort(np.concatenate(pairs), axis=1)
    n = np.int64(len(keys))
    # One int64 per pair makes the de-duplication a 1-D unique (far less memory than axis=0).
    codes = np.unique(both[:, 0].astype(np.int64) * n + both[:, 1])
    return np.stack([codes // n, codes % n], axis=1)


def estimated_jaccard(sigs: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Share of equal signature slots per pair (an unbiased Jaccard estimate)."""
    out = np.empty(len(pairs))
    # In blocks: gathering both signatures of millions of pairs at once would take gigabytes.
    for start in range(0, len(pairs), _PAIR_BLOCK):
        block = pairs[start:start + _PAIR_BLOCK]
        out[start:start + len(block)] = (sigs[block[:, 0]] == sigs[block[:, 1]]).mean(axis=1)
    return out
