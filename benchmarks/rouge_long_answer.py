"""ROUGE-L on a long gold answer: tunesmith's rouge_l_pair (rouge-score's tokenizer, stems remembered,
bit-parallel LCS) against Google's rouge-score package itself, on the same pairs, in one run.

A validation or test row may hold a very long reference answer (a pasted document), while the model's
answer is at most max_new_tokens long; rouge-score builds a len(gold) x len(prediction) table for it.
Prints each side's median seconds over `--repeats` runs, the ratio, and that both give the same figure.

    python benchmarks/rouge_long_answer.py [--words 800000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time


def _texts(words: int, seed: int = 0) -> tuple[str, str]:
    """A gold answer of `words` words from a Zipf-like vocabulary, and a 64-word prediction from it."""
    rng = random.Random(seed)
    vocab = [f"word{i}" for i in range(5000)] + ["the", "running", "runs", "cats", "cat"]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    gold = " ".join(rng.choices(vocab, weights, k=words))
    prediction = " ".join(rng.choices(vocab, weights, k=64))
    return gold, prediction


def _median_seconds(fn, repeats: int) -> tuple[float, float]:
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=800_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from rouge_score import rouge_scorer

    from tunesmith.tasks.metrics import rouge_l_pair

    gold, prediction = _texts(args.words)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    theirs_s, theirs = _median_seconds(lambda: scorer.score(gold, prediction)["rougeL"].fmeasure, args.repeats)
    ours_s, ours = _median_seconds(lambda: rouge_l_pair(gold, prediction), args.repeats)
    print(f"gold answer: {args.words} words ({len(gold) / 1e6:.1f} MB), prediction: 64 words, "
          f"median of {args.repeats}")
    print(f"rouge-score {theirs_s:.2f} s, tunesmith {ours_s:.2f} s: x{theirs_s / ours_s:.1f} faster; "
          f"same figure: {abs(ours - theirs) < 1e-12} ({ours:.6g})")


if __name__ == "__main__":
    main()
