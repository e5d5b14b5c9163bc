"""The eval stage: baseline and fine-tuned model on the test split, same prompt, same examples."""

from __future__ import annotations

import time
from pathlib import Path

from tunesmith import fsio, hardware
from tunesmith.config import Project
from tunesmith.data.examples import Example
from tunesmith.data.prepare import Splits
from tunesmith.evaluate.compare import compare
from tunesmith.evaluate.forgetting import forgetting_report, probe_accuracy
from tunesmith.evaluate.harness import harness_report, run_harness
from tunesmith.evaluate.perplexity import answer_perplexity
from tunesmith.evaluate.speed import latency_ms
from tunesmith.evaluate.suites import load_suites, predict_suites, suite_report
from tunesmith.models.load import load_model, plain_lm
from tunesmith.tasks.metrics import (
    compute_metrics,
    confusion_matrix,
    expected_calibration_error,
    metric_names,
    per_class,
)
from tunesmith.tasks.predict import Predictions, predict
from tunesmith.tasks.prompts import build_format
from tunesmith.train.finetuned import load_finetuned


def eval_stage(project: Project, splits: Splits, run_dir: Path, progress: bool = True) -> dict:
    """Write metrics.json and predictions/test.jsonl; return the metrics."""
    test = splits.test[: project.eval.max_examples] if project.eval.max_examples else splits.test
    model, tokenizer, fmt, base_path = load_finetuned(run_dir / "model")
    bf16 = hardware.use_bf16(project.eval.precision, hardware.device())
    model.to(hardware.device())

    seconds: dict[str, float] = {}

    def run(m, name: str, prompt=fmt) -> Predictions:
        started = time.perf_counter()
        out = predict(m, tokenizer, prompt, test, batch_size=project.eval.batch_size,
                      max_new_tokens=project.eval.max_new_tokens, autocast=bf16,
                      progress=f"eval {name}" if progress else None)
        seconds[name] = time.perf_counter() - started
        return out

    tuned = run(model, "fine-tuned")
    tuned_figures = _figures(fmt, test, tuned, seconds["fine-tuned"], project.eval.batch_size)
    tuned_figures.update(_latency(model, tokenizer, fmt, test, project, bf16))
    if not fmt.labels:  # generation: how likely each model finds the reference answers
        tuned_figures["perplexity"] = answer_perplexity(model, tokenizer, fmt, test, project.eval.batch_size, bf16)
    suites = load_suites(project.benchmarks, tokenizer)
    suite_args = (tokenizer, suites, project.eval.batch_size, project.eval.max_new_tokens, bf16)
    tuned_suites = predict_suites(model, *suite_args, "fine-tuned", progress)
    tuned_harness = _harness(project, model, tokenizer)
    kind = fsio.read_json(run_dir / "model/tunesmith.json")["kind"]
    tuned_figures.update(_sizes(run_dir / "model", base_path, kind))
    probe = project.eval.forgetting_probe
    tuned_probe = probe_accuracy(model, tokenizer, fmt.max_length, bf16) if probe else None
    if kind == "prompt":  # the weights are the base model's: no second load, no second probe
        base_model = model
    else:
        del model
        base_model = load_model(base_path).to(hardware.device())
    # The baseline is the base model with the user's own prompt, whatever the method changed.
    base_fmt = build_format(project.task, fmt.labels, tokenizer)
    base = run(base_model, "baseline", base_fmt)
    base_figures = _figures(fmt, test, base, seconds["baseline"], project.eval.batch_size)
    base_figures.update(_latency(base_model, tokenizer, base_fmt, test, project, bf16))
    if not fmt.labels:
        base_figures["perplexity"] = answer_perplexity(base_model, tokenizer, base_fmt, test,
                                                       project.eval.batch_size, bf16)
    base_figures.update(_sizes(base_path, base_path, "full"))
    metrics = {"baseline": base_figures, "finetuned": tuned_figures, "test_examples": len(test),
               "latency_ms": {k: f.pop("latency_samples_ms", []) for k, f in (("baseline", base_figures),
                                                                                ("finetuned", tuned_figures))}}
    if suites:
        base_suites = predict_suites(base_model, *suite_args, "baseline", progress)
        metrics["benchmarks"] = suite_report(suites, base_suites, tuned_suites, project.eval.bootstrap_resamples,
                                             project.eval.seed)
    if project.eval.harness.tasks:
        base_harness = _harness(project, base_model, tokenizer)
        metrics["harness"] = harness_report(base_harness, tuned_harness,
                                            None if tuned_harness is not None else SOFT_PROMPT_SKIP)
    if project.eval.judge.enabled:
        metrics["judge"] = _judge(project.eval.judge, test, base, tuned)
    calibration = {name: _calibration(test, p) for name, p in (("baseline", base), ("finetuned", tuned))}
    if all(calibration.values()):
        metrics["calibration"] = calibration
        for name, key in (("baseline", "baseline"), ("finetuned", "finetuned")):
            metrics[key]["ece"] = calibration[name]["ece"]
    golds = [e.target for e in test]
    metrics["comparison"] = compare(fmt.task_type, golds, base.texts, tuned.texts, metric_names(fmt.task_type),
                                    project.eval.bootstrap_resamples, project.eval.seed)
    if probe:
        base_probe = tuned_probe if kind == "prompt" else probe_accuracy(base_model, tokenizer, fmt.max_length, bf16)
        metrics["forgetting"] = forgetting_report(base_probe, tuned_probe)
    if fmt.labels:
        metrics["per_class"] = per_class(golds, tuned.texts, fmt.labels)
        metrics["confusion_matrix"] = {"labels": fmt.labels,
                                       "baseline": confusion_matrix(golds, base.texts, fmt.labels),
                                       "finetuned": confusion_matrix(golds, tuned.texts, fmt.labels)}
    train = run_dir / "train.json"
    if train.is_file():
        metrics["train"] = fsio.read_json(train)["stats"]
        metrics["finetuned"].update({k: metrics["train"][k] for k in ("train_seconds", "tokens_per_second",
                                                                    "trainable_params", "peak_rss_mb")})
    fsio.write_json(run_dir / "metrics.json", metrics)
    fsio.write_jsonl(run_dir / "predictions" / "test.jsonl", _prediction_rows(test, tuned, base))
    return metrics


