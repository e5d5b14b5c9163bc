"""Every export format of one run, each verified by its independent reader, as one table.

    python benchmarks/export_formats.py RUN_DIR [--work DIR] [--formats hf,gguf:f16,gguf:q8_0,...]

Runs `tunesmith export RUN_DIR --format F [--quant Q] --out WORK/F-Q` for each format (default: hf, gguf
f16, gguf q8_0, gguf q4_K_M, ollama q8_0) as a separate process, times it, reads its export.json and
prints a Markdown row per format: weights size, reader, agreement with the run's test predictions,
metric (run), delta, load time, wall time. An export refused for low agreement (exit 1) or not
possible here (exit 2, e.g. q4_K_M without llama-cpp-python) is a row saying so, with its error line.
Each export goes to a new folder WORK/FORMAT-QUANT (an existing one stops the script; nothing is
deleted). Writes WORK/export_formats.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DEFAULT = "hf,gguf:f16,gguf:q8_0,gguf:q4_K_M,ollama:q8_0"


def run_one(run_dir: Path, work: Path, spec: str) -> dict:
    """Export one format with the real CLI; the export.json it wrote plus wall time and exit code."""
    fmt, _, quant = spec.partition(":")
    out = work / spec.replace(":", "-")
    if out.exists():  # never delete: an export refuses a non-empty --out anyway
        sys.exit(f"error: {out} exists; give a new --work folder")
    command = [sys.executable, "-m", "tunesmith", "export", str(run_dir), "--format", fmt, "--out", str(out)]
    command += ["--quant", quant] if quant else []
    print("$ " + " ".join(command[2:]), flush=True)
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    print((proc.stdout + proc.stderr).strip(), flush=True)
    record = json.loads((out / "export.json").read_text()) if proc.returncode == 0 else {}
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    return {"spec": spec, "format": fmt, "quant": quant or None, "exit": proc.returncode, "wall_s": round(wall, 1),
            "error": errors[0] if errors else None, **record}


def row(r: dict) -> str:
    kind = r["format"] + (f" {r['quant']}" if r["quant"] else "")
    if r["exit"] != 0:
        return f"| {kind} | refused (exit {r['exit']}): {r['error']} | | | | | | {r['wall_s']} s |"
    modelfile = ""
    if r.get("modelfile"):
        m = r["modelfile"]
        modelfile = f"; Modelfile TEMPLATE = run's prompt on {m['rows'] - m['mismatches'] - m['skipped']}/{m['rows']}"
    delta = "n/a" if r["delta"] is None else f"{r['delta']:+.4f}"
    return (f"| {kind} | {r['size_mb']} MB | {r['reader']} | {r['agreement']:.4f} ({r['n']} rows){modelfile} | "
            f"{r['metric_export']} ({r['metric_run']}) | {delta} | {r['load_seconds']:.2f} s | {r['wall_s']} s |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunesmith-exports"))
    parser.add_argument("--formats", default=DEFAULT)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = [run_one(args.run_dir, args.work, spec) for spec in args.formats.split(",")]
    metric = next((r["metric"] for r in results if r.get("metric")), "metric")
    print(f"\n| format | weights | read back by | agreement with the run | {metric} (run) | delta | load time "
          "| export wall time |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        print(row(r))
    (args.work / "export_formats.json").write_text(json.dumps(results, indent=1))
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
