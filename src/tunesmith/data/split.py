"""Deterministic, stratified splits."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence, TypeVar

T = TypeVar("T")


def stratified_split(items: Sequence[T], keys: Sequence[str], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Split `items` into (rest, held_out) so each key keeps about `fraction` of its items held out.

    Keys with a single item stay in `rest`; every key with two or more gives at least one item
    when the fraction asks for any. The same seed gives the same split.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    rng = random.Random(seed)
    held: set[int] = set()
    for k in sorted(groups):
        idx = groups[k][:]
        rng.shuffle(idx)
        if len(idx) < 2:
            continue
        n = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        held.update(idx[:n])
    rest = [it for i, it in enumerate(items) if i not in held]
    out = [it for i, it in enumerate(items) if i in held]
    return rest, out
