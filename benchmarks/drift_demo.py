"""Drift demo: in-distribution traffic, then shifted traffic, through a running `tunesmith serve`;
`tunesmith monitor` after each.

    python benchmarks/drift_demo.py RUN_DIR [--n 100] [--shifted examples/suites/sst2_test100.jsonl]

Phase 1 posts N messages from the run's own test split (same distribution as training); phase 2
posts N texts of another dataset (default: SST-2 movie reviews). After each phase the monitor looks
at the newest N logged requests. Works on a copy of RUN_DIR, so its request log starts empty.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_load import free_port, serve, texts_of  # noqa: E402


def monitor(run: Path, n: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "tunesmith", "monitor", str(run), "--window", str(n), "--json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def show(phase: str, report: dict) -> None:
    print(f"{phase}: {report['requests']} requests -> drift {report['drift']}, recommendation: "
          f"{report['recommendation']} ({report['reason']})")
    for name, s in report["signals"].items():
        extra = f", p {s['p_value']:.2g}" if "p_value" in s else ""
        print(f"  {'DRIFT' if s['drift'] else 'ok   '} {name}: {s['score']} (threshold {s['threshold']}{extra})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--shifted", type=Path, default=ROOT / "examples/suites/sst2_test100.jsonl")
    args = ap.parse_args()
    shifted = [json.loads(line)["text"] for line in args.shifted.read_text().splitlines() if line.strip()][: args.n]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(args.run_dir, run, ignore=shutil.ignore_patterns("monitor"))
        usual = texts_of(run)[: args.n]
        port = free_port()
        proc = serve(run, port, None)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as c:
                for start in range(0, len(usual), 16):
                    c.post("/v1/classify", json={"texts": usual[start:start + 16]}).raise_for_status()
                show("phase 1, in-distribution (the run's test messages)", monitor(run, len(usual)))
                for start in range(0, len(shifted), 16):
                    c.post("/v1/classify", json={"texts": shifted[start:start + 16]}).raise_for_status()
                show(f"phase 2, shifted ({args.shifted.name})", monitor(run, len(shifted)))
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
