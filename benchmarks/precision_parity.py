"""Quickstart accuracy and memory, fp32 vs bf16 training, over several training seeds, side by side.

One project, trained and evaluated through the real CLI (`tunesmith train`, then `tunesmith eval`) once
per (seed, precision), each in its own process; the same data split for all (the split has its own seed,
`data.seed`, left as the project sets it). Only `train.precision` and `train.seed` change; eval's extra
work that does not touch the fine-tuned model's test figure (benchmarks, forgetting probe, latency
samples) is turned off to save time. Prints one row per run, then per precision the median test
accuracy and peak RSS, and the bf16 - fp32 accuracy difference per seed and its median.

A single run's test accuracy moves with which checkpoint validation restores (on the quickstart's 31
validation rows one row is 3.2 points), so one seed says little about what a precision does; the median
over seeds does.

    python benchmarks/precision_parity.py examples/quickstart/project.yaml --seeds 42,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tunesmith.config.load import derive, dump_config, load_config  # noqa: E402

CLI = [sys.executable, "-m", "tunesmith"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--seeds", default="42,1,2", help="comma list of train.seed values")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--workdir", default=None, help="where the runs go (default: a temporary folder)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="precision_parity_"))
    work.mkdir(parents=True, exist_ok=True)
    project = load_config(args.config)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for precision in args.precisions.split(","):
            row = run_one(project, seed, precision, work)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summarise(rows)


def run_one(project, seed: int, precision: str, work: Path) -> dict:
    cfg = derive(project, {"train.precision": precision, "train.seed": seed, "benchmarks": [],
                           "eval.forgetting_probe": False, "eval.latency_samples": 0})
    path = work / f"seed{seed}_{precision}.yaml"
    path.write_text(dump_config(cfg))
    run_dir = work / f"seed{seed}_{precision}"
    for cmd in (["train", str(path), "--out", str(run_dir), "--quiet"], ["eval", str(run_dir), "--quiet"]):
        done = subprocess.run(CLI + cmd, capture_output=True, text=True)
        if done.returncode not in (0, 3):  # 3: objective not met, figures still written
            sys.exit(f"error: tunesmith {' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    train = metrics["train"]
    return {"seed": seed, "precision": precision, "ran_as": train["precision"],
            "test_accuracy": metrics["finetuned"]["accuracy"], "best_step": train["best_step"],
            "steps": train["steps"], "peak_rss_mb": train["peak_rss_mb"],
            "tokens_per_second": train["tokens_per_second"]}


def summarise(rows: list[dict]) -> None:
    print("\nprecision  median test accuracy  median peak RSS MB  runs")
    for precision in dict.fromkeys(r["precision"] for r in rows):
        mine = [r for r in rows if r["precision"] == precision]
        print(f"{precision:<9}  {statistics.median(r['test_accuracy'] for r in mine):>20.4f}  "
              f"{statistics.median(r['peak_rss_mb'] for r in mine):>18.1f}  {len(mine)}")
    by_seed: dict[int, dict[str, float]] = {}
    for r in rows:
        by_seed.setdefault(r["seed"], {})[r["precision"]] = r["test_accuracy"]
    diffs = {s: a["bf16"] - a["fp32"] for s, a in by_seed.items() if {"bf16", "fp32"} <= a.keys()}
    if diffs:
        print("bf16 - fp32 test accuracy per seed: "
              + ", ".join(f"seed {s}: {d:+.4f}" for s, d in diffs.items())
              + f"; median {statistics.median(diffs.values()):+.4f}")


if __name__ == "__main__":
    main()