SOFT_PROMPT_SKIP = ("fine-tuned model not run: its soft prompt is outside the weights, and the harness calls "
                    "a plain causal LM")


def _harness(project: Project, model, tokenizer) -> dict | None:
    """lm-evaluation-harness figures of `model` (None when not configured, or for soft prompts)."""
    if not project.eval.harness.tasks:
        return None
    plain = plain_lm(model)
    return None if plain is None else run_harness(plain, tokenizer, project.eval.harness, hardware.device().type)


def _figures(fmt, test: list[Example], preds: Predictions, seconds: float, batch_size: int) -> dict:
    """Task metrics plus throughput: examples per second at the eval batch size."""
    figures = compute_metrics(fmt.task_type, [e.target for e in test], preds.texts)
    figures["throughput_eps"] = round(len(test) / seconds, 2) if seconds > 0 else None
    figures["throughput_batch_size"] = batch_size
    return figures


def _judge(cfg, test: list[Example], base: Predictions, tuned: Predictions) -> dict:
    from tunesmith.evaluate.judge import judge_answers, make_asker

    n = cfg.max_examples
    result = judge_answers(make_asker(cfg), cfg.rubric, [e.input for e in test[:n]], [e.target for e in test[:n]],
                           base.texts[:n], tuned.texts[:n], cfg.mode)
    return {"judge": cfg.endpoint or cfg.model, "single": result.single, "pairwise": result.pairwise}


def _calibration(test: list[Example], preds: Predictions) -> dict | None:
    """ECE and reliability-diagram bins from the probability of each predicted label."""
    if not preds.probabilities:
        return None
    correct = [p == e.target for p, e in zip(preds.texts, test)]
    confidences = [probs[p] for p, probs in zip(preds.texts, preds.probabilities)]
    return expected_calibration_error(correct, confidences)


def _latency(model, tokenizer, fmt, test: list[Example], project: Project, bf16: bool) -> dict:
    """p50/p95 milliseconds per example at batch 1, on the first `latency_samples` test examples."""
    return latency_ms(lambda ex: predict(model, tokenizer, fmt, [ex], batch_size=1,
                                         max_new_tokens=project.eval.max_new_tokens, autocast=bf16),
                      test[: project.eval.latency_samples])


def _sizes(model_dir: Path, base_path: Path, kind: str) -> dict:
    """Size of what must be deployed: base + adapter for adapters, the weights for full models."""
    own = _mb(model_dir)
    total = own + (_mb(base_path) if kind in ("adapter", "prompt") else 0.0)
    return {"model_size_mb": round(total, 2), "weights_size_mb": round(own, 2)}


def _mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) / 2**20


def _prediction_rows(test: list[Example], tuned: Predictions, base: Predictions) -> list[dict]:
    rows = []
    for i, ex in enumerate(test):
        row = {"text": ex.input, "gold": ex.target, "prediction": tuned.texts[i],
               "baseline_prediction": base.texts[i], "source": ex.source}
        if tuned.probabilities:
            row["correct"] = tuned.texts[i] == ex.target
            row["confidence"] = tuned.probabilities[i][tuned.texts[i]]
        rows.append(row)
    return rows
