"""The verdict: each objective criterion measured, compared with its target, met or not."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tunesmith.config import ObjectiveConfig
from tunesmith.registry import METRIC_SPECS
from tunesmith.runs import criterion_met


@dataclass(frozen=True)
class Criterion:
    """One measured figure against its target. A figure that could not be measured (None) is not met."""

    name: str
    value: float | None
    target: float
    op: str  # ">=" or "<="
    met: bool


@dataclass(frozen=True)
class Verdict:
    """The objective judged: met when every criterion is (and when there are none)."""

    met: bool
    criteria: list[Criterion]

    def to_json(self) -> dict:
        """summary.json's "objective": {"met", "criteria": [{"name", "value", "target", "op", "met"}]}."""
        return dataclasses.asdict(self)


def judge(objective: ObjectiveConfig, baseline: dict, finetuned: dict, comparison: dict | None = None) -> Verdict:
    """Criteria for the target, the gain over the baseline and each constraint.

    Args:
        objective: the config's objective section.
        baseline: figures of the base model on the test split.
        finetuned: figures of the fine-tuned model (task metrics and efficiency figures).
        comparison: metrics.json's `comparison` (paired intervals), used when min_gain_on is ci_low.

    Returns:
        The Verdict; with no criteria configured, `met` is true.
    """
    metric = objective.metric
    # For a lower-is-better metric (perplexity) the target is a ceiling and the gain is the reduction.
    higher = metric not in METRIC_SPECS or METRIC_SPECS[metric].higher_is_better
    criteria = []
    if objective.target is not None:
        criteria.append(_criterion(metric, finetuned.get(metric), objective.target, ">=" if higher else "<="))
    if objective.min_gain is not None:
        if objective.min_gain_on == "ci_low":
            row = (comparison or {}).get(metric, {})
            # tuned - base's interval: a reduction's lower end is minus the difference's upper end.
            gain = row.get("ci_low") if higher else _negated(row.get("ci_high"))
            criteria.append(_criterion(f"{metric}_gain_ci_low", gain, objective.min_gain, ">="))
        else:
            tuned, base = finetuned.get(metric), baseline.get(metric)
            gain = _diff(tuned, base) if higher else _diff(base, tuned)
            criteria.append(_criterion(f"{metric}_gain", gain, objective.min_gain, ">="))
    for name, bound in objective.constraints.items():
        if bound.min is not None:
            criteria.append(_criterion(name, finetuned.get(name), bound.min, ">="))
        if bound.max is not None:
            criteria.append(_criterion(name, finetuned.get(name), bound.max, "<="))
    return Verdict(all(c.met for c in criteria), criteria)


def _negated(a):
    return None if a is None else -a


def _diff(a, b):
    return None if a is None or b is None else round(a - b, 6)


def _criterion(name: str, value, target: float, op: str) -> Criterion:
    # A figure that could not be measured fails its criterion rather than passing silently; so does a NaN
    # or an infinite one (summary.json writes it as null, which must read back as not met).
    return Criterion(name, value, target, op, criterion_met(value, op, target))
