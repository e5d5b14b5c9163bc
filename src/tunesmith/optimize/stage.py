"""The optimize stage: build each configured variant, measure it next to the fp32 fine-tuned model
on the same test examples, check it, pick the one to serve.

Writes RUN_DIR/variants/<name>/ (loadable folders, see engines.py), RUN_DIR/variants.json (one entry
per measured variant, fp32 first) and RUN_DIR/optimize.json (the selection, its reason, and the
variants that do not apply to this run).
"""

from __future__ import annotations

import gc
import shutil
import sys
import tempfile
from pathlib import Path

from tunesmith import fsio
from tunesmith.config import Project
from tunesmith.data.prepare import Splits
from tunesmith.errors import ParityError, RunDirError
from tunesmith.evaluate.compare import compare
from tunesmith.optimize.measure import measure_variant
from tunesmith.optimize.select import select_variant, variant_verdict
from tunesmith.optimize.source import open_source
from tunesmith.optimize.variants import NotApplicable, get_variant
from tunesmith.tasks.metrics import METRICS, compute_metrics


def optimize_stage(project: Project, splits: Splits, run_dir: Path, progress: bool = True,
                   names: list[str] | None = None) -> dict:
    """Build, measure, check and select variants; returns the content of optimize.json plus `variants`."""
    run_dir = Path(run_dir)
    metrics = _evaluated(run_dir)
    names = list(project.optimize.variants if names is None else names)
    built, skipped = _build_all(project, splits, run_dir, names, progress)
    entries = _measure_all(project, run_dir, metrics, built, progress)
    selected, reason = select_variant(entries)
    result = {"objective_metric": project.objective.metric, "selected": selected, "reason": reason,
              "selected_path": next((e["path"] for e in entries if e["name"] == selected), None),
              "skipped": skipped}
    fsio.write_json(run_dir / "variants.json", entries)
    fsio.write_json(run_dir / "optimize.json", result)
    merged = next((e for e in entries if e["name"] == "merged"), None)
    if merged and not merged["parity_ok"]:
        raise ParityError(f"merging the adapter changed the model: prediction agreement {merged['agreement']:.4f}, "
                          f"max logit difference {merged['max_logit_diff']:.3g}", str(run_dir / "variants.json"),
                          "the merged variant is not offered; report this with the run's config")
    return {**result, "variants": entries}


def _evaluated(run_dir: Path) -> dict:
    for needed in ("metrics.json", "predictions/test.jsonl"):
        if not (run_dir / needed).is_file():
            raise RunDirError(f"the run has not been evaluated (no {needed})", str(run_dir),
                              "run `tunesmith eval RUN_DIR` first")
    metrics = fsio.read_json(run_dir / "metrics.json")
    summary = run_dir / "summary.json"
    # Fairness constraints are judged on the audit of the fp32 model (variants are not re-audited).
    fairness = fsio.read_json(summary).get("fairness", {}) if summary.is_file() else {}
    metrics["finetuned"] = {**metrics["finetuned"], **{k: v for k, v in fairness.items() if v is not None}}
    return metrics


def _build_all(project: Project, splits: Splits, run_dir: Path, names: list[str], progress: bool):
    """{name: (relative path, notes)} of the built variants, fp32 first, and the skipped ones with reasons."""
    built: dict[str, tuple[str, dict]] = {"fp32": ("model", {})}
    skipped = []
    source = open_source(run_dir, project, splits, progress) if names else None
    for name in names:
        final = run_dir / "variants" / name
        partial = final.with_name(f".{name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            notes = get_variant(name).build(source, project.optimize, partial)
        except NotApplicable as e:
            skipped.append({"name": name, "reason": str(e)})
            _say(progress, f"optimize: {name} skipped ({e})")
            continue
        finally:
            if not (partial / "variant.json").is_file():
                shutil.rmtree(partial, ignore_errors=True)
        fsio.replace_dir(partial, final)
        built[name] = (f"variants/{name}", notes)
        _say(progress, f"optimize: built {name}")
    del source
    gc.collect()
    return built, skipped


def _measure_all(project: Project, run_dir: Path, metrics: dict, built: dict, progress: bool) -> list[dict]:
    rows = fsio.read_jsonl(run_dir / "predictions" / "test.jsonl")
    golds = [r["gold"] for r in rows]
    base_texts = [r["baseline_prediction"] for r in rows]
    task_type = project.task.type
    test = fsio.read_jsonl(run_dir / "data" / "test.jsonl")[: len(rows)]
    cfg = project.optimize
    entries: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        test_file = Path(tmp) / "test.jsonl"
        fsio.write_jsonl(test_file, test)
        for name, (path, notes) in built.items():
            _say(progress, f"optimize: measuring {name}")
            figures = measure_variant(run_dir / path, test_file, cfg.throughput_batch_size, cfg.latency_samples,
                                      project.eval.max_new_tokens)
            ref = entries[0]["_predictions"] if entries else figures["predictions"]
            entry = _entry(project, task_type, name, path, figures, notes, golds, ref, base_texts, metrics, run_dir)
            entries.append(entry)
            _say(progress, f"optimize: {name}: {project.objective.metric} {entry['metrics'][project.objective.metric]}"
                           f" ({entry['quality_delta']:+.4f}), p50 {entry['latency_p50_ms']} ms, "
                           f"{entry['size_mb']} MB, {'offered' if entry['parity_ok'] else 'not offered'}")
    for e in entries:
        e.pop("_predictions")
    return entries


def _entry(project: Project, task_type: str, name: str, path: str, figures: dict, notes: dict, golds: list[str],
           ref: list[str], base_texts: list[str], metrics: dict, run_dir: Path) -> dict:
    cfg, metric = project.optimize, project.objective.metric
    preds = figures["predictions"]
    resamples, seed = project.eval.bootstrap_resamples, project.eval.seed
    delta = compare(task_type, golds, ref, preds, [metric], resamples, seed)[metric]
    agreement = sum(a == b for a, b in zip(preds, ref)) / max(len(ref), 1)
    entry = {"name": name, "path": path, "engine": _engine(run_dir / path),
             "size_mb": _size_mb(run_dir / path, metrics), "load_seconds": figures["load_seconds"],
             "latency_p50_ms": figures["latency_p50_ms"], "latency_p95_ms": figures["latency_p95_ms"],
             "throughput_per_s": figures["throughput_per_s"], "throughput_batch_size": figures["throughput_batch_size"],
             "peak_rss_mb": figures["peak_rss_mb"], "metrics": compute_metrics(task_type, golds, preds),
             "quality_delta": delta["diff"], "quality_delta_ci": [delta["ci_low"], delta["ci_high"]],
             "agreement": round(agreement, 6), **notes, "_predictions": preds}
    entry["parity_ok"] = _check(name, entry, cfg, METRICS[metric].higher_is_better)
    comparison = compare(task_type, golds, base_texts, preds, [metric], resamples, seed)
    verdict = variant_verdict(project.objective, metrics["baseline"], metrics["finetuned"], entry, comparison)
    entry.update(objective_met=verdict["met"], criteria=verdict["criteria"])
    return entry


def _check(name: str, entry: dict, cfg, higher_is_better: bool) -> bool:
    """Parity for a merge or an export (they must not change the model); a bounded quality loss for the rest."""
    if name == "fp32":
        return True
    if entry.get("parity") == "exact":  # a merge or an export: it must not change the model
        return entry["agreement"] >= cfg.parity.min_agreement and entry["max_logit_diff"] <= cfg.parity.max_logit_diff
    loss = -entry["quality_delta"] if higher_is_better else entry["quality_delta"]
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
