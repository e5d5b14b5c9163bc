"""Does cleaning pay? The quickstart project trained on a dirty copy of its data (duplicates,
near-duplicates, PII, flipped labels, test rows copied into train) with cleaning off, and on the
same dirty data with cleaning on, both evaluated on the same test file. Prints both test accuracies.

`--label-noise` picks what cleaning does with suspected label errors (remove, relabel or report);
`--equal-steps` trains the cleaned set for as many optimizer steps as the dirty run took, which
separates the effect of cleaner rows from the effect of fewer rows at a fixed number of epochs;
`--keep-duplicates` cleans without deduplication, to measure what removing repeats costs;
`--exact-dedup-only` keeps exact deduplication and drops near deduplication.

    python benchmarks/clean_vs_dirty.py [--per-kind 20] [--seeds 1] [--label-noise relabel] [--equal-steps]
                                       [--keep-duplicates | --exact-dedup-only]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from dirty_data import make_dirty, read_csv, write_csv  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))
from tunesmith.data.normalize import dedup_text  # noqa: E402

QUICKSTART = ROOT / "examples" / "quickstart"


DEDUP = {"both": "", "exact": "    near_dedup: {enabled: false}\n",
         "none": "    exact_dedup: false\n    near_dedup: {enabled: false}\n"}


def project(folder: Path, clean: bool, seed: int, label_noise: str, max_steps: int | None,
            dedup_mode: str = "both") -> Path:
    text = (QUICKSTART / "project.yaml").read_text(encoding="utf-8")
    dedup = DEDUP[dedup_mode]
    text = text.replace("  validation: 0.1\n", "  validation: 0.1\n" + (
        f"  clean:\n    label_noise: {{action: {label_noise}}}\n{dedup}" if clean else "  clean: {enabled: false}\n"))
    steps = f"  max_steps: {max_steps}\n" if max_steps else ""
    text = text.replace("  batch_size: 8\n", f"  batch_size: 8\n  seed: {seed}\n{steps}")
    text = text.replace("../suites/", f"{ROOT / 'examples' / 'suites'}/")
    path = folder / f"{'clean' if clean else 'dirty'}-{seed}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def run(config: Path, out: Path, leaked: set[str]) -> dict:
    """Test accuracy overall and on the test rows that were not copied into training."""
    done = subprocess.run([sys.executable, "-m", "tunesmith", "run", str(config), "--out", str(out), "-q"],
                          capture_output=True, text=True)
    if done.returncode not in (0, 3):
        raise SystemExit(done.stderr)
    data = json.loads((out / "data" / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "predictions" / "test.jsonl").read_text().splitlines()]
    clean_rows = [r for r in rows if dedup_text(r["text"]) not in leaked]
    return {"accuracy": sum(r["prediction"] == r["gold"] for r in rows) / len(rows),
            "unleaked_accuracy": sum(r["prediction"] == r["gold"] for r in clean_rows) / len(clean_rows),
            "unleaked_rows": len(clean_rows), "train_rows": data["splits"]["train"]["rows"],
            "steps": json.loads((out / "metrics.json").read_text())["train"]["steps"],
            "removed": data.get("curation", {}).get("removed_by_reason", {})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-kind", type=int, default=20, help="rows of each injected problem")
    ap.add_argument("--seeds", type=int, default=1, help="training seeds per setting")
    ap.add_argument("--first-seed", type=int, default=42)
    ap.add_argument("--keep", type=Path, help="keep the data and run directories here")
    ap.add_argument("--label-noise", choices=["remove", "relabel", "report"], default="remove",
                    help="what cleaning does with suspected label errors")
    ap.add_argument("--equal-steps", action="store_true",
                    help="train the cleaned set for as many steps as the dirty run took")
    ap.add_argument("--keep-duplicates", action="store_true",
                    help="clean without exact and near deduplication (PII, decontamination, label noise only)")
    ap.add_argument("--exact-dedup-only", action="store_true",
                    help="clean with exact deduplication but without near deduplication")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        (folder / "data").mkdir(parents=True, exist_ok=True)
        train, test = read_csv(QUICKSTART / "data" / "train.csv"), read_csv(QUICKSTART / "data" / "test.csv")
        rows, truth = make_dirty([{"text": r["text"], "category": r["category"]} for r in train],
                                 [{"text": r["text"], "category": r["category"]} for r in test],
                                 n=args.per_kind, seed=0)
        write_csv(folder / "data" / "train.csv", rows)
        shutil.copy(QUICKSTART / "data" / "test.csv", folder / "data" / "test.csv")
        print(f"dirty train: {len(rows)} rows ({len(train)} original + injected: "
              + ", ".join(f"{k} {len(v)}" for k, v in truth.items()) + ")")
        leaked = {dedup_text(rows[i]["text"]) for i in truth["test_copy"]}
        results: dict[str, list[dict]] = {"dirty": [], "clean": []}
        for seed in range(args.seeds):
            steps = None
            for name in ("dirty", "clean"):
                mode = "none" if args.keep_duplicates else "exact" if args.exact_dedup_only else "both"
                config = project(folder, name == "clean", args.first_seed + seed, args.label_noise, steps, mode)
                result = run(config, folder / f"run-{name}-{seed}", leaked)
                if args.equal_steps:
                    steps = result["steps"]
                results[name].append(result)
                print(f"{name} seed {args.first_seed + seed}: test accuracy {result['accuracy']:.4f}, on the "
                      f"{result['unleaked_rows']} test rows not copied into train {result['unleaked_accuracy']:.4f}; "
                      f"train rows {result['train_rows']}, steps {result['steps']}, "
                      f"removed {result['removed'] or 'nothing'}", flush=True)
        for key, what in (("accuracy", "all test rows (the dirty run has seen some of them)"),
                          ("unleaked_accuracy", "test rows not copied into train")):
            mean = {k: sum(r[key] for r in v) / len(v) for k, v in results.items()}
            print(f"{what}, mean of {args.seeds} seed(s): dirty {mean['dirty']:.4f}, cleaned {mean['clean']:.4f} "
                  f"({mean['clean'] - mean['dirty']:+.4f})")


if __name__ == "__main__":
    main()
