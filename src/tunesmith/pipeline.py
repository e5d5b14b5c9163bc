"""Stage order for `tunesmith run`, and the stage commands that work on a run directory."""

from __future__ import annotations

import sys
from pathlib import Path

from tunesmith import fsio
from tunesmith.config import Project, dump_config, load_config
from tunesmith.data.prepare import Splits, load_splits, prepare_data, save_splits
from tunesmith.errors import InputError, RunDirError
from tunesmith.evaluate.objective import judge
from tunesmith.evaluate.stage import eval_stage
from tunesmith.fairness.stage import audit_stage, headline_figures
from tunesmith.models.resolve import resolve_model
from tunesmith.optimize.stage import optimize_stage
from tunesmith.optimize.variants import VARIANTS
from tunesmith.report.build import report_stage
from tunesmith.runs import final_dir, interrupted_run, record_run, staged, staging_dir
from tunesmith.train import distributed
from tunesmith.train.stage import train_stage

EXIT_MET, EXIT_NOT_MET = 0, 3


def run(project: Project, out: Path | None = None, progress: bool = True, keep_failed: bool = False) -> dict:
    """data -> train -> eval -> verdict -> report, into a run directory that appears only when complete."""
    if distributed.launched():
        raise InputError("`tunesmith run` is single-process", "WORLD_SIZE",
                         "launch `tunesmith train` under torchrun, then `tunesmith eval RUN_DIR`")
    splits = prepare_data(project)  # bad data fails before anything is written
    resolve_model(project.model)    # so does an unknown model
    final = final_dir(project.base_dir, project.name, out)
    with staged(final, keep_failed) as run_dir:
        _start(project, splits, run_dir, final, progress)
        train_stage(project, splits, run_dir, progress=progress)
        summary = evaluate_and_judge(project, splits, run_dir, final, progress)
        if project.optimize.enabled:
            optimize_stage(project, splits, run_dir, progress)
        report_stage(run_dir)
    register(final)
    return summary


def train_only(project: Project, out: Path | None = None, progress: bool = True, keep_failed: bool = False) -> Path:
    """data -> train; the run directory can then be evaluated with `tunesmith eval`."""
    splits = prepare_data(project)
    resolve_model(project.model)
    final = final_dir(project.base_dir, project.name, out)
    distributed.init_from_env()
    if distributed.rank() != 0:
        # Other ranks train their data shard; rank 0 alone writes the run directory, except
        # that under FSDP each rank adds its optimiser shard to rank 0's checkpoint folders.
        train_stage(project, splits, staging_dir(final), progress=False)
        return final
    with staged(final, keep_failed) as run_dir:
        _start(project, splits, run_dir, final, progress)
        train_stage(project, splits, run_dir, progress=progress)
    return final


def resume_training(run_dir: Path, progress: bool = True, keep_failed: bool = False) -> Path:
    """Continue an interrupted run's training from its newest checkpoint; returns the run directory."""
    final, staging = interrupted_run(run_dir)
    project = load_config(staging / "config.yaml", check_files=False)
    splits = load_splits(staging / "data")
    distributed.init_from_env()
    if distributed.rank() != 0:
        train_stage(project, splits, staging, progress=False, resume=True)
        return final
    if progress:
        print(f"resuming training in {final}", file=sys.stderr)
    with staged(final, keep_failed, resume=True) as run_dir:
        train_stage(project, splits, run_dir, progress=progress, resume=True)
    return final


def evaluate_run(run_dir: Path, progress: bool = True) -> dict:
    """eval -> verdict -> report on an existing run directory that holds a trained model."""
    project, splits = open_run(run_dir)
    summary = evaluate_and_judge(project, splits, run_dir, Path(run_dir).resolve(), progress)
    report_stage(run_dir)
    register(run_dir)
    return summary


def compare_methods(project: Project, methods: list[str], out: Path, progress: bool = True) -> list[dict]:
    """Train and evaluate each method on the same splits and budget; write compare.json and compare.png.

    The config's learning rate is kept for its own method; the others use their method's default
    (a rate tuned for LoRA would wreck full fine-tuning)."""
    from tunesmith.evaluate.leaderboard import entry, rank, write
    from tunesmith.train.methods import DEFAULT_LR, METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(f"unknown method '{unknown[0] if unknown else ''}'", "--methods",
                         f"available: {', '.join(METHODS)}")
    prepare_data(project)  # bad data fails before any training
    out = Path(out).resolve()
    entries = []
    for method in methods:
        lr = project.train.learning_rate if method == project.train.method else DEFAULT_LR[method]
        variant = project.model_copy(update={"train": project.train.model_copy(update={"method": method,
                                                                                       "learning_rate": lr})})
        if progress:
            print(f"compare: {method} (learning rate {lr:g})", file=sys.stderr)
        run(variant, out / method, progress)
        entries.append(entry(method, out / method))
    ranked = rank(entries, project.task.type, project.eval.bootstrap_resamples, project.eval.seed)
    write(ranked, out)
    return ranked


