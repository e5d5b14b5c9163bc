"""The promotion rule (loop/promotion.py): each check decides alone, with its figures."""

from __future__ import annotations

import pytest

from tunesmith.evaluate.compare import compare
from tunesmith.pipeline.promotion import decide

MET = {"met": True, "criteria": [{"name": "accuracy", "value": 0.9, "target": 0.8, "op": ">=", "met": True}]}
MISSED = {"met": False, "criteria": [{"name": "latency_p95_ms", "value": 80.0, "target": 50.0, "op": "<=",
                                      "met": False}]}


def row(diff: float, low: float, high: float, p: float = 0.5, test: str = "paired bootstrap", n: int = 200) -> dict:
    return {"diff": diff, "ci_low": low, "ci_high": high, "p_value": p, "test": test, "n": n}


SAME_ON_TEST = row(0.0, -0.008, 0.01)                         # within the default tolerance 0.01
BETTER_ON_TRAFFIC = row(0.2, 0.1, 0.3, p=0.001, test="McNemar")


def test_promotes_when_every_check_passes():
    d = decide("accuracy", SAME_ON_TEST, BETTER_ON_TRAFFIC, MET, tolerance=0.01)
    assert d.promote and [c.name for c in d.checks] == ["test_not_worse", "traffic_better", "objective_met"]
    assert all(c.passed for c in d.checks) and len(d.reasons) == 3
    assert d.checks[0].figures["ci_low"] == -0.008 and d.checks[0].figures["tolerance"] == 0.01
    assert d.to_json()["promote"] is True


@pytest.mark.parametrize("test, traffic, objective, failing", [
    (row(-0.01, -0.03, 0.01), BETTER_ON_TRAFFIC, MET, "test_not_worse"),       # may be 0.03 worse > 0.01
    (SAME_ON_TEST, row(0.05, 0.01, 0.09, p=0.08, test="McNemar"), MET, "traffic_better"),   # not significant
    (SAME_ON_TEST, row(-0.1, -0.2, -0.01, p=0.001, test="McNemar"), MET, "traffic_better"),  # significant, worse
    (SAME_ON_TEST, row(0.05, -0.01, 0.1), MET, "traffic_better"),               # bootstrap CI includes 0
    (SAME_ON_TEST, BETTER_ON_TRAFFIC, MISSED, "objective_met"),
    (None, BETTER_ON_TRAFFIC, MET, "test_not_worse"),                           # no test rows in common
    (SAME_ON_TEST, None, MET, "traffic_better"),
])
def test_each_check_alone_rejects(test, traffic, objective, failing):
    d = decide("accuracy", test, traffic, objective, tolerance=0.01)
    assert not d.promote
    assert [c.name for c in d.checks if not c.passed] == [failing]
    assert len(d.reasons) == 1 and d.reasons[0] == next(c.detail for c in d.checks if c.name == failing)


def test_tolerance_is_the_boundary():
    edge = row(0.0, -0.02, 0.02)
    assert decide("accuracy", edge, BETTER_ON_TRAFFIC, MET, tolerance=0.02).promote
    assert not decide("accuracy", edge, BETTER_ON_TRAFFIC, MET, tolerance=0.019).promote


def test_bootstrap_metric_needs_the_interval_above_zero():
    assert decide("f1_macro", SAME_ON_TEST, row(0.05, 0.001, 0.1, p=0.04), MET, 0.01).promote
    # A McNemar-style p-value alone does not make a bootstrap metric better: its interval decides.
    assert not decide("f1_macro", SAME_ON_TEST, row(0.05, -0.001, 0.1, p=0.04), MET, 0.01).promote


def test_lower_is_better_metric_is_mirrored():
    # perplexity: a negative difference is a gain; the interval's upper end is the worse side.
    better = row(-2.0, -3.0, -1.0)
    assert decide("perplexity", row(0.5, -0.5, 0.005), better, MET, tolerance=0.01).promote
    assert not decide("perplexity", row(0.0, -0.5, 0.5), better, MET, tolerance=0.01).promote
    assert not decide("perplexity", SAME_ON_TEST, row(2.0, 1.0, 3.0), MET, tolerance=0.01).promote


def test_decision_on_real_paired_figures():
    """With compare.py's own output: a challenger right on 40 more traffic rows of 100 is better (McNemar)."""
    golds = ["a"] * 100
    champion, challenger = ["b"] * 50 + ["a"] * 50, ["a"] * 90 + ["b"] * 10
    traffic = {**compare("classification", golds, champion, challenger, ["accuracy"])["accuracy"], "n": 100}
    same = {**compare("classification", golds, golds, golds, ["accuracy"])["accuracy"], "n": 100}
    assert traffic["test"] == "McNemar" and traffic["p_value"] < 0.05
    assert decide("accuracy", same, traffic, MET, 0.01).promote
    assert not decide("accuracy", same, {**traffic, **compare("classification", golds, challenger, champion,
                                                              ["accuracy"])["accuracy"]}, MET, 0.01).promote
