"""The audit stage: data audit, per-group model figures with intervals, counterfactual and
stereotype probes, threshold post-processing; writes RUN_DIR/audit.json.

audit.json: `groups` ({attribute: {group: figures}} for the headline label), the headline
`demographic_parity_difference`, `demographic_parity_ratio`, `equal_opportunity_difference` and
`equalized_odds_difference` (each {value, ci_low, ci_high}: the worst attribute and label of
interest), `counterfactual_flip_rate`, and the details under `attributes`, `data`,
`counterfactual`, `threshold_optimizer` and `stereotype`.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith import fsio, hardware
from tunesmith.config import FairnessConfig, Project
from tunesmith.data.groups import MISSING, attributes, eligible, shown_groups
from tunesmith.data.lexicon import CATEGORIES
from tunesmith.data.prepare import Splits
from tunesmith.errors import InputError
from tunesmith.evaluate.predictions_file import read_test_predictions
from tunesmith.fairness.counterfactual import counterfactual_pairs, flip_rate
from tunesmith.fairness.data_audit import audit_attribute
from tunesmith.fairness.metrics import HEADLINE, disparities, per_group, with_intervals
from tunesmith.tasks.predict import predict


def audited_rows(project: Project, splits: Splits) -> list:
    """The test rows the model audit scores (eval.max_examples of them, when set)."""
    return splits.test[: project.eval.max_examples] if project.eval.max_examples else splits.test


def check_groups(cfg: FairnessConfig, test: list, labels: list[str] | None = None) -> None:
    """InputError naming the key for a fairness.group_fields column no test row has (every row would sit
    in one '(missing)' group and the audit would find nothing to compare, as if all were well), or a
    fairness.positive_label that is not one of `labels` (when given)."""
    absent = next((f for f in cfg.group_fields if test and all((e.attributes or {}).get(f, MISSING) == MISSING
                                                               for e in test)), None)
    if absent is not None:
        raise InputError(f"column '{absent}' has no value in any of the {len(test)} test rows",
                         "fairness.group_fields", "name a column the data has (the group of each row)")
    unknown = [x for x in cfg.positive_labels or [] if labels and x not in labels]
    if unknown:
        raise InputError(f"'{unknown[0]}' is not one of the model's labels", "fairness.positive_label",
                         f"labels: {', '.join(labels[:10])}{', ...' if len(labels) > 10 else ''}")


def audit_stage(project: Project, splits: Splits, run_dir: Path, progress: bool = True) -> dict:
    """Audit the run's fine-tuned model and data; returns (and writes) audit.json's content."""
    from tunesmith.train.finetuned import load_finetuned

    cfg, run_dir = project.fairness, Path(run_dir)
    test = audited_rows(project, splits)
    check_groups(cfg, test)
    model, tokenizer, fmt, base_path = load_finetuned(run_dir / "model")
    check_groups(cfg, test, fmt.labels)
    bf16 = hardware.use_bf16(project.eval.precision, hardware.device())
    model.to(hardware.device())

    def run(examples, name):
        return predict(model, tokenizer, fmt, examples, batch_size=project.eval.batch_size, autocast=bf16,
                       progress=f"audit {name}" if progress else None)
    tuned = run(test, "test")
    golds = [e.target for e in test]
    labels = cfg.positive_labels or list(fmt.labels)
    attrs = attributes(test, cfg.group_fields, cfg.lexicon)
    baseline = _baseline_predictions(run_dir, len(test))
    model_audit = {a: _attribute_audit(golds, tuned.texts, baseline, groups, labels, cfg, project.eval.seed)
                   for a, groups in attrs.items()}
    audit = {"positive_labels": labels, "min_group_size": cfg.min_group_size, "attributes": model_audit}
    audit.update(_headline(model_audit))
    audit["data"] = _data_audit(splits, cfg)
    pairs = counterfactual_pairs(test, list(cfg.lexicon) or list(CATEGORIES), cfg.counterfactual_examples)
    swapped = run([p[3] for p in pairs], "counterfactuals").texts if pairs else []
    audit["counterfactual"] = flip_rate(test, tuned.texts, pairs, swapped)
    audit["counterfactual_flip_rate"] = audit["counterfactual"]["flip_rate"]
    if cfg.threshold_optimizer != "off":
        if why := _no_thresholds(labels, splits):
            audit["threshold_optimizer"] = {"constraint": cfg.threshold_optimizer, "skipped": why}
        else:
            val = run(splits.validation, "validation")
            audit["threshold_optimizer"] = _thresholds(cfg, splits, test, golds, tuned, val, labels[0],
                                                       project.eval.seed)
    if cfg.stereotype_pairs:
        audit["stereotype"] = _stereotype(model, tokenizer, base_path, cfg.stereotype_pairs)
    fsio.write_json(run_dir / "audit.json", audit)
    return audit


def headline_figures(audit: dict) -> dict:
    """The figures the objective's constraints can name."""
    out = {k: audit[k]["value"] for k in HEADLINE if isinstance(audit.get(k), dict)}
    out["counterfactual_flip_rate"] = audit.get("counterfactual_flip_rate")
    return out


def _attribute_audit(golds, preds, baseline, groups, labels, cfg, seed) -> dict:
    keep = eligible(groups, cfg.min_group_size)
    out = {"compared_groups": sorted(keep), "small_groups": sorted(set(groups) - keep), "labels": {}}
    for lab in labels:
        entry = {"groups": per_group(golds, preds, groups, lab),
                 "finetuned": with_intervals(golds, preds, groups, lab, keep, cfg.bootstrap_resamples, seed)}
        if baseline:
            entry["baseline"] = disparities(golds, baseline, groups, lab, keep)
        out["labels"][lab] = entry
    return out