def optimize_run(run_dir: Path, names: list[str] | None = None, progress: bool = True) -> dict:
    """optimize -> report on an evaluated run directory."""
    unknown = [n for n in names or [] if n not in VARIANTS]
    if unknown:
        raise InputError(f"unknown variant '{unknown[0]}'", "--variants", f"available: {', '.join(VARIANTS)}")
    project, splits = open_run(run_dir)
    result = optimize_stage(project, splits, Path(run_dir), progress, names)
    report_stage(run_dir)
    return result


def evaluate_and_judge(project: Project, splits: Splits, run_dir: Path, final: Path, progress: bool = True) -> dict:
    metrics = eval_stage(project, splits, run_dir, progress)
    audit = audit_stage(project, splits, run_dir, progress) if project.fairness.enabled else None
    summary = {
        "name": project.name, "model": project.model, "method": project.train.method,
        "objective_metric": project.objective.metric, "instruction": project.task.instruction,
        "objective": _verdict(project, metrics, audit),
        "metrics": {"baseline": metrics["baseline"], "finetuned": metrics["finetuned"]},
        "comparison": metrics.get("comparison", {}),
        "run_dir": str(final), "report": str(final / "report.html"),
        "training": _training_summary(run_dir),
    }
    if "forgetting" in metrics:
        summary["forgetting"] = metrics["forgetting"]
    if audit is not None:
        summary["fairness"] = headline_figures(audit)
    fsio.write_json(run_dir / "summary.json", summary)
    return summary


def audit_run(run_dir: Path, progress: bool = True) -> dict:
    """audit -> verdict (fairness constraints) -> report on an evaluated run directory."""
    project, splits = open_run(run_dir)
    if not project.fairness.enabled:
        raise InputError("no groups to audit", "fairness.group_fields",
                         "set fairness.group_fields (columns) or fairness.lexicon (identity terms) in the config")
    if not (Path(run_dir) / "metrics.json").is_file():
        raise RunDirError("the run has not been evaluated (no metrics.json)", str(run_dir), "run `tunesmith eval` first")
    audit = audit_stage(project, splits, Path(run_dir), progress)
    summary = fsio.read_json(Path(run_dir) / "summary.json")
    summary["objective"] = _verdict(project, fsio.read_json(Path(run_dir) / "metrics.json"), audit)
    summary["fairness"] = headline_figures(audit)
    fsio.write_json(Path(run_dir) / "summary.json", summary)
    report_stage(run_dir)
    register(run_dir)
    return {"audit": audit, "summary": summary}


def register(run_dir: Path) -> None:
    """Record the run in the registry; a registry problem never fails the run itself."""
    try:
        record_run(run_dir)
    except Exception as e:
        print(f"warning: run not recorded in the registry ({type(e).__name__}: {e})", file=sys.stderr)


def _verdict(project: Project, metrics: dict, audit: dict | None) -> dict:
    """The objective judged on the fine-tuned model's figures, fairness figures included."""
    figures = dict(metrics["finetuned"])
    if audit is not None:
        figures.update({k: v for k, v in headline_figures(audit).items() if v is not None})
    return judge(project.objective, metrics["baseline"], figures, metrics.get("comparison"))


def _training_summary(run_dir: Path) -> dict:
    """What the overfitting watch and pre-flight checks said, from train.json."""
    path = Path(run_dir) / "train.json"
    if not path.is_file():
        return {}
    train = fsio.read_json(path)
    stats = train.get("stats", {})
    return {"steps": stats.get("steps"), "best_step": stats.get("best_step"), "stop_reason": stats.get("stop_reason"),
            "overfitting": train.get("overfitting", []), "preflight": train.get("preflight", [])}


def open_run(run_dir: Path) -> tuple[Project, Splits]:
    """The saved config and curated splits of a run directory."""
    run_dir = Path(run_dir)
    for needed in ("config.yaml", "data/report.json", "model/tunesmith.json"):
        if not (run_dir / needed).exists():
            raise RunDirError(f"not a trained run directory (no {needed})", str(run_dir),
                              "give a folder made by `tunesmith run` or `tunesmith train`")
    return load_config(run_dir / "config.yaml", check_files=False), load_splits(run_dir / "data")


def exit_code(summary: dict) -> int:
    return EXIT_MET if summary["objective"]["met"] else EXIT_NOT_MET


def _start(project: Project, splits: Splits, run_dir: Path, final: Path, progress: bool) -> None:
    if progress:
        from tunesmith.data.stage import summary

        print(f"run directory: {final} (if interrupted: tunesmith train --resume {final})", file=sys.stderr)
        print("data: " + "; ".join(summary(splits, None)), file=sys.stderr)
    fsio.write_text(run_dir / "config.yaml", dump_config(project))
    save_splits(splits, run_dir / "data")
