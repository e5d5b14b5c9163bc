"""The promotion rule: when a retrained challenger may replace the champion.

Three checks, all required:
  (a) not worse on the champion's own test split: the 95% interval of challenger - champion must not
      reach below -objective.tolerance (a lower-is-better metric is mirrored: its upper end must not
      exceed +tolerance);
  (b) better on the recent traffic held out from training: for a metric McNemar's test fits
      (evaluate/compare.py MCNEMAR_METRICS) a difference in the right direction with p < 0.05,
      for every other metric an interval entirely on the better side of zero;
  (c) the challenger meets the objective and its constraints (its own summary.json verdict).

`decide` is pure: it takes the figures and returns the decision with every check's figures.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tunesmith.registry import METRIC_SPECS

# The level a McNemar p-value must beat; the intervals are 95% ones (compare.py's default level).
SIGNIFICANCE = 0.05


@dataclass(frozen=True)
class Check:
    """One condition of the rule, whether it passed, and the figures it was judged on."""

    name: str
    passed: bool
    detail: str
    figures: dict


@dataclass(frozen=True)
class Decision:
    """Promote or not; `reasons` are the details of the checks that decided it."""

    promote: bool
    reasons: list[str]
    checks: list[Check]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def decide(metric: str, test: dict | None, traffic: dict | None, objective: dict, tolerance: float) -> Decision:
    """The rule on one metric's paired comparisons (challenger - champion, as compare.py gives them).

    Args:
        metric: the objective metric; METRIC_SPECS says whether higher is better.
        test: the comparison on the champion's test split ({diff, ci_low, ci_high, p_value, test, n}),
            None when the two runs share no test rows (the check then fails).
        traffic: the comparison on the held-out traffic, None when it could not be made.
        objective: the challenger's verdict ({"met": bool, "criteria": [...]}, summary.json's "objective").
        tolerance: objective.tolerance, in the metric's units.
    """
    higher = metric not in METRIC_SPECS or METRIC_SPECS[metric].higher_is_better
    checks = [_not_worse(metric, test, tolerance, higher), _better(metric, traffic, higher), _objective(objective)]
    promote = all(c.passed for c in checks)
    reasons = [c.detail for c in checks if c.passed == promote]
    return Decision(promote, reasons, checks)


def _not_worse(metric: str, row: dict | None, tolerance: float, higher: bool) -> Check:
    if row is None:
        return Check("test_not_worse", False, "no test rows in common between champion and challenger, so the "
                     "challenger cannot be shown not to be worse on the original test split", {})
    # The end of the interval on the worse side, as a change in the better direction.
    worst = row["ci_low"] if higher else -row["ci_high"]
    passed = worst >= -tolerance
    detail = (f"original test split (n={row.get('n')}): {metric} challenger - champion {row['diff']:+.4f}, "
              f"95% CI [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]; "
              f"{'not worse' if passed else 'may be worse'} than the champion beyond the tolerance "
              f"{tolerance:g} (objective.tolerance)")
    return Check("test_not_worse", passed, detail, {**_figures(row), "tolerance": tolerance,
                                                     "higher_is_better": higher})


def _better(metric: str, row: dict | None, higher: bool) -> Check:
    if row is None:
        return Check("traffic_better", False, "no held-out traffic to compare on", {})
    gain = row["diff"] if higher else -row["diff"]
    if row.get("test") == "McNemar":
        passed = gain > 0 and row["p_value"] < SIGNIFICANCE
        how = f"McNemar p={row['p_value']:.4g} (needs < {SIGNIFICANCE:g} and a gain)"
    else:
        passed = (row["ci_low"] > 0) if higher else (row["ci_high"] < 0)
        how = f"95% CI [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}] (needs to exclude 0 on the better side)"
    detail = (f"recent traffic held out (n={row.get('n')}): {metric} challenger - champion {row['diff']:+.4f}, "
              f"{how}; {'better' if passed else 'not shown better'}")
    return Check("traffic_better", passed, detail, {**_figures(row), "higher_is_better": higher,
                                                     "significance": SIGNIFICANCE})


def _objective(objective: dict) -> Check:
    criteria = objective.get("criteria", [])
    failed = [c for c in criteria if not c.get("met")]
    met = bool(objective.get("met")) and not failed
    if met:
        detail = "the challenger meets the objective" + (" and its constraints" if len(criteria) > 1 else "")
    else:
        detail = "the challenger misses the objective: " + (", ".join(
            f"{c['name']} {c.get('value')} (needs {c['op']} {c['target']})" for c in failed) or "no verdict")
    return Check("objective_met", met, detail, {"met": met, "criteria": criteria})


def _figures(row: dict) -> dict:
    keys = ("metric", "n", "champion", "challenger", "diff", "ci_low", "ci_high", "p_value", "test")
    return {k: row[k] for k in keys if k in row}
