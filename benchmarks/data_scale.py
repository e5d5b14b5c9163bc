"""Cleaning at scale: `tunesmith data clean` on N short texts (exact + near dedup + PII), and
tunesmith's near-dedup against a plain datasketch MinHash + MinHashLSH loop on the same texts.

Texts are BANKING77 queries recombined and perturbed (typos, appended words, PII, exact copies),
so duplicates and PII occur at realistic rates. Prints wall time and peak RSS of the clean run
(a subprocess, so its memory is measured alone), then near-dedup throughput of both on a sample.

    python benchmarks/data_scale.py --rows 1000000 --sample 50000
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CONFIG = """name: scale
model: smollm2-135m-instruct
task: {type: classification, text_field: text, label_field: label}
data:
  train: train.jsonl
  validation: 0.01
  test: 0.01
  clean:
    exact_dedup: true
    near_dedup: {enabled: true, threshold: 0.7}
    semantic_dedup: {enabled: false}
    pii: {enabled: true, action: redact}
    decontaminate: {enabled: false}
    label_noise: {enabled: false}
"""


def make_texts(n: int, seed: int = 0) -> list[dict]:
    with open(ROOT / "tests" / "data" / "banking77" / "train.csv", newline="", encoding="utf-8") as f:
        base = [(r["text"].replace("\n", " "), r["category"]) for r in csv.DictReader(f)]
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text, label = rng.choice(base)
        kind = rng.random()
        if kind < 0.6:  # a new text: two queries joined, so most rows are distinct
            other = rng.choice(base)[0]
            text = f"{text} {other}"
        elif kind < 0.75:
            i_cut = rng.randrange(1, max(2, len(text)))
            text = text[:i_cut] + text[i_cut + 1:]
        elif kind < 0.8:
            text = f"{text} my email is user{rng.randrange(10**6)}@example.com"
        elif kind < 0.85:
            text = f"{text} call +44 20 {rng.randrange(1000, 9999)} {rng.randrange(1000, 9999)}"
        rows.append({"text": text, "label": label})
    return rows


def run_clean(folder: Path) -> tuple[float, float, str]:
    """Wall seconds and peak RSS (MB) of `tunesmith data clean` in its own process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tunesmith", "data", "clean", str(folder / "project.yaml"),
                           "--out", str(folder / "clean"), "-q"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return wall, peak, done.stdout


def tunesmith_near(texts: list[str]) -> tuple[float, int]:
    from tunesmith.data.dedup import near_duplicates

    start = time.perf_counter()
    found = near_duplicates(texts, threshold=0.7, num_perm=128, ngram=3)
    return time.perf_counter() - start, len(found)


def datasketch_near(texts: list[str]) -> tuple[float, int]:
    """The plain loop: one MinHash per text over the same shingles, query then insert."""
    from datasketch import MinHash, MinHashLSH

    from tunesmith.data.normalize import dedup_text

    start = time.perf_counter()
    lsh = MinHashLSH(threshold=0.7, num_perm=128)
    found = 0
    for i, text in enumerate(texts):
        t = dedup_text(text)
        t = t if len(t) >= 3 else t.ljust(3, "\0")
        m = MinHash(num_perm=128)
        m.update_batch([t[j:j + 3].encode("utf-8") for j in range(len(t) - 2)])
        if lsh.query(m):
            found += 1
        else:
            lsh.insert(str(i), m)
    return time.perf_counter() - start, found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--sample", type=int, default=50_000, help="texts for the near-dedup comparison")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the near-dedup comparison")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = make_texts(args.rows)
        with open(folder / "train.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        (folder / "project.yaml").write_text(CONFIG, encoding="utf-8")
        wall, peak, out = run_clean(folder)
        print(f"tunesmith data clean, {args.rows:,} texts (exact + near dedup + PII): "
              f"{wall:.1f} s, peak RSS {peak:.0f} MB")
        print("  " + out.strip().replace("\n", "\n  "))
        sample = [r["text"] for r in rows[: args.sample]]
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(tunesmith_near(sample))
            theirs.append(datasketch_near(sample))
        t_ours = statistics.median(t for t, _ in ours)
        t_theirs = statistics.median(t for t, _ in theirs)
        print(f"near-dedup on {len(sample):,} texts, median of {args.repeats}: tunesmith {t_ours:.1f} s "
              f"({len(sample) / t_ours:,.0f} texts/s, {ours[0][1]:,} duplicates), datasketch loop {t_theirs:.1f} s "
              f"({len(sample) / t_theirs:,.0f} texts/s, {theirs[0][1]:,} duplicates)")
        print(f"near-dedup throughput ratio (tunesmith / datasketch): x{t_theirs / t_ours:.2f}")


if __name__ == "__main__":
    main()
