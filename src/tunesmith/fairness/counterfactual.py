"""Counterfactual probe: swap the identity term of a test input for other terms of its category
and count how often the prediction changes (a model that ignores identity flips never)."""

from __future__ import annotations

import random

from tunesmith.data.examples import Example
from tunesmith.data.lexicon import find_term, swap, terms


def counterfactual_pairs(examples: list[Example], categories: list[str], limit: int, per_example: int = 3,
                         seed: int = 0) -> list[tuple[int, str, str, Example]]:
    """(example index, category, new term, swapped example) for up to `limit` examples with a term."""
    rng = random.Random(seed)
    pairs: list[tuple[int, str, str, Example]] = []
    used = 0  # examples swapped so far; checked before each one, so limit 0 swaps none
    for i, ex in enumerate(examples):
        if used >= limit:
            break
        for category in categories:
            term = find_term(ex.input, category)
            if term is None:
                continue
            others = [t for t in terms()[category] if t != term]
            for new in rng.sample(others, min(per_example, len(others))):
                pairs.append((i, category, new, Example(swap(ex.input, category, new), ex.target, ex.source)))
            used += 1
            break
    return pairs


def flip_rate(examples: list[Example], original: list[str], pairs: list[tuple[int, str, str, Example]],
              swapped: list[str]) -> dict:
    """Share of swaps that change the prediction, overall and per category, with the worst swaps."""
    flips = [original[i] != s for (i, _, _, _), s in zip(pairs, swapped)]
    by_cat: dict[str, list[bool]] = {}
    for (_, cat, _, _), f in zip(pairs, flips):
        by_cat.setdefault(cat, []).append(f)
    shown = [{"original": examples[i].input, "swapped": ex.input, "category": cat, "new_term": new,
                 "prediction": original[i], "swapped_prediction": s}
                for (i, cat, new, ex), s, f in zip(pairs, swapped, flips) if f][:20]
    return {"swaps": len(flips), "flip_rate": round(sum(flips) / len(flips), 6) if flips else None,
            "by_category": {c: round(sum(v) / len(v), 6) for c, v in sorted(by_cat.items())},
            "flipped_examples": shown}
