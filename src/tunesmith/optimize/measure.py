"""Measure one variant in a fresh process, so its load time and peak memory are its own.

    python -m tunesmith.optimize.measure VARIANT_DIR TEST_JSONL OUT_JSON [--batch-size 16] [--latency-samples 30]

writes {load_seconds, latency_p50_ms, latency_p95_ms, throughput_per_s, peak_rss_mb, predictions,
probabilities}. `measure_variant` runs it and reads the result.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tunesmith import fsio, hardware
from tunesmith.errors import TunesmithError


def measure_variant(path: Path, test_file: Path, batch_size: int = 16, latency_samples: int = 30,
                    max_new_tokens: int = 64, timeout_s: float = 3600) -> dict:
    """Run the measurement of `path` on `test_file` in a child process; its figures as a dict."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        cmd = [sys.executable, "-m", "tunesmith.optimize.measure", str(path), str(test_file), str(out),
               "--batch-size", str(batch_size), "--latency-samples", str(latency_samples),
               "--max-new-tokens", str(max_new_tokens)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0 or not out.is_file():
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise TunesmithError(f"measuring variant {path.name} failed: {tail}", str(path))
        return json.loads(out.read_text(encoding="utf-8"))


def measure_here(path: Path, test_file: Path, batch_size: int, latency_samples: int, max_new_tokens: int) -> dict:
    from tunesmith.data.examples import Example
    from tunesmith.evaluate.speed import latency_ms
    from tunesmith.optimize.engines import load_variant

    examples = [Example.from_json(row) for row in fsio.read_jsonl(test_file)]
    started = time.perf_counter()
    predictor = load_variant(path, max_new_tokens)
    load_seconds = time.perf_counter() - started
    predictor.predict(examples[:1], 1)  # warm-up: lazy initialisation is not latency
    figures = latency_ms(lambda ex: predictor.predict([ex], 1), examples[:latency_samples])
    started = time.perf_counter()
    preds = predictor.predict(examples, batch_size)
    seconds = time.perf_counter() - started
    figures.update(load_seconds=round(load_seconds, 3),
                   throughput_per_s=hardware.examples_per_second(len(examples), seconds),
                   throughput_batch_size=batch_size, peak_rss_mb=hardware.peak_rss_mb(),
                   predictions=preds.texts, probabilities=preds.probabilities)
    return figures


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path", type=Path)
    ap.add_argument("test_file", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--latency-samples", type=int, default=30)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    from tunesmith.logs import quiet_libraries

    quiet_libraries()
    figures = measure_here(args.path, args.test_file, args.batch_size, args.latency_samples, args.max_new_tokens)
    fsio.write_json(args.out, figures)


if __name__ == "__main__":
    main()
