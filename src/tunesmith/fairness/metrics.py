"""Per-group figures and disparities for one label of interest, with bootstrap confidence intervals.

Definitions (those of Fairlearn, whose functions the tests compare against):
- selection rate: share of a group predicted positive;
- demographic parity difference / ratio: max - min / min / max of the groups' selection rates;
- equal opportunity difference: max - min of the groups' true-positive rates;
- equalized odds difference: the larger of the TPR and FPR differences.
Groups smaller than `min_group_size` are listed but left out of the disparities. One departure: a group
with no gold positives has no true-positive rate (no negatives: no false-positive rate), and is left out
of that difference; Fairlearn scores the undefined rate 0 (a zero-division default), which reports a
disparity of up to 1.0 that no prediction made.
"""

from __future__ import annotations

import numpy as np

from tunesmith.registry import DISPARITY_FIGURES as HEADLINE


def per_group(golds: list[str], preds: list[str], groups: list[str], positive: str) -> dict[str, dict]:
    """{group: {n, positives, accuracy, selection_rate, tpr, fpr}} for `positive` as the selected outcome."""
    y, p, g = _arrays(golds, preds, groups, positive)
    correct = np.asarray(golds) == np.asarray(preds)
    out = {}
    for name in sorted(set(groups)):
        m = g == name
        out[name] = {"n": int(m.sum()), "positives": int(y[m].sum()), "accuracy": _mean(correct[m]),
                     "selection_rate": _mean(p[m]), "tpr": _mean(p[m & y]), "fpr": _mean(p[m & ~y])}
    return out


def disparities(golds: list[str], preds: list[str], groups: list[str], positive: str,
                keep: set[str] | None = None) -> dict[str, float | None]:
    """The four headline figures over the groups in `keep` (default: all), to 6 places as audit.json's others."""
    y, p, g = _arrays(golds, preds, groups, positive)
    names = sorted(keep if keep is not None else set(groups))
    return {k: v if v is None else round(float(v), 6) for k, v in _disparities(y, p, g, names).items()}


def with_intervals(golds: list[str], preds: list[str], groups: list[str], positive: str, keep: set[str],
                   resamples: int = 1000, seed: int = 0) -> dict[str, dict]:
    """{figure: {value, ci_low, ci_high}}: percentile bootstrap over examples (95%)."""
    y, p, g = _arrays(golds, preds, groups, positive)
    names = sorted(keep)
    point = _disparities(y, p, g, names)
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in HEADLINE}
    for _ in range(resamples):
        idx = rng.integers(0, len(y), len(y))
        for k, v in _disparities(y[idx], p[idx], g[idx], names).items():
            if v is not None:
                draws[k].append(v)
    # Max - min over noisy group rates is biased upwards under resampling (a gap of exactly 0 still
    # resamples to positive gaps); the interval is widened to hold the point estimate itself.
    out = {}
    for k in HEADLINE:
        lo, hi, v = _pct(draws[k], 2.5), _pct(draws[k], 97.5), point[k]
        if v is not None and lo is not None:
            lo, hi = min(lo, round(v, 6)), max(hi, round(v, 6))
        out[k] = {"value": v, "ci_low": lo, "ci_high": hi}
    return out


def _disparities(y: np.ndarray, p: np.ndarray, g: np.ndarray, names: list[str]) -> dict[str, float | None]:
    sel, tpr, fpr = [], [], []
    for name in names:
        m = g == name
        if not m.any():
            continue
        sel.append(p[m].mean())
        if (m & y).any():
            tpr.append(p[m & y].mean())
        if (m & ~y).any():
            fpr.append(p[m & ~y].mean())
    spread = lambda v: float(max(v) - min(v)) if len(v) >= 2 else None  # noqa: E731
    tpr_d, fpr_d = spread(tpr), spread(fpr)
    odds = [d for d in (tpr_d, fpr_d) if d is not None]
    return {"demographic_parity_difference": spread(sel),
            "demographic_parity_ratio": float(min(sel) / max(sel)) if len(sel) >= 2 and max(sel) > 0 else None,
            "equal_opportunity_difference": tpr_d, "equalized_odds_difference": max(odds) if odds else None}


def _arrays(golds, preds, groups, positive) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.asarray(golds) == positive, np.asarray(preds) == positive, np.asarray(groups)


def _mean(a: np.ndarray) -> float | None:
    return round(float(a.mean()), 6) if a.size else None


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 6) if values else None
