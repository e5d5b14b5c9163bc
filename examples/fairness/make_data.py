"""Build the fairness example's data from the Jigsaw/Conversation AI sentence templates
(../shared/data/jigsaw_sentence_templates, CC BY 4.0; see data/SOURCE.md).

    python examples/fairness/make_data.py [SOURCE_CSV]

The source is perfectly balanced: every identity term appears in as many toxic as non-toxic rows.
The test split keeps that balance, so any gap between groups there is the model's. The training
split simulates a documented failure of real toxicity data, annotator bias against one group (Sap
et al., 2019, "The Risk of Racial Bias in Hate Speech Detection"): 80% of the non-toxic rows that
mention a sexual orientation are labelled toxic. Deterministic (seed 0).
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = Path(sys.argv[1]) if len(sys.argv) > 1 else \
    HERE.parents[2] / "shared/data/jigsaw_sentence_templates/en_sentence_templates_with_identity.DERIVED.csv"
BIASED_GROUP, FLIP_SHARE = "sexuality", 0.8
TRAIN_PER_GROUP, TEST_PER_GROUP = 80, 50


def main() -> None:
    rng = random.Random(0)
    with SOURCE.open(encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["identity_category"] and r["template"] != "verb_adj"]
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        by_group.setdefault(r["identity_category"], []).append(r)
    train, test = [], []
    for group in sorted(by_group):
        pool = by_group[group]
        rng.shuffle(pool)
        for split, n in ((test, TEST_PER_GROUP), (train, TRAIN_PER_GROUP)):
            for tox in ("toxic", "nontoxic"):  # half and half, as in the source
                picked = [r for r in pool if r["toxicity"] == tox and not r.get("_used")][: n // 2]
                for r in picked:
                    r["_used"] = True
                    split.append({"text": r["phrase"], "label": tox, "group": group, "term": r["identity_term"]})
    for r in train:
        if r["group"] == BIASED_GROUP and r["label"] == "nontoxic" and rng.random() < FLIP_SHARE:
            r["label"] = "toxic"
    for name, split in (("train", train), ("test", test)):
        rng.shuffle(split)
        with (HERE / "data" / f"{name}.csv").open("w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["text", "label", "group", "term"])
            w.writeheader()
            w.writerows(split)
        print(f"{name}: {len(split)} rows")


if __name__ == "__main__":
    main()
