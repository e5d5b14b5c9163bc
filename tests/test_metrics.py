"""Metric functions against hand-computed values."""

from __future__ import annotations

import pytest

from tunesmith.config import Bound, ObjectiveConfig
from tunesmith.evaluate.objective import judge
from tunesmith.tasks.metrics import (
    accuracy,
    compute_metrics,
    confusion_matrix,
    exact_match,
    f1_macro,
    metric_names,
    per_class,
    rouge_l_pair,
)


def test_classification_metrics():
    golds = ["a", "a", "b", "b", "c"]
    preds = ["a", "b", "b", "b", "a"]
    assert accuracy(golds, preds) == pytest.approx(0.6)
    # a: p=1/2 r=1/2 f=.5; b: p=2/3 r=1 f=.8; c: 0 -> macro (0.5+0.8+0)/3
    assert f1_macro(golds, preds) == pytest.approx((0.5 + 0.8) / 3)
    table = per_class(golds, preds)
    assert table["b"] == {"precision": pytest.approx(2 / 3, abs=1e-6), "recall": 1.0, "f1": 0.8, "support": 2}
    assert confusion_matrix(golds, preds, ["a", "b", "c"]) == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_generation_metrics():
    assert exact_match(["The Cat."], ["cat"]) == 1.0
    assert rouge_l_pair("the cat sat on the mat", "the cat on the mat") == pytest.approx(2 * 1 * (5 / 6) / (1 + 5 / 6))
    assert rouge_l_pair("a b", "c d") == 0.0


def test_registry_by_task():
    assert "accuracy" in metric_names("classification") and "rouge_l" not in metric_names("classification")
    assert set(compute_metrics("generation", ["x"], ["x"])) == set(metric_names("generation"))


def test_objective_verdict():
    objective = ObjectiveConfig(metric="accuracy", target=0.8, min_gain=0.2,
                                constraints={"latency_p95_ms": Bound(max=100), "f1_macro": Bound(min=0.5)})
    verdict = judge(objective, {"accuracy": 0.5}, {"accuracy": 0.85, "latency_p95_ms": 150.0, "f1_macro": 0.9})
    by_name = {c.name: c for c in verdict.criteria}
    assert by_name["accuracy"].met and by_name["accuracy_gain"].value == pytest.approx(0.35)
    assert not by_name["latency_p95_ms"].met and by_name["f1_macro"].met
    assert verdict.met is False
    assert judge(ObjectiveConfig(metric="accuracy", target=0.9), {}, {}).met is False  # unmeasured fails
    assert verdict.to_json()["criteria"][0] == {"name": "accuracy", "value": 0.85, "target": 0.8, "op": ">=",
                                                "met": True}
    # An infinite gain (a baseline perplexity that overflowed) is no measurement: summary.json writes it as
    # null, and every reader checks met against the value it reads back.
    inf = judge(ObjectiveConfig(metric="perplexity", min_gain=1.0), {"perplexity": float("inf")}, {"perplexity": 5.0})
    assert inf.criteria[0].value == float("inf") and inf.met is False


def test_f1_micro_equals_accuracy_inside_the_label_set_and_drops_outside():
    from tunesmith.tasks.metrics import accuracy, f1_micro

    golds, preds = ["a", "b", "a", "c"], ["a", "a", "a", "c"]
    assert f1_micro(golds, preds) == pytest.approx(accuracy(golds, preds))
    # An answer outside the labels counts against recall but not precision.
    assert f1_micro(["a", "b"], ["a", "zzz"]) == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def test_expected_calibration_error_by_hand():
    from tunesmith.tasks.metrics import expected_calibration_error

    correct = [True, False, True, True]
    confidences = [0.95, 0.9, 0.55, 0.6]
    out = expected_calibration_error(correct, confidences, bins=10)
    # bin (0.9, 1.0]: 1 of 1 right at 0.95; bin (0.8, 0.9]: 0 of 1 at 0.9; bins 0.5-0.6: right at 0.55, 0.6
    expected = (abs(1 - 0.95) + abs(0 - 0.9) + abs(1 - 0.55) + abs(1 - 0.6)) / 4
    assert out["ece"] == pytest.approx(expected, abs=1e-6)
    assert sum(b["count"] for b in out["bins"]) == 4
    # a NaN confidence is in no bin and weighs in none (it diluted the ECE: 0.475, not 0.95); 1 + 1e-9 is 1
    assert expected_calibration_error([False, True], [0.95, float("nan")])["ece"] == pytest.approx(0.95)
    assert expected_calibration_error([True], [1.0 + 1e-9])["ece"] == pytest.approx(0.0)


def test_bleu_and_chrf_are_sacrebleu_on_a_unit_scale():
    import sacrebleu

    from tunesmith.tasks.metrics import compute_metrics

    golds = ["the cat sat on the mat", "a dog barked at night"]
    preds = ["the cat sat on a mat", "the dog barked at night"]
    figures = compute_metrics("generation", golds, preds)
    assert figures["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [golds]).score / 100, abs=1e-6)
    assert figures["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [golds]).score / 100, abs=1e-6)
