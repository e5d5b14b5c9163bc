"""Deterministic, stratified splits."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence, TypeVar

T = TypeVar("T")


def stratified_split(items: Sequence[T], keys: Sequence[str], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Split `items` into (rest, held_out): about `fraction` of all items held out (at least one when the
    fraction asks for any), each key's share as close to `fraction` as whole items allow.

    Each key gets the whole items its share holds; the items left over go to the keys with the largest
    remainders (ties broken by the seed), so many small keys share the held-out items rather than each
    taking one: 300 keys of 3 items at 0.1 hold out 90 items, not 300. A key keeps at least one item in
    `rest` (a single item is never held out). The same seed gives the same split.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    rng = random.Random(seed)
    order = sorted(groups)
    for k in order:
        rng.shuffle(groups[k])
    room = {k: len(groups[k]) - 1 for k in order}  # what each key can give and still keep one
    if fraction <= 0 or not any(room.values()):
        return list(items), []
    want = {k: fraction * len(groups[k]) for k in order}
    take = {k: min(room[k], int(want[k])) for k in order}
    target = min(sum(room.values()), max(1, round(fraction * len(items))))
    ties, taken = order[:], sum(take.values())
    rng.shuffle(ties)
    for k in sorted(ties, key=lambda k: want[k] - take[k], reverse=True):  # largest remainder first: one more
        if taken >= target:
            break
        if take[k] < room[k]:
            take[k], taken = take[k] + 1, taken + 1
    # What keys could not give (a single item stays for training) the others give, most under-served first,
    # as many as each has room for: one sort, not a pass per missing item.
    for k in sorted(ties, key=lambda k: want[k] - take[k], reverse=True):
        if taken >= target:
            break
        extra = min(room[k] - take[k], target - taken)
        take[k], taken = take[k] + extra, taken + extra
    held = {i for k in order for i in groups[k][:take[k]]}
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
