"""Paired comparison statistics checked against scipy and statsmodels on fixed inputs."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tunesmith.config import ObjectiveConfig
from tunesmith.evaluate.compare import compare, mcnemar, paired_bootstrap
from tunesmith.evaluate.objective import judge


def _fixed(n: int = 300, seed: int = 3):
    rng = random.Random(seed)
    labels = "abcde"
    golds = [rng.choice(labels) for _ in range(n)]
    base = [g if rng.random() < 0.55 else rng.choice(labels) for g in golds]
    tuned = [g if rng.random() < 0.8 else rng.choice(labels) for g in golds]
    return golds, base, tuned


@pytest.mark.parametrize("b_right,c_right", [(3, 9), (40, 70), (12, 12), (0, 5)])
def test_mcnemar_matches_statsmodels(b_right, c_right):
    from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

    golds = ["x"] * (b_right + c_right + 20)
    base = ["x"] * b_right + ["y"] * c_right + ["x"] * 10 + ["y"] * 10
    tuned = ["y"] * b_right + ["x"] * c_right + ["x"] * 10 + ["y"] * 10
    ours = mcnemar(golds, base, tuned)
    table = [[10, b_right], [c_right, 10]]  # rows: base right/wrong; cols: tuned right/wrong
    exact = b_right + c_right < 25
    ref = sm_mcnemar(table, exact=exact, correction=True)
    assert (ours["b"], ours["c"], ours["exact"]) == (b_right, c_right, exact)
    assert ours["p_value"] == pytest.approx(ref.pvalue, rel=1e-3, abs=1e-12)


def test_mcnemar_chi_square_matches_scipy():
    from scipy.stats import chi2

    golds, base, tuned = _fixed()
    ours = mcnemar(golds, base, tuned)
    assert not ours["exact"]
    b, c = ours["b"], ours["c"]
    stat = (abs(b - c) - 1) ** 2 / (b + c)
    assert ours["statistic"] == pytest.approx(stat, rel=1e-6)
    assert ours["p_value"] == pytest.approx(chi2.sf(stat, 1), rel=1e-3)


def test_paired_bootstrap_interval_matches_scipy():
    from scipy.stats import bootstrap

    golds, base, tuned = _fixed()
    ours = paired_bootstrap(golds, base, tuned, "accuracy", resamples=4000, seed=1)
    right_t = np.array([g == t for g, t in zip(golds, tuned)], dtype=float)
    right_b = np.array([g == b for g, b in zip(golds, base)], dtype=float)
    ref = bootstrap((right_t, right_b), lambda t, b, axis=-1: t.mean(axis=axis) - b.mean(axis=axis), paired=True,
                    n_resamples=4000, method="percentile", confidence_level=0.95, random_state=1)
    assert ours["diff"] == pytest.approx(right_t.mean() - right_b.mean(), abs=1e-6)
    assert ours["ci_low"] == pytest.approx(ref.confidence_interval.low, abs=0.01)
    assert ours["ci_high"] == pytest.approx(ref.confidence_interval.high, abs=0.01)
    assert ours["ci_low"] < ours["diff"] < ours["ci_high"]
    assert ours["p_value"] < 0.01


def test_no_difference_gives_a_wide_interval_around_zero():
    golds, base, _ = _fixed()
    same = paired_bootstrap(golds, base, list(base), "f1_macro", resamples=300)
    assert same["diff"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0 and same["p_value"] == 1.0


def test_mcnemar_for_accuracy_and_exact_match_bootstrap_for_every_other_metric():
    golds, base, tuned = _fixed(120)
    names = ["accuracy", "f1_macro", "precision_macro", "recall_macro"]
    cls = compare("classification", golds, base, tuned, names, resamples=200)
    assert cls["accuracy"]["test"] == "McNemar" and "bootstrap_p_value" in cls["accuracy"]
    assert cls["accuracy"]["p_value"] == mcnemar(golds, base, tuned)["p_value"]
    for name in names[1:]:  # not a count of correct examples: the bootstrap's own p-value, named
        alone = paired_bootstrap(golds, base, tuned, name, resamples=200)
        assert cls[name]["test"] == "paired bootstrap" and "mcnemar" not in cls[name]
        assert cls[name]["p_value"] == alone["p_value"]
    gen = compare("generation", golds, base, tuned, ["exact_match", "token_f1"], resamples=200)
    assert gen["exact_match"]["test"] == "McNemar" and gen["token_f1"]["test"] == "paired bootstrap"


def test_exact_match_mcnemar_counts_normalised_answers():
    """' The Cat.' is an exact match of 'the cat' (SQuAD normalisation): McNemar must count it right."""
    golds = ["the cat"] * 30
    gen = compare("generation", golds, ["dog"] * 30, [" The Cat."] * 30, ["exact_match"], resamples=200)
    assert gen["exact_match"]["mcnemar"]["c"] == 30 and gen["exact_match"]["p_value"] < 1e-6


def test_min_gain_can_be_judged_on_the_interval_lower_bound():
    comparison = {"accuracy": {"diff": 0.30, "ci_low": 0.18, "ci_high": 0.41}}
    base, tuned = {"accuracy": 0.5}, {"accuracy": 0.8}
    on_estimate = judge(ObjectiveConfig(metric="accuracy", min_gain=0.25), base, tuned, comparison)
    on_low = judge(ObjectiveConfig(metric="accuracy", min_gain=0.25, min_gain_on="ci_low"), base, tuned, comparison)
    assert on_estimate.met and not on_low.met
    assert on_low.to_json()["criteria"][0] == {"name": "accuracy_gain_ci_low", "value": 0.18, "target": 0.25,
                                               "op": ">=", "met": False}
