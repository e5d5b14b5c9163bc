"""Rebuild the drift example's live traffic from BANKING77 (CC BY 4.0, see ../quickstart/data/SOURCE.md).

Rows the quickstart never trained or tested on, in three phases of `traffic.csv`:
- `normal`: 15 messages for each of the quickstart's eight intents;
- `shifted`: 20 for each of the eight, plus 60 for each of three intents the quickstart model has
  never seen (NEW_INTENTS), shuffled: the intent mix moves toward what the model cannot answer;
- `after`: 10 for each of the eight and 20 for each new intent, sent once a challenger is promoted.
Run from this folder: python make_traffic.py ../../../shared/data/banking77
"""

import csv
import random
import sys
from pathlib import Path

HERE = Path(__file__).parent
NEW_INTENTS = ["atm_support", "top_up_by_cash_or_cheque", "get_physical_card"]
PHASES = {"normal": (15, 0), "shifted": (20, 60), "after": (10, 20)}  # (per known intent, per new intent)


def quickstart_intents_and_texts() -> tuple[list[str], set[str]]:
    texts, intents = set(), []
    for split in ("train", "test"):
        for row in csv.DictReader(open(HERE.parent / "quickstart" / "data" / f"{split}.csv", encoding="utf-8")):
            texts.add(row["text"])
            if row["category"] not in intents:
                intents.append(row["category"])
    return intents, texts


def main(src: Path) -> None:
    known, used = quickstart_intents_and_texts()
    rows = list(csv.DictReader(open(src / "train.csv", encoding="utf-8", newline="")))
    random.Random(2026).shuffle(rows)
    pool: dict[str, list[dict]] = {}
    for row in rows:
        if row["text"] not in used:  # and each text once (BANKING77 repeats a few)
            used.add(row["text"])
            pool.setdefault(row["category"], []).append(row)
    out = []
    for phase, (per_known, per_new) in PHASES.items():
        taken = []
        for intent in known + NEW_INTENTS:
            n = per_known if intent in known else per_new
            taken += [{"text": r["text"], "category": intent, "phase": phase} for r in pool[intent][:n]]
            pool[intent] = pool[intent][n:]
        random.Random(phase).shuffle(taken)
        out += taken
    with open(HERE / "traffic.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "category", "phase"])
        writer.writeheader()
        writer.writerows(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
