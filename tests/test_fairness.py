"""Fairness: tunesmith's figures against an independent Fairlearn computation on fixed predictions,
the data audit against scipy/sklearn, mitigations, probes, and `tunesmith run/audit` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import PROJECT, make_texts, write_jsonl
from tunesmith.cli import app
from tunesmith.data.examples import Example
from tunesmith.data.lexicon import find_term, swap
from tunesmith.data.mitigate import counterfactual_augment, reweighing
from tunesmith.fairness.counterfactual import counterfactual_pairs, flip_rate
from tunesmith.fairness.data_audit import association
from tunesmith.fairness.metrics import disparities, per_group, with_intervals
from tunesmith.fairness.threshold import optimize_thresholds

runner = CliRunner()


@pytest.fixture()
def fixed():
    rng = np.random.default_rng(3)
    n = 400
    groups = rng.choice(["a", "b", "c"], n).tolist()
    golds = rng.choice(["pos", "neg", "mid"], n).tolist()
    bias = {"a": 0.7, "b": 0.45, "c": 0.3}
    preds = [("pos" if rng.random() < bias[g] else rng.choice(["neg", "mid"])) if y == "pos" else
             ("pos" if rng.random() < bias[g] / 3 else y) for g, y in zip(groups, golds)]
    return golds, preds, groups


def test_disparities_match_fairlearn(fixed):
    from fairlearn.metrics import (
        MetricFrame,
        demographic_parity_difference,
        demographic_parity_ratio,
        equal_opportunity_difference,
        equalized_odds_difference,
        false_positive_rate,
        selection_rate,
        true_positive_rate,
    )

    golds, preds, groups = fixed
    y = (np.array(golds) == "pos").astype(int)
    p = (np.array(preds) == "pos").astype(int)
    ours = disparities(golds, preds, groups, "pos")
    assert ours["demographic_parity_difference"] == pytest.approx(
        demographic_parity_difference(y, p, sensitive_features=groups))
    assert ours["demographic_parity_ratio"] == pytest.approx(demographic_parity_ratio(y, p, sensitive_features=groups))
    assert ours["equal_opportunity_difference"] == pytest.approx(
        equal_opportunity_difference(y, p, sensitive_features=groups))
    assert ours["equalized_odds_difference"] == pytest.approx(
        equalized_odds_difference(y, p, sensitive_features=groups))
    frame = MetricFrame(metrics={"selection_rate": selection_rate, "tpr": true_positive_rate,
                                 "fpr": false_positive_rate},
                        y_true=y, y_pred=p, sensitive_features=groups)
    table = per_group(golds, preds, groups, "pos")
    for g in ("a", "b", "c"):
        for k in ("selection_rate", "tpr", "fpr"):
            assert table[g][k] == pytest.approx(frame.by_group.loc[g, k], abs=1e-6)
    ci = with_intervals(golds, preds, groups, "pos", {"a", "b", "c"}, resamples=300)
    d = ci["demographic_parity_difference"]
    assert d["ci_low"] < d["value"] < d["ci_high"] and d["ci_low"] > 0  # a real gap (0.7 vs 0.3 recall)
    # The documented departure: a group with no positives has no TPR (Fairlearn scores it 0, a gap of 1.0)
    g, pr, grp = ["a", "b", "b", "a", "a", "b", "b"], ["a", "b", "a", "b", "a", "a", "b"], list("xxzyyzy")
    theirs = equal_opportunity_difference((np.array(g) == "a").astype(int), (np.array(pr) == "a").astype(int),
                                          sensitive_features=grp)
    assert theirs == pytest.approx(1.0) and disparities(g, pr, grp, "a")["equal_opportunity_difference"] == 0.5


def test_small_groups_are_left_out(fixed):
    golds, preds, groups = fixed
    assert disparities(golds, preds, groups, "pos", keep={"a", "b"}) == disparities(
        [g for g, k in zip(golds, groups) if k != "c"], [p for p, k in zip(preds, groups) if k != "c"],
        [k for k in groups if k != "c"], "pos")


def test_association_matches_scipy_and_sklearn():
    from scipy.stats import chi2_contingency
    from sklearn.metrics import mutual_info_score

    groups = ["x"] * 30 + ["y"] * 30
    labels = ["t"] * 25 + ["f"] * 5 + ["t"] * 10 + ["f"] * 20
    a = association(groups, labels)
    chi2, p, _, _ = chi2_contingency([[5, 25], [20, 10]], correction=False)
    assert a["chi2"] == pytest.approx(chi2, abs=1e-3) and a["p_value"] == pytest.approx(p, rel=1e-3)
    assert a["mutual_information"] == pytest.approx(mutual_info_score(groups, labels), abs=1e-6)


def test_reweighing_makes_group_and_label_independent():
    groups = ["x"] * 40 + ["y"] * 20
    labels = ["t"] * 30 + ["f"] * 10 + ["t"] * 5 + ["f"] * 15
    w = np.array(reweighing(groups, labels))
    assert w.mean() == pytest.approx(1.0)
    g, y = np.array(groups), np.array(labels)
    total = w.sum()
    for gg in ("x", "y"):
        for yy in ("t", "f"):
            joint = w[(g == gg) & (y == yy)].sum() / total
            assert joint == pytest.approx(w[g == gg].sum() / total * w[y == yy].sum() / total, abs=1e-9)


def test_lexicon_finds_longest_terms_and_swaps_keep_case():
    assert find_term("My African American neighbour", "race_ethnicity") == "african american"
    assert find_term("a straightforward answer", "sexual_orientation") is None  # whole words only
    assert swap("Muslim people and muslim food", "religion", "jewish") == "Jewish people and jewish food"
    extra = counterfactual_augment([Example("the muslim card", "alpha", "t:1")], ["religion"], seed=1)
    assert len(extra) == 1 and extra[0].augmented == "counterfactual" and extra[0].target == "alpha"
    assert find_term(extra[0].input, "religion") not in (None, "muslim")


def test_counterfactual_flip_rate():
    rows = [Example("a christian asks", "x", "1"), Example("no identity here", "y", "2")]
    pairs = counterfactual_pairs(rows, ["religion"], limit=5, per_example=3)
    assert len(pairs) == 3 and all(p[0] == 0 for p in pairs)
    result = flip_rate(rows, ["x", "y"], pairs, ["x", "z", "x"])
    assert result["flip_rate"] == pytest.approx(1 / 3) and result["flipped_examples"][0]["swapped_prediction"] == "z"
    # the limit counts examples, checked before each: 0 swaps none (it swapped one), 1 stops after the first
    two = rows + [Example("a muslim asks", "x", "3")]
    assert counterfactual_pairs(two, ["religion"], limit=0) == []
    assert {p[0] for p in counterfactual_pairs(two, ["religion"], limit=1)} == {0}


def test_threshold_optimizer_narrows_the_gap():
    rng = np.random.default_rng(0)
    n = 600
    groups = rng.choice(["a", "b"], n).tolist()
    positive = (rng.random(n) < 0.5).tolist()
    # Scores biased upwards for group a: more of a is selected at the plain 0.5 threshold.
    scores = [min(1, max(0, (0.65 if y else 0.35) + (0.2 if g == "a" else -0.1) + rng.normal(0, 0.15)))
              for g, y in zip(groups, positive)]
    before = [s >= 0.5 for s in scores]
    after = optimize_thresholds(scores[:300], positive[:300], groups[:300], scores[300:], groups[300:],
                                "demographic_parity")
    golds = ["p" if y else "n" for y in positive[300:]]
    gap = lambda dec: disparities(golds, ["p" if d else "n" for d in dec], groups[300:], "p")[  # noqa: E731
        "demographic_parity_difference"]
    assert gap(after) < gap(before[300:]) / 2


def test_weighted_loss_is_the_weighted_token_mean(tiny_model):
    from tunesmith.models.load import load_model
    from tunesmith.train.batching import Encoded, collate
    from tunesmith.train.loss import supervised_loss

    model = load_model(tiny_model)
    items = [Encoded([5, 6, 7, 8], 2, weight=3.0), Encoded([9, 10, 11], 1, weight=1.0)]
    batch = collate(items, 0)
    weighted, _ = supervised_loss(model, batch)
    per_row = [supervised_loss(model, collate([it], 0))[0] * (len(it.ids) - it.n_prompt) for it in items]
    tokens = [len(it.ids) - it.n_prompt for it in items]
    expected = (3.0 * per_row[0] + 1.0 * per_row[1]) / (3.0 * tokens[0] + 1.0 * tokens[1])
    assert torch.allclose(weighted, expected, atol=1e-5)
    plain = collate([Encoded([5, 6, 7, 8], 2), Encoded([9, 10, 11], 1)], 0)
    assert "weights" not in plain


def _rows(n: int, seed: int) -> list[dict]:
    rows = make_texts(n, seed)
    for i, r in enumerate(rows):
        r["grp"] = "north" if i % 2 else "south"
        if i % 3 == 0:
            r["text"] = f"{r['text']} {'christian' if i % 2 else 'muslim'}"
    return rows


def _fairness_run(tmp_path, tiny_model, rows, constraint: str, fairness: str):
    """`tunesmith run` of a project of `rows` (train 40, test 30) gated on `constraint` and audited as
    `fairness` says; (the CLI result, the run directory)."""
    write_jsonl(tmp_path / "train.jsonl", rows(40, 1))
    write_jsonl(tmp_path / "test.jsonl", rows(30, 2))
    text = PROJECT.format(model=tiny_model, method="lora").replace(
        "  target: 0.0\n", f"  target: 0.0\n  constraints:\n    {constraint}\n")
    (tmp_path / "project.yaml").write_text(text + "fairness:\n" + fairness, encoding="utf-8")
    out = tmp_path / "run"
    return runner.invoke(app, ["run", str(tmp_path / "project.yaml"), "--out", str(out), "--quiet"]), out


def test_run_audits_groups_and_gates_on_fairness(tmp_path, tiny_model):
    result, out = _fairness_run(tmp_path, tiny_model, _rows, "demographic_parity_difference: {max: 0.0}",
                                "  group_fields: [grp]\n  lexicon: [religion]\n  positive_label: alpha\n"
                                "  min_group_size: 5\n  bootstrap_resamples: 200\n  stereotype_pairs: 6\n"
                                "  mitigation: reweight\n")
    audit = json.loads((out / "audit.json").read_text())
    for key in ("demographic_parity_difference", "equal_opportunity_difference", "equalized_odds_difference"):
        assert {"value", "ci_low", "ci_high"} <= set(audit[key])
    assert set(audit["groups"]) == {"grp", "religion"} and set(audit["groups"]["grp"]) == {"north", "south"}
    assert {"n", "accuracy", "tpr", "fpr", "selection_rate"} <= set(audit["groups"]["grp"]["north"])
    assert audit["data"]["grp"]["groups"]["north"]["rows"] > 0 and "association" in audit["data"]["religion"]
    assert audit["counterfactual"]["swaps"] > 0 and audit["stereotype"]["baseline"]["pairs"] == 6
    t = audit["threshold_optimizer"]
    assert t["label"] == "alpha" and ("skipped" in t or t["after"]["accuracy"] is not None)
    train = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert any(r.get("weight", 1.0) != 1.0 for r in train) and all(r["attributes"]["grp"] for r in train)
    summary = json.loads((out / "summary.json").read_text())
    gate = next(c for c in summary["objective"]["criteria"] if c["name"] == "demographic_parity_difference")
    assert gate["value"] == audit["demographic_parity_difference"]["value"]
    assert result.exit_code == (0 if gate["met"] else 3), result.output
    assert "Fairness audit" in (out / "report.html").read_text()
    again = runner.invoke(app, ["audit", str(out), "--quiet"])
    assert again.exit_code in (0, 3) and "demographic_parity_difference:" in again.output
    # A column no row has, or a label the model does not know, would audit nothing and say all is well.
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    # Thresholds decide one label: with every label audited they are not fitted, and audit.json says why.
    every_label = {**config, "fairness": {**config["fairness"], "positive_label": None, "stereotype_pairs": 0}}
    (out / "config.yaml").write_text(yaml.safe_dump(every_label))
    again = runner.invoke(app, ["audit", str(out), "--quiet"])
    skipped = json.loads((out / "audit.json").read_text())["threshold_optimizer"]
    assert again.exit_code in (0, 3) and "set fairness.positive_label" in skipped["skipped"], again.output
    assert "threshold optimizer not run" in again.output
    for key, value, said in (("group_fields", ["nope"], "column 'nope' has no value in any of the"),
                             ("positive_label", "zeta", "'zeta' is not one of the model's labels")):
        edited = {**config, "fairness": {**config["fairness"], key: value}}
        (out / "config.yaml").write_text(yaml.safe_dump(edited))
        refused = runner.invoke(app, ["audit", str(out), "--quiet"])
        assert refused.exit_code == 2 and said in refused.stderr and f"fairness.{key}" in refused.stderr


def test_fairness_config_errors(tmp_path, tiny_model):
    write_jsonl(tmp_path / "train.jsonl", make_texts(30, 1))
    write_jsonl(tmp_path / "test.jsonl", make_texts(9, 2))
    text = PROJECT.format(model=tiny_model, method="lora").replace(
        "  target: 0.0\n", "  target: 0.0\n  constraints:\n    equalized_odds_difference: {max: 0.1}\n")
    (tmp_path / "project.yaml").write_text(text, encoding="utf-8")
    result = runner.invoke(app, ["data", "check", str(tmp_path / "project.yaml")])
    assert result.exit_code == 2 and "objective.constraints.equalized_odds_difference" in result.output
    assert "fairness.group_fields" in result.output


def test_a_group_column_no_row_has_is_refused_before_training(tmp_path, tiny_model):
    write_jsonl(tmp_path / "train.jsonl", _rows(40, 1))
    write_jsonl(tmp_path / "test.jsonl", _rows(30, 2))
    text = PROJECT.format(model=tiny_model, method="lora") + "fairness:\n  group_fields: [region]\n"
    (tmp_path / "project.yaml").write_text(text, encoding="utf-8")
    result = runner.invoke(app, ["run", str(tmp_path / "project.yaml"), "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 2 and "column 'region' has no value in any of the 30 test rows" in result.stderr
    assert not (tmp_path / "run").exists()
    (tmp_path / "project.yaml").write_text(text.replace("[region]", "[grp]\n  positive_label: zeta"))
    result = runner.invoke(app, ["run", str(tmp_path / "project.yaml"), "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 2 and "'zeta' is not one of the model's labels" in result.stderr


def test_apply_mitigation_reweights_or_augments_the_training_rows():
    from tunesmith.config import FairnessConfig
    from tunesmith.data.mitigate import apply_mitigation

    rows = [Example(f"row {i} from a {'christian' if i % 3 else 'muslim'} writer", "t" if i % 4 else "f", f"r{i}",
                    attributes={"grp": "x" if i < 20 else "y"}) for i in range(30)]
    reweighted = apply_mitigation(rows, FairnessConfig(group_fields=["grp"], mitigation="reweight"))
    expected = reweighing([e.attributes["grp"] for e in rows], [e.target for e in rows])
    assert [e.weight for e in reweighted] == [round(w, 6) for w in expected]
    assert [e.input for e in reweighted] == [e.input for e in rows] and len(set(expected)) > 1
    augmented = apply_mitigation(rows, FairnessConfig(lexicon=["religion"], mitigation="augment"))
    assert augmented[:30] == rows and augmented[30:] == counterfactual_augment(rows, ["religion"])
    assert len(augmented) == 60 and all(e.augmented == "counterfactual" for e in augmented[30:])
    assert apply_mitigation(rows, FairnessConfig(group_fields=["grp"])) == rows


def test_thresholds_leave_a_group_validation_lacks_to_the_model_and_say_so():
    """Fairlearn decides every row of a group it was not fitted on negative; those rows keep the model's
    own decisions, and audit.json names the group."""
    from types import SimpleNamespace

    from tunesmith.config.stages import FairnessConfig
    from tunesmith.fairness.stage import _thresholds

    rng = np.random.default_rng(1)
    def rows(groups):
        return [Example(f"t{i}", "p" if rng.random() < 0.5 else "q", "x", attributes={"grp": g})
                for i, g in enumerate(groups)]
    val, test = rows(["n", "s"] * 40), rows(["n", "s"] * 20 + ["east"] * 6)
    def scored(examples):
        probs = [float(np.clip((0.7 if e.target == "p" else 0.3) + rng.normal(0, 0.2), 0, 1)) for e in examples]
        return SimpleNamespace(probabilities=[{"p": x, "q": 1 - x} for x in probs],
                               texts=["p" if x >= 0.5 else "q" for x in probs])
    tuned = scored(test)
    tuned.texts[-6:] = ["p"] * 6  # the model selects every east row
    cfg = FairnessConfig(group_fields=["grp"], min_group_size=2)
    out = _thresholds(cfg, SimpleNamespace(validation=val), test, [e.target for e in test], tuned, scored(val), "p", 0)
    assert out["unfitted_groups"] == ["east"] and "east" in out["note"]
    assert out["after"]["demographic_parity_ratio"] > 0  # east's rows were not all turned negative
    assert all(round(v, 6) == v for v in out["before"].values() if v is not None)
    solo = _thresholds(cfg, SimpleNamespace(validation=val), test[-6:], [e.target for e in test[-6:]],
                       SimpleNamespace(probabilities=tuned.probabilities[-6:], texts=tuned.texts[-6:]),
                       scored(val), "p", 0)
    assert "fewer than two groups" in solo["skipped"]


def test_a_run_with_one_group_is_reported_not_crashed(tmp_path, tiny_model):
    def solo(n: int, seed: int) -> list[dict]:
        return [{**r, "grp": "solo"} for r in make_texts(n, seed)]
    result, out = _fairness_run(tmp_path, tiny_model, solo, "demographic_parity_ratio: {min: 0.8}",
                                "  group_fields: [grp]\n  positive_label: alpha\n  min_group_size: 3\n"
                                "  bootstrap_resamples: 100\n")
    assert result.exit_code == 3, result.output  # the ratio could not be measured: not met, and said why
    audit = json.loads((out / "audit.json").read_text())
    ratio = audit["demographic_parity_ratio"]
    assert ratio["value"] is None and "two groups" in ratio["why"]
    assert "fewer than two groups" in audit["threshold_optimizer"]["skipped"]
    assert "threshold post-processing not run" in (out / "report.html").read_text()


def test_group_values_in_messages_are_cut_and_counted():
    from tunesmith.data.groups import shown_groups

    said = shown_groups(["x" * 5000, "b", "c", "d", "e", "f", "g"])
    assert said == "x" * 57 + "..., b, c, d, e and 2 more"
