"""`tunesmith data clean` on BANKING77 with injected problems finds each kind (acceptance test)."""

from __future__ import annotations

import json
import subprocess
import sys

from dirty_data import BANKING77, make_dirty, read_csv, stratified_head, write_csv

CONFIG = """name: dirty-banking
model: smollm2-135m-instruct
task:
  type: classification
  text_field: text
  label_field: category
data:
  train: train.csv
  test: test.csv
  validation: 0.1
  clean:
    label_noise: {action: report}
"""


def _removed_lines(out, reasons: set[str]) -> set[int]:
    rows = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    return {r["line"] for r in rows if r["reason"] in reasons and r["file"].endswith("train.csv")}


def test_clean_finds_injected_problems(tmp_path):
    train = stratified_head(read_csv(BANKING77 / "train.csv"), 30)   # 2,310 rows, 77 intents
    test = stratified_head(read_csv(BANKING77 / "test.csv"), 8)      # 616 rows
    rows, truth = make_dirty(train, test, n=50, seed=0)
    lines = write_csv(tmp_path / "train.csv", rows)
    truth = {kind: {lines[i] for i in rows_of} for kind, rows_of in truth.items()}
    write_csv(tmp_path / "test.csv", test)
    (tmp_path / "project.yaml").write_text(CONFIG, encoding="utf-8")
    out = tmp_path / "clean"
    done = subprocess.run([sys.executable, "-m", "tunesmith", "data", "clean", str(tmp_path / "project.yaml"),
                           "--out", str(out), "-q"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    print(done.stdout)

    exact = _removed_lines(out, {"exact_duplicate"})
    near = _removed_lines(out, {"near_duplicate", "exact_duplicate"})
    decontaminated = _removed_lines(out, {"test_overlap", "exact_duplicate", "near_duplicate"})
    changes = [json.loads(line) for line in (out / "changes.jsonl").read_text().splitlines()]
    pii = {c["line"] for c in changes if any(k.startswith("pii:") for k in c["changes"])}
    suspects = [json.loads(line) for line in (out / "suspects.jsonl").read_text().splitlines()]
    top = {s["line"] for s in suspects[: 2 * len(truth["flipped"])]}
    recall = {"exact": len(truth["exact"] & exact) / len(truth["exact"]),
              "near": len(truth["near"] & near) / len(truth["near"]),
              "pii": len(truth["pii"] & pii) / len(truth["pii"]),
              "decontamination": len(truth["test_copy"] & decontaminated) / len(truth["test_copy"]),
              "flipped_in_top_suspects": len(truth["flipped"] & top) / len(truth["flipped"])}
    print("recall:", json.dumps(recall))
    assert recall["exact"] >= 0.9 and recall["near"] >= 0.9
    assert recall["pii"] >= 0.9 and recall["decontamination"] >= 0.9
    # Flipped labels rank among the top suspects (the top 2 x the number flipped).
    assert recall["flipped_in_top_suspects"] >= 0.7

    report = json.loads((out / "report.json").read_text())
    counted = report["curation"]["removed_by_reason"]
    assert counted["exact_duplicate"] >= 45 and counted["test_overlap"] >= 1 and counted["near_duplicate"] >= 45
    assert sum(report["curation"]["pii_found"].values()) >= 45
    assert set(report["curation"]["pii_found"]) == {"email", "phone", "card", "iban", "ip"}
    assert report["curation"]["suspected_label_errors"] >= 0.7 * len(truth["flipped"])
