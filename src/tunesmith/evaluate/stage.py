"""The eval stage: baseline and fine-tuned model on the test split, same prompt, same examples."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith import fsio, hardware
from tunesmith.config import Project
from tunesmith.data.examples import Example
from tunesmith.data.prepare import Splits
from tunesmith.errors import RunDirError
from tunesmith.evaluate.compare import compare
from tunesmith.evaluate.forgetting import forgetting_report, probe_accuracy
from tunesmith.evaluate.harness import harness_report, run_harness
from tunesmith.evaluate.perplexity import answer_perplexity
from tunesmith.evaluate.predictions_file import PREDICTIONS
from tunesmith.evaluate.preference import held_out_pairs, pair_comparison, pair_figures, reference_rows
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
from tunesmith.train.finetuned import load_finetuned, read_meta


@dataclass
class EvalResult:
    """metrics.json: both models' figures on the same test examples, and what compares them. Optional
    sections are None when not configured (or not measurable) and are left out of the file."""

    baseline: dict
    finetuned: dict
    test_examples: int
    latency_ms: dict
    benchmarks: dict | None = None
    harness: dict | None = None
    judge: dict | None = None
    calibration: dict | None = None
    comparison: dict = field(default_factory=dict)
    forgetting: dict | None = None
    per_class: dict | None = None
    confusion_matrix: dict | None = None
    train: dict | None = None
    # Preference methods: test rows that no figure covers (a KTO row labelled undesirable), by reason.
    test_rows_not_scored: int | None = None
    test_rows_not_scored_by_reason: dict | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class _Context:
    """What evaluating either model shares."""

    project: Project
    tokenizer: object
    test: list[Example]
    bf16: bool
    progress: bool
    suites: list
    pairs: list = field(default_factory=list)  # test rows with a rejected answer (evaluate/preference.py)


@dataclass
class _ModelRun:
    """One model's predictions and figures on the test split (and benchmark suites, harness, probe)."""

    preds: Predictions
    figures: dict
    latency_samples: list[float]
    suites: list | None
    harness: dict | None
    probe: float | None  # forgetting-probe accuracy
    margins: list | None = None  # per test pair, log p(chosen) - log p(rejected)


def _check_outputs(run_dir: Path) -> None:
    """RunDirError when the run's model folder is gone, or `predictions` is there but is no folder."""
    if not (run_dir / "model").is_dir():
        raise RunDirError("the run's model folder is gone (was the run moved or removed?)", str(run_dir / "model"),
                          "give the run's current folder")
    predictions = run_dir / PREDICTIONS.parent
    if (predictions.exists() or predictions.is_symlink()) and not predictions.is_dir():
        raise RunDirError(f"{fsio.not_a_folder(predictions)}; eval writes the test predictions there",
                          str(predictions), "move it away, then run the eval again")


def eval_stage(project: Project, splits: Splits, run_dir: Path, progress: bool = True) -> EvalResult:
    """Write metrics.json and predictions/test.jsonl; return the figures."""
    test = splits.test[: project.eval.max_examples] if project.eval.max_examples else splits.test
    pairs = held_out_pairs(project, test)
    test, unscored = reference_rows(project, test)
    if not test:  # every figure below is a mean over test rows
        raise RunDirError("no test row to score: the curated test split is empty"
                          + (" or none of its rows has a reference answer" if unscored else ""),
                          str(run_dir / "data" / "test.jsonl"), "run the data stage again (`tunesmith run`)")
    _check_outputs(run_dir)  # said before minutes of scoring, not after metrics.json is written
    model, tokenizer, fmt, base_path = load_finetuned(run_dir / "model")
    ctx = _Context(project, tokenizer, test, hardware.use_bf16(project.eval.precision, hardware.device()), progress,
                   load_suites(project.benchmarks, tokenizer), pairs)
    kind = read_meta(run_dir / "model")["kind"]
    tuned = _run_model(ctx, model.to(hardware.device()), fmt, "fine-tuned", _sizes(run_dir / "model", base_path, kind))
    if kind == "prompt":  # the weights are the base model's: no second load, no second probe
        base_model = model
    else:
        del model
        hardware.release_free_memory()  # scoring's freed heap must not sit under the second model
        base_model = load_model(base_path).to(hardware.device())
    # The baseline is the base model with the user's own prompt, whatever the method changed.
    base_fmt = build_format(project.task, fmt.labels, tokenizer)
    base = _run_model(ctx, base_model, base_fmt, "baseline", _sizes(base_path, base_path, "full"),
                      probe=tuned.probe if kind == "prompt" else None)
    result = _compare_runs(ctx, fmt, base, tuned)
    if unscored is not None:
        result.test_rows_not_scored, result.test_rows_not_scored_by_reason = sum(unscored.values()), unscored
    train = run_dir / "train.json"
    if train.is_file():
        result.train = fsio.read_json(train)["stats"]
        result.finetuned.update({k: result.train[k] for k in ("train_seconds", "tokens_per_second",
                                                              "trainable_params", "peak_rss_mb")})
        # Absent from runs trained before it was recorded; None (not measured) without a GPU.
        result.finetuned["gpu_peak_mb"] = result.train.get("gpu_peak_mb")
    _check_outputs(run_dir)  # the run folder removed while it was scored: never made again, half
    fsio.write_json(run_dir / "metrics.json", result.to_json())
    rows = _prediction_rows(test, tuned.preds, base.preds)
    if ctx.pairs:  # the pairs are the test rows with a rejected answer, in order
        paired = [(r, e) for r, e in zip(rows, test) if e.rejected is not None]
        for (row, ex), margin, base_margin in zip(paired, tuned.margins, base.margins):
            row.update(rejected=ex.rejected, margin=round(margin, 6), baseline_margin=round(base_margin, 6))
    fsio.write_jsonl(run_dir / PREDICTIONS, rows)
    return result


