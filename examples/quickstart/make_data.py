"""Rebuild the quickstart subset of BANKING77 (CC BY 4.0, see data/SOURCE.md).

Eight clearly different intents; 40 training and 20 test examples each, taken in file order
after a seeded shuffle. Run from this folder: python make_data.py ../../../shared/data/banking77
"""

import csv
import random
import sys
from pathlib import Path

INTENTS = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "age_limit", "change_pin",
           "apple_pay_or_google_pay", "terminate_account", "country_support"]
PER_INTENT = {"train": 40, "test": 20}


def subset(src: Path, split: str) -> list[dict]:
    rows = list(csv.DictReader(open(src / f"{split}.csv", encoding="utf-8", newline="")))
    random.Random(77).shuffle(rows)
    taken = {i: 0 for i in INTENTS}
    out = []
    for row in rows:
        if row["category"] in taken and taken[row["category"]] < PER_INTENT[split]:
            taken[row["category"]] += 1
            out.append(row)
    return out


def main(src: Path) -> None:
    for split in PER_INTENT:
        with open(Path(__file__).parent / "data" / f"{split}.csv", "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "category"])
            writer.writeheader()
            writer.writerows(subset(src, split))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
