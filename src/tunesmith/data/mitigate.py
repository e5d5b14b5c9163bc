"""Training-time fairness mitigations: reweighting (Kamiran & Calders) and counterfactual data
augmentation. They transform training rows, so they live in the data layer and every caller of
`prepare_data` gets them (fairness/ audits the model and post-processes its thresholds)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

from tunesmith.config import FairnessConfig
from tunesmith.data.examples import Example
from tunesmith.data.groups import attributes
from tunesmith.data.lexicon import CATEGORIES, find_term, swap, terms


def reweighing(groups: list[str], labels: list[str]) -> list[float]:
    """Weight P(group) * P(label) / P(group, label) per row, so that in the weighted data group and
    label are independent; normalised to mean 1 so the loss keeps its scale."""
    n = len(groups)
    pg, py, pgy = Counter(groups), Counter(labels), Counter(zip(groups, labels))
    raw = [(pg[g] / n) * (py[y] / n) / (pgy[(g, y)] / n) for g, y in zip(groups, labels)]
    mean = sum(raw) / max(n, 1)
    return [w / mean for w in raw]


def counterfactual_augment(train: list[Example], categories: list[str] | None = None, seed: int = 0) -> list[Example]:
    """One copy of each training row that holds an identity term, with the term swapped for another
    of its category, same label (marked augmented="counterfactual")."""
    rng = random.Random(seed)
    extra = []
    for ex in train:
        for category in categories or CATEGORIES:
            term = find_term(ex.input, category)
            if term is None:
                continue
            new = rng.choice([t for t in terms()[category] if t != term])
            extra.append(replace(ex, input=swap(ex.input, category, new), augmented="counterfactual",
                                 source=f"{ex.source} (counterfactual: {term} -> {new})"))
            break
    return extra


def apply_mitigation(train: list[Example], fairness: FairnessConfig) -> list[Example]:
    """The training rows after the configured mitigation (fairness.mitigation)."""
    if fairness.mitigation == "augment":
        return train + counterfactual_augment(train, list(fairness.lexicon) or None)
    if fairness.mitigation == "reweight":
        attr, groups = next(iter(attributes(train, fairness.group_fields, fairness.lexicon).items()))
        weights = reweighing(groups, [e.target for e in train])
        return [replace(e, weight=round(w, 6)) for e, w in zip(train, weights)]
    return train
