"""Technique bake-off: every `train.method` on one project through the real `tunesmith run`.

Each method runs with the project's settings except the learning rate, which is the method's own
default (its learning_rate in registry.METHOD_SPECS) unless the method is the project's own. Prints a
Markdown table of test accuracy (baseline and fine-tuned), training time, peak memory and trainable
parameters.

    python benchmarks/methods.py examples/quickstart/project.yaml --out /tmp/methods
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tunesmith.train.methods import METHODS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--out", required=True, help="folder for the run directories")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--table-only", action="store_true", help="only print the table of runs already in --out")
    args = ap.parse_args()
    rows = []
    for method in args.methods.split(","):
        run_dir = Path(args.out) / method
        if args.table_only:
            if (run_dir / "metrics.json").is_file():
                rows.append(row(method, run_dir))
            continue
        done = subprocess.run([sys.executable, "-m", "tunesmith", "run", str(variant(args.config, method)),
                               "--out", str(run_dir), "--quiet"], capture_output=True, text=True)
        if done.returncode not in (0, 3):
            print(f"{method}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(row(method, run_dir))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))


def variant(config: str, method: str) -> Path:
    """A copy of the project with `method`, data paths made absolute."""
    src = Path(config).resolve()
    project = yaml.safe_load(src.read_text(encoding="utf-8"))
    for key in ("train", "test", "validation"):
        value = project["data"].get(key)
        if isinstance(value, str):
            project["data"][key] = str((src.parent / value).resolve())
    train = project.setdefault("train", {})
    if train.get("method", "lora") != method:
        train.pop("learning_rate", None)
    train["method"] = method
    out = Path(tempfile.mkdtemp()) / "project.yaml"
    out.write_text(yaml.safe_dump(project), encoding="utf-8")
    return out


def row(method: str, run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    metric = json.loads((run_dir / "summary.json").read_text())["objective_metric"]
    train = metrics.get("train", {})
    return {"method": method, "learning_rate": config["train"]["learning_rate"],
            "baseline": metrics["baseline"][metric], "finetuned": metrics["finetuned"][metric],
            "train_seconds": train.get("train_seconds"), "peak_rss_mb": train.get("peak_rss_mb"),
            "trainable_params": train.get("trainable_params"), "tokens_per_second": train.get("tokens_per_second"),
            "steps": train.get("steps"), "forgetting_delta": metrics.get("forgetting", {}).get("delta")}


def table(rows: list[dict]) -> str:
    lines = ["| method | lr | baseline | fine-tuned | train s | peak RSS MB | trainable params | tokens/s | "
             "probe delta |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lr = f"{r['learning_rate']:g}" if r["trainable_params"] else "n/a"
        lines.append(f"| {r['method']} | {lr} | {r['baseline']:.4f} | {r['finetuned']:.4f} | "
                     f"{r['train_seconds']:.0f} | {r['peak_rss_mb']:.0f} | {r['trainable_params']:,} | "
                     f"{r['tokens_per_second']:.0f} | {_signed(r['forgetting_delta'])} |")
    return "\n".join(lines)


def _signed(value) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


if __name__ == "__main__":
    main()
