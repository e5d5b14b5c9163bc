"""The verdict: each objective criterion measured, compared with its target, met or not."""

from __future__ import annotations

from tunesmith.config import ObjectiveConfig


def judge(objective: ObjectiveConfig, baseline: dict, finetuned: dict, comparison: dict | None = None) -> dict:
    """Criteria for the target, the gain over the baseline and each constraint.

    Args:
        objective: the config's objective section.
        baseline: figures of the base model on the test split.
        finetuned: figures of the fine-tuned model (task metrics and efficiency figures).
        comparison: metrics.json's `comparison` (paired intervals), used when min_gain_on is ci_low.

    Returns:
        {"met": bool, "criteria": [{"name", "value", "target", "op", "met"}]}; with no criteria
        configured, `met` is true.
    """
    metric = objective.metric
    criteria = []
    if objective.target is not None:
        criteria.append(_criterion(metric, finetuned.get(metric), objective.target, ">="))
    if objective.min_gain is not None:
        if objective.min_gain_on == "ci_low":
            gain = (comparison or {}).get(metric, {}).get("ci_low")
            criteria.append(_criterion(f"{metric}_gain_ci_low", gain, objective.min_gain, ">="))
        else:
            gain = _diff(finetuned.get(metric), baseline.get(metric))
            criteria.append(_criterion(f"{metric}_gain", gain, objective.min_gain, ">="))
    for name, bound in objective.constraints.items():
        if bound.min is not None:
            criteria.append(_criterion(name, finetuned.get(name), bound.min, ">="))
        if bound.max is not None:
            criteria.append(_criterion(name, finetuned.get(name), bound.max, "<="))
    return {"met": all(c["met"] for c in criteria), "criteria": criteria}


def _diff(a, b):
    return None if a is None or b is None else round(a - b, 6)


def _criterion(name: str, value, target: float, op: str) -> dict:
    # A figure that could not be measured fails its criterion rather than passing silently.
    met = value is not None and (value >= target if op == ">=" else value <= target)
    return {"name": name, "value": value, "target": target, "op": op, "met": bool(met)}
