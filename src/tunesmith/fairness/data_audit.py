"""Data audit before training: representation of each group, its label mix, and how strongly
group and label go together (chi-square test, mutual information)."""

from __future__ import annotations

from collections import Counter

import numpy as np


def audit_attribute(groups: list[str], labels: list[str], under_represented: float, min_size: int) -> dict:
    """Figures for one attribute over the training rows."""
    n = len(groups)
    counts = Counter(groups)
    by_group = {}
    for g in sorted(counts):
        mix = Counter(lab for gg, lab in zip(groups, labels) if gg == g)
        by_group[g] = {"rows": counts[g], "share": round(counts[g] / max(n, 1), 6),
                       "labels": {lab: round(c / counts[g], 6) for lab, c in sorted(mix.items())}}
    flagged = [g for g, c in counts.items() if c / max(n, 1) < under_represented or c < min_size]
    return {"rows": n, "groups": by_group, "under_represented": sorted(flagged),
            "association": association(groups, labels)}


def association(groups: list[str], labels: list[str]) -> dict:
    """Chi-square test of independence of group and label, and their mutual information (nats)."""
    from scipy.stats import chi2_contingency
    from sklearn.metrics import mutual_info_score

    names, labs = sorted(set(groups)), sorted(set(labels))
    table = np.zeros((len(names), len(labs)))
    for g, lab in zip(groups, labels):
        table[names.index(g), labs.index(lab)] += 1
    if table.shape[0] < 2 or table.shape[1] < 2:
        return {"chi2": None, "p_value": None, "mutual_information": 0.0}
    chi2, p, dof, _ = chi2_contingency(table, correction=False)
    return {"chi2": round(float(chi2), 4), "dof": int(dof), "p_value": float(f"{p:.4g}"),
            "mutual_information": round(float(mutual_info_score(groups, labels)), 6)}