def _run_model(ctx: _Context, model, fmt, name: str, sizes: dict, probe: float | None = None) -> _ModelRun:
    """Predict the test split with `model` and measure it: task metrics, throughput, latency, perplexity
    (generation), sizes, and the benchmark suites, harness and forgetting probe when configured."""
    project, tok = ctx.project, ctx.tokenizer
    started = time.perf_counter()
    preds = predict(model, tok, fmt, ctx.test, batch_size=project.eval.batch_size,
                    max_new_tokens=project.eval.max_new_tokens, autocast=ctx.bf16,
                    progress=f"eval {name}" if ctx.progress else None, sampling=project.eval.generation)
    figures = _figures(fmt, ctx.test, preds, time.perf_counter() - started, project.eval.batch_size)
    figures.update(_latency(model, tok, fmt, ctx.test, project, ctx.bf16))
    if not fmt.labels:  # generation: how likely each model finds the reference answers
        figures["perplexity"] = answer_perplexity(model, tok, fmt, ctx.test, project.eval.batch_size, ctx.bf16)
    figures.update(sizes)
    margins = None
    if ctx.pairs:  # preference pairs: both models' margins, by the same definition
        margins, pair_metrics = pair_figures(model, tok, fmt, ctx.pairs, project.eval.batch_size)
        figures.update(pair_metrics)
    suites = predict_suites(model, tok, ctx.suites, project.eval.batch_size, project.eval.max_new_tokens, ctx.bf16,
                            name, ctx.progress) if ctx.suites else None
    if probe is None and project.eval.forgetting_probe:
        probe = probe_accuracy(model, tok, fmt.max_length, ctx.bf16)
    return _ModelRun(preds, figures, figures.pop("latency_samples_ms", []), suites, _harness(project, model, tok),
                     probe, margins)


def _compare_runs(ctx: _Context, fmt, base: _ModelRun, tuned: _ModelRun) -> EvalResult:
    """The two runs side by side, and the paired figures that compare them."""
    project, test = ctx.project, ctx.test
    golds = [e.target for e in test]
    result = EvalResult(base.figures, tuned.figures, len(test),
                        {"baseline": base.latency_samples, "finetuned": tuned.latency_samples})
    if ctx.suites:
        result.benchmarks = suite_report(ctx.suites, base.suites, tuned.suites, project.eval.bootstrap_resamples,
                                         project.eval.seed)
    if project.eval.harness.tasks:
        result.harness = harness_report(base.harness, tuned.harness,
                                        None if tuned.harness is not None else SOFT_PROMPT_SKIP)
    if project.eval.judge.enabled:
        result.judge = _judge(project.eval.judge, test, base.preds, tuned.preds)
    calibration = {"baseline": _calibration(test, base.preds), "finetuned": _calibration(test, tuned.preds)}
    if all(calibration.values()):
        result.calibration = calibration
        for name, figures in (("baseline", result.baseline), ("finetuned", result.finetuned)):
            figures["ece"] = calibration[name]["ece"]
    result.comparison = compare(fmt.task_type, golds, base.preds.texts, tuned.preds.texts, metric_names(fmt.task_type),
                                project.eval.bootstrap_resamples, project.eval.seed)
    if ctx.pairs:
        result.comparison.update(pair_comparison(base.margins, tuned.margins, project.eval.bootstrap_resamples,
                                                 project.eval.seed))
    if project.eval.forgetting_probe:
        result.forgetting = forgetting_report(base.probe, tuned.probe)
    if fmt.labels:
        result.per_class = per_class(golds, tuned.preds.texts, fmt.labels)
        result.confusion_matrix = {"labels": fmt.labels,
                                   "baseline": confusion_matrix(golds, base.preds.texts, fmt.labels),
                                   "finetuned": confusion_matrix(golds, tuned.preds.texts, fmt.labels)}
    return result


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
    figures["throughput_eps"] = hardware.examples_per_second(len(test), seconds)
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
                                         max_new_tokens=project.eval.max_new_tokens, autocast=bf16,
                                         sampling=project.eval.generation),
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
