"""Is the fine-tuned model better, and by how much? Paired statistics on the same test examples.

Both models answered the same examples, so the comparison is paired: a bootstrap resamples
examples (the same resample for both models) and recomputes each metric's difference, giving a
95% percentile interval; for classification, McNemar's test looks only at the examples where
exactly one model is right. Without scipy-style dependencies here; the tests check both against
scipy/statsmodels on fixed inputs.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from tunesmith.tasks.metrics import METRICS


def paired_bootstrap(golds: Sequence[str], base: Sequence[str], tuned: Sequence[str], metric: str,
                     resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Difference tuned - base of `metric`, its percentile bootstrap interval and a two-sided p-value.

    The p-value is the share of resampled differences on the other side of zero, doubled (the
    usual bootstrap sign test), floored at 1/(resamples + 1).
    """
    fn = METRICS[metric].fn
    n = len(golds)
    golds, base, tuned = list(golds), list(base), list(tuned)
    diff = fn(golds, tuned) - fn(golds, base)
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for b in range(resamples):
        idx = rng.integers(0, n, n)
        g = [golds[i] for i in idx]
        diffs[b] = fn(g, [tuned[i] for i in idx]) - fn(g, [base[i] for i in idx])
    alpha = (1 - level) / 2
    low, high = np.quantile(diffs, [alpha, 1 - alpha])
    other_side = np.mean(diffs <= 0) if diff > 0 else np.mean(diffs >= 0)
    p = min(1.0, max(2 * other_side, 1 / (resamples + 1)))
    return {"diff": round(diff, 6), "ci_low": round(float(low), 6), "ci_high": round(float(high), 6),
            "p_value": _sig(float(p)), "test": "paired bootstrap", "resamples": resamples, "level": level}


def mcnemar(golds: Sequence[str], base: Sequence[str], tuned: Sequence[str], exact_below: int = 25) -> dict:
    """McNemar's test on per-example correctness: exact binomial when the discordant pairs are
    few (< exact_below), else the chi-square statistic with continuity correction.

    Returns:
        {"b": base right & tuned wrong, "c": base wrong & tuned right, "statistic", "p_value", "exact"}.
    """
    b = sum(g == x and g != y for g, x, y in zip(golds, base, tuned))
    c = sum(g != x and g == y for g, x, y in zip(golds, base, tuned))
    if b + c == 0:
        return {"b": 0, "c": 0, "statistic": 0.0, "p_value": 1.0, "exact": True}
    if b + c < exact_below:
        k = min(b, c)
        tail = sum(math.comb(b + c, i) for i in range(k + 1)) / 2 ** (b + c)
        return {"b": b, "c": c, "statistic": float(k), "p_value": _sig(min(1.0, 2 * tail)), "exact": True}
    stat = (abs(b - c) - 1) ** 2 / (b + c)
    return {"b": b, "c": c, "statistic": round(stat, 6), "p_value": _sig(_chi2_sf_1(stat)), "exact": False}


def _sig(p: float) -> float:
    """Four significant digits: tiny p-values stay distinguishable from zero."""
    return float(f"{p:.4g}")


def _chi2_sf_1(x: float) -> float:
    """Survival function of the chi-square distribution with one degree of freedom."""
    return math.erfc(math.sqrt(x / 2))


# Metrics that are a mean of per-example right/wrong: McNemar's test fits them (preference_accuracy: a
# pair is right when its margin is positive); every other metric (macro-F1, precision, recall, ROUGE,
# BLEU, reward_margin, ...) is not a count of correct examples and takes the paired bootstrap's p-value.
MCNEMAR_METRICS = ("accuracy", "exact_match", "preference_accuracy")


def compare(task_type: str, golds: Sequence[str], base: Sequence[str], tuned: Sequence[str],
            metrics: list[str], resamples: int = 1000, seed: int = 0) -> dict:
    """{metric: {diff, ci_low, ci_high, p_value, test, ...}} for each metric. Accuracy and exact match
    take McNemar's p-value (`test` "McNemar", the bootstrap's kept as `bootstrap_p_value`); every other
    metric keeps the paired bootstrap's (`test` "paired bootstrap"). `task_type` is kept for callers."""
    out = {}
    for name in metrics:
        # Corpus-level metrics (BLEU, chrF) cost a full corpus score per resample.
        row = paired_bootstrap(golds, base, tuned, name, max(200, resamples // METRICS[name].cost), seed)
        if name in MCNEMAR_METRICS:
            test = mcnemar(*_correctness(golds, base, tuned, METRICS[name].fn))
            row["bootstrap_p_value"] = row["p_value"]
            row.update(p_value=test["p_value"], test="McNemar", mcnemar=test)
        out[name] = row
    return out


def _correctness(golds: Sequence, base: Sequence[str], tuned: Sequence[str], fn) -> tuple[list, list, list]:
    """Per-example right (1) or wrong (0) of each model under `fn` (exact match normalises answers, so
    raw string equality would miscount), shaped as the (golds, base, tuned) McNemar takes."""
    ones = [1] * len(golds)
    return (ones, [int(fn([g], [p]) == 1.0) for g, p in zip(golds, base)],
            [int(fn([g], [p]) == 1.0) for g, p in zip(golds, tuned)])