def _headline(model_audit: dict) -> dict:
    """Worst case over attributes and labels of interest: largest differences, smallest ratio."""
    out: dict = {"groups": {}}
    worst_key = None
    for fig in HEADLINE:
        rows = [(a, lab, e["finetuned"][fig]) for a, m in model_audit.items() for lab, e in m["labels"].items()
                if e["finetuned"][fig]["value"] is not None]
        if not rows:  # a constraint on it is then not met: audit.json says why
            out[fig] = {"value": None, "ci_low": None, "ci_high": None,
                        "why": "no attribute has two groups to compare: groups of fairness.min_group_size test "
                               "rows (for the ratio, one selecting the label; for opportunity and odds, with rows "
                               "of the outcome)"}
            continue
        pick = min if fig.endswith("ratio") else max
        a, lab, value = pick(rows, key=lambda r: r[2]["value"])
        out[fig] = {**value, "attribute": a, "label": lab}
        if fig == "demographic_parity_difference":
            worst_key = lab
    for a, m in model_audit.items():
        lab = worst_key if worst_key in m["labels"] else next(iter(m["labels"]))
        out["groups"][a] = m["labels"][lab]["groups"]
    return out


def _data_audit(splits: Splits, cfg) -> dict:
    train = [e for e in splits.train if not e.augmented]
    labels = [e.target for e in train]
    return {a: audit_attribute(groups, labels, cfg.under_represented, cfg.min_group_size)
            for a, groups in attributes(train, cfg.group_fields, cfg.lexicon).items()}


def _no_thresholds(labels: list[str], splits: Splits) -> str | None:
    """Why group thresholds cannot be fitted (said in audit.json and the report, not skipped silently)."""
    if len(labels) != 1:
        return (f"thresholds decide one label against the rest, and {len(labels)} labels are audited: "
                "set fairness.positive_label to one label")
    if not splits.validation:
        return "there is no validation split to fit the thresholds on"
    return None


def _thresholds(cfg, splits, test, golds, tuned, val, positive, seed) -> dict:
    """Fairness and accuracy of the model's own decisions and after group-specific thresholds; `skipped`
    says why none were fitted."""
    from tunesmith.fairness.threshold import optimize_thresholds

    attr = (cfg.group_fields or list(cfg.lexicon))[0]
    val_groups = attributes(splits.validation, cfg.group_fields, cfg.lexicon)[attr]
    test_groups = attributes(test, cfg.group_fields, cfg.lexicon)[attr]
    keep = eligible(test_groups, cfg.min_group_size)
    head = {"attribute": attr, "label": positive, "constraint": cfg.threshold_optimizer}
    if len(keep) < 2:
        return {**head, "skipped": f"fewer than two groups of {attr} have {cfg.min_group_size} or more test rows "
                "(fairness.min_group_size): there are no groups to bring together"}
    degenerate = sorted(g for g in set(val_groups)
                        if len({e.target == positive for e, gg in zip(splits.validation, val_groups) if gg == g}) < 2)
    if degenerate:
        return {**head, "skipped": f"validation rows of group(s) {shown_groups(degenerate)} all have the same "
                "outcome; thresholds cannot be fitted"}
    decided = optimize_thresholds([p[positive] for p in val.probabilities],
                                  [e.target == positive for e in splits.validation],
                                  val_groups, [p[positive] for p in tuned.probabilities], test_groups,
                                  cfg.threshold_optimizer, seed)
    # A group the validation split lacks has no threshold (Fairlearn decides all its rows negative): its rows
    # keep the model's own decisions, and the groups are named.
    fitted = set(val_groups)
    decided = [d if g in fitted else t == positive for d, g, t in zip(decided, test_groups, tuned.texts)]
    # After post-processing only "positive or not" is decided; other labels keep the model's choice.
    other = "(not " + positive + ")"
    after = [positive if d else (t if t != positive else other) for d, t in zip(decided, tuned.texts)]

    def figures(preds):
        acc = sum(p == g for p, g in zip(preds, golds)) / max(len(golds), 1)
        return {"accuracy": round(acc, 6), **disparities(golds, preds, test_groups, positive, keep)}
    out = {**head, "before": figures(tuned.texts), "after": figures(after)}
    if unfitted := sorted(set(test_groups) - fitted):
        out["unfitted_groups"] = unfitted[:100]
        out["note"] = (f"group(s) {shown_groups(unfitted)} have no validation rows: no threshold was fitted for "
                       "them, and their test rows keep the model's own decisions")
    return out


def _stereotype(model, tokenizer, base_path, n: int) -> dict:
    """Before (base model) and after fine-tuning, on the same pairs."""
    from tunesmith.fairness.stereotype import load_pairs, stereotype_preference
    from tunesmith.models.load import load_model

    pairs = load_pairs(n)
    tuned = stereotype_preference(model, tokenizer, pairs)
    base = stereotype_preference(load_model(base_path), tokenizer, pairs)
    return {"baseline": base, "finetuned": tuned}


def _baseline_predictions(run_dir: Path, n: int) -> list[str] | None:
    rows = read_test_predictions(run_dir) or []
    return [r["baseline_prediction"] for r in rows] if len(rows) == n else None
