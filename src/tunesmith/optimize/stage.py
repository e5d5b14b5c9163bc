"""The optimize stage: build each configured variant, measure it next to the fp32 fine-tuned model
on the same test examples, check it, pick the one to serve.

Writes RUN_DIR/variants/<name>/ (loadable folders, see engines.py), RUN_DIR/variants.json (one entry
per measured variant, fp32 first) and RUN_DIR/optimize.json (the selection, its reason, and the
variants that do not apply to this run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import shutil
import sys
import tempfile
from pathlib import Path

from tunesmith import fsio
from tunesmith.config import Project
from tunesmith.data.examples import Example
from tunesmith.data.prepare import Splits
from tunesmith.errors import ParityError, RunDirError
from tunesmith.evaluate.compare import compare
from tunesmith.evaluate.metrics_file import read_metrics
from tunesmith.evaluate.predictions_file import require_test_predictions
from tunesmith.evaluate.preference import scored_test
from tunesmith.optimize.measure import measure_variant
from tunesmith.optimize.result import OptimizeResult, SkippedVariant, VariantRow
from tunesmith.optimize.select import select_variant, variant_verdict
from tunesmith.optimize.source import open_source
from tunesmith.optimize.variants import NotApplicable, get_variant
from tunesmith.tasks.metrics import METRICS, compute_metrics

STAGING = ".building"  # variants/.building/<name>: this optimize's variants until they are measured


def optimize_stage(project: Project, splits: Splits, run_dir: Path, progress: bool = True,
                   names: list[str] | None = None) -> OptimizeResult:
    """Build, measure, check and select variants; writes variants.json and optimize.json."""
    run_dir = Path(run_dir)
    metrics = _evaluated(run_dir)
    rows = require_test_predictions(run_dir)
    test = scored_test(project, splits.test, rows, run_dir)  # checked before anything is built
    names = list(project.optimize.variants if names is None else names)
    _check_variants_folder(run_dir, names)
    # Built and measured in a staging folder, put in place only once measured: an interrupted or failed
    # optimize leaves the earlier variants and the figures that describe them as they were.
    staging = run_dir / "variants" / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    try:
        built, skipped = _build_all(project, splits, run_dir, names, progress)
        rows = _install(run_dir, _measure_all(project, run_dir, metrics, built, rows, test, progress))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):  # only when empty: made for the staging folder alone (all skipped,
            (run_dir / "variants").rmdir()  # or stopped before a variant was built)
    selected, reason = select_variant(rows)
    result = OptimizeResult(project.objective.metric, selected, reason,
                            next((r.path for r in rows if r.name == selected), None), skipped, rows)
    fsio.write_json(run_dir / "variants.json", [r.to_json() for r in rows])
    fsio.write_json(run_dir / "optimize.json", result.to_json())
    merged = next((r for r in rows if r.name == "merged"), None)
    if merged and not merged.parity_ok:
        raise ParityError(f"merging the adapter changed the model: prediction agreement {merged.agreement:.4f}, "
                          f"max logit difference {merged.notes['max_logit_diff']:.3g}", str(run_dir / "variants.json"),
                          "the merged variant is not offered; report this with the run's config")
    return result


def _check_variants_folder(run_dir: Path, names: list[str]) -> None:
    """RunDirError before anything is built when RUN_DIR/variants is not optimize's own: a link (whatever
    it points at would be written), a file, or a folder of a variant's name that optimize did not write
    (no variant.json: replacing it would delete the user's files)."""
    folder = run_dir / "variants"
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise RunDirError(f"{fsio.not_a_folder(folder) if folder.is_symlink() else 'is not a folder'}: optimize "
                          "writes its variants inside the run only", str(folder), "move it away, then rerun")
    for name in names:
        mine = folder / name
        if (mine.exists() or mine.is_symlink()) and not (mine.is_dir() and not mine.is_symlink()
                                                          and (mine / "variant.json").is_file()):
            raise RunDirError("holds files optimize did not write (no variant.json); left untouched", str(mine),
                              "move them away, then rerun")


def _evaluated(run_dir: Path) -> dict:
    for needed in ("metrics.json", "predictions/test.jsonl"):
        if not (run_dir / needed).is_file():
            raise RunDirError(f"the run has not been evaluated (no {needed})", str(run_dir),
                              "run `tunesmith eval RUN_DIR` first")
    metrics = read_metrics(run_dir)
    summary = run_dir / "summary.json"
    # Fairness constraints are judged on the audit of the fp32 model (variants are not re-audited).
    fairness = fsio.read_json(summary).get("fairness", {}) if summary.is_file() else {}
    metrics["finetuned"] = {**metrics["finetuned"], **{k: v for k, v in fairness.items() if v is not None}}
    return metrics


def _install(run_dir: Path, rows: list[VariantRow]) -> list[VariantRow]:
    """Move the measured variants from the staging folder to variants/<name>; the rows with their new paths.
    The earlier figures go first: a crash between the moves leaves no selection (fp32 is served), never
    figures that describe other folders."""
    for stale in ("optimize.json", "variants.json"):
        (run_dir / stale).unlink(missing_ok=True)
    installed = []
    for row in rows:
        if row.name != "fp32":
            fsio.replace_dir(run_dir / row.path, run_dir / "variants" / row.name)
            row = dataclasses.replace(row, path=f"variants/{row.name}")
        installed.append(row)
    return installed


def _build_all(project: Project, splits: Splits, run_dir: Path, names: list[str], progress: bool):
    """{name: (path relative to the run, notes)} of the variants built into the staging folder, fp32 first,
    and the skipped ones with reasons."""
    built: dict[str, tuple[str, dict]] = {"fp32": ("model", {})}
    skipped: list[SkippedVariant] = []
    source = open_source(run_dir, project, splits, progress) if names else None
    for name in names:
        final = run_dir / "variants" / STAGING / name
        partial = final.with_name(f".{name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            notes = get_variant(name).build(source, project.optimize, partial)
        except NotApplicable as e:
            skipped.append(SkippedVariant(name, str(e)))
            _say(progress, f"optimize: {name} skipped ({e})")
            continue
        finally:
            if not (partial / "variant.json").is_file():
                shutil.rmtree(partial, ignore_errors=True)
        fsio.share_like_umask(partial)
        fsio.replace_dir(partial, final)
        built[name] = (f"variants/{STAGING}/{name}", notes)
        _say(progress, f"optimize: built {name}")
    del source
    gc.collect()
    return built, skipped


def _measure_all(project: Project, run_dir: Path, metrics: dict, built: dict, predictions: list[dict],
                 test: list[Example], progress: bool) -> list[VariantRow]:
    """Each built variant measured on the test examples eval scored (`test`, in `predictions`' order)."""
    golds = [r["gold"] for r in predictions]
    base_texts = [r["baseline_prediction"] for r in predictions]
    task_type = project.task.type
    cfg = project.optimize
    rows: list[VariantRow] = []
    ref: list[str] | None = None  # the fp32 model's predictions, which every variant is compared with
    with tempfile.TemporaryDirectory() as tmp:
        test_file = Path(tmp) / "test.jsonl"
        fsio.write_jsonl(test_file, [ex.to_json() for ex in test])
        for name, (path, notes) in built.items():
            _say(progress, f"optimize: measuring {name}")
            figures = measure_variant(run_dir / path, test_file, cfg.throughput_batch_size, cfg.latency_samples,
                                      project.eval.max_new_tokens)
            ref = figures["predictions"] if ref is None else ref
            row = _row(project, task_type, name, path, figures, notes, golds, ref, base_texts, metrics, run_dir)
            rows.append(row)
            _say(progress, f"optimize: {name}: {project.objective.metric} {row.metrics[project.objective.metric]}"
                           f" ({row.quality_delta:+.4f}), p50 {row.latency_p50_ms} ms, "
                           f"{row.size_mb} MB, {'offered' if row.parity_ok else 'not offered'}")
    return rows


def _row(project: Project, task_type: str, name: str, path: str, figures: dict, notes: dict, golds: list[str],
         ref: list[str], base_texts: list[str], metrics: dict, run_dir: Path) -> VariantRow:
    cfg, metric = project.optimize, project.objective.metric
    preds = figures["predictions"]
    resamples, seed = project.eval.bootstrap_resamples, project.eval.seed
    delta = compare(task_type, golds, ref, preds, [metric], resamples, seed)[metric]
    agreement = sum(a == b for a, b in zip(preds, ref)) / max(len(ref), 1)
    row = VariantRow(name, path, _engine(run_dir / path), _size_mb(run_dir / path, metrics), figures["load_seconds"],
                     figures["latency_p50_ms"], figures["latency_p95_ms"], figures["throughput_per_s"],
                     figures["throughput_batch_size"], figures["peak_rss_mb"],
                     compute_metrics(task_type, golds, preds), delta["diff"], [delta["ci_low"], delta["ci_high"]],
                     round(agreement, 6), notes)
    row = dataclasses.replace(row, parity_ok=_check(row, cfg, METRICS[metric].higher_is_better))
    comparison = compare(task_type, golds, base_texts, preds, [metric], resamples, seed)
    verdict = variant_verdict(project.objective, metrics["baseline"], metrics["finetuned"], row, comparison)
    return dataclasses.replace(row, objective_met=verdict.met, criteria=verdict.to_json()["criteria"])


def _check(row: VariantRow, cfg, higher_is_better: bool) -> bool:
    """Parity for a merge or an export (they must not change the model); a bounded quality loss for the rest."""
    if row.name == "fp32":
        return True
    if row.notes.get("parity") == "exact":  # a merge or an export: it must not change the model
        return row.agreement >= cfg.parity.min_agreement and row.notes["max_logit_diff"] <= cfg.parity.max_logit_diff
    loss = -row.quality_delta if higher_is_better else row.quality_delta
    return loss <= cfg.max_quality_drop + 1e-12


def _engine(path: Path) -> str:
    meta = path / "variant.json"
    return fsio.read_json(meta)["engine"] if meta.is_file() else "run-model"


WEIGHT_FILES = ("*.safetensors", "model.bin", "*.onnx")  # model.bin: CTranslate2's own format (not a pickle)


def _size_mb(path: Path, metrics: dict) -> float:
    """What must be deployed: for the run's own model (an adapter needs its base) the eval stage's figure."""
    if not (path / "variant.json").is_file():
        return metrics["finetuned"]["model_size_mb"]
    weights = [p for pattern in WEIGHT_FILES for p in path.rglob(pattern)]
    return round(sum(p.stat().st_size for p in weights) / 2**20, 2)


def _say(progress: bool, line: str) -> None:
    if progress:
        print(line, file=sys.stderr)
