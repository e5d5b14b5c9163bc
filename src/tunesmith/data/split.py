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


def group_split(items: Sequence[T], groups: Sequence[str], keys: Sequence[str], fraction: float,
                seed: int) -> tuple[list[T], list[T]]:
    """Split so that no group spans both parts, holding out about `fraction` of the items.

    Groups are shuffled with the seed, then taken greedily into the held-out part, preferring
    groups whose keys (labels) are still under-represented there, until it holds `fraction` of
    the items. At least one group stays on each side when there are two or more.
    """
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    names = sorted(members)
    random.Random(seed).shuffle(names)
    target = fraction * len(items)
    want = {k: fraction * n for k, n in _counts(keys).items()}
    held: set[int] = set()
    have: dict[str, float] = defaultdict(float)
    for name in names:
        if len(held) >= target or len(held) + len(members[name]) >= len(items):
            break
        idx = members[name]
        # Skip a group only when every one of its labels is already at its held-out share.
        if held and all(have[keys[i]] >= want[keys[i]] for i in idx):
            continue
        held.update(idx)
        for i in idx:
            have[keys[i]] += 1
    rest = [it for i, it in enumerate(items) if i not in held]
    out = [it for i, it in enumerate(items) if i in held]
    return rest, out


def _counts(keys: Sequence[str]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for k in keys:
        counts[k] += 1
    return counts
