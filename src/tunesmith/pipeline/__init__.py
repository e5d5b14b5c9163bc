"""Stage order for `tunesmith run`, and the stage commands that work on a run directory."""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import ValidationError

from tunesmith import fsio, hardware
from tunesmith.config import OptimizeConfig, Project, derive, dump_config, load_config
from tunesmith.data.prepare import (
    Splits,
    check_data,
    check_method_rows,
    file_sha256,
    load_splits,
    prepare_data_apart,
    save_splits,
    test_removals,
)
from tunesmith.data.stage import data_inputs
from tunesmith.errors import DataError, InputError, RunDirError, StageError, Terminated, TunesmithError
from tunesmith.evaluate.metrics_file import read_metrics
from tunesmith.evaluate.objective import Verdict, judge
from tunesmith.evaluate.predictions_file import PREDICTIONS
from tunesmith.evaluate.preference import held_out_pairs, reference_rows
from tunesmith.evaluate.run_diff import flatten
from tunesmith.evaluate.stage import eval_stage
from tunesmith.evaluate.text import text_eval_stage
from tunesmith.fairness.stage import audit_stage, audited_rows, check_groups, headline_figures
from tunesmith.models.resolve import resolve_model
from tunesmith.optimize.result import OptimizeResult
from tunesmith.optimize.stage import optimize_stage
from tunesmith.registry import METHOD_SPECS, metric_names
from tunesmith.report.build import report_stage
from tunesmith.run_registry import record_run
from tunesmith.runs import (
    check_evaluated,
    check_out,
    check_runs_folder,
    final_dir,
    interrupted_run,
    is_run_dir,
    read_summary,
    reading_run_files,
    resume_command,
    run_lock,
    staged,
    staging_dir,
)
from tunesmith.train import distributed
from tunesmith.train.stage import check_method_fits, train_stage

EXIT_MET, EXIT_NOT_MET = 0, 3


def run(project: Project, out: Path | None = None, progress: bool = True, keep_failed: bool = False,
        overwrite: bool = False) -> dict:
    """data -> train -> eval -> verdict -> report, into a run directory that appears when training is done.

    A stage after training that fails leaves the run directory in place with what finished, the failure
    recorded in summary.json, and raises StageError naming the command that reruns it.
    """
    if distributed.launched():
        raise InputError("`tunesmith run` is single-process", "WORLD_SIZE",
                         "launch `tunesmith train` under torchrun, then `tunesmith eval RUN_DIR`")
    final = final_dir(project.base_dir, project.name, out)
    check_out(final, overwrite, given=out is not None)  # a refused --out fails before any work
    _check_inputs_outside(project, final)
    splits = prepare_data_apart(project)  # bad data fails before anything is written
    # and a test split no figure can score (it failed in eval, after the whole training): the rows eval scores
    scored = splits.test[: project.eval.max_examples] if project.eval.max_examples else splits.test
    if project.task.type != "text" and not reference_rows(project, scored)[0]:
        raise DataError("no test row can be scored: every test row is a KTO row labelled undesirable (label: "
                        "false), which no figure scores", "data.test",
                        hint="add test rows with label: true, or {prompt, chosen, rejected} pairs")
    if METHOD_SPECS[project.train.method].preference:  # a pair metric with no test pairs, refused now too
        held_out_pairs(project, scored)
    if project.fairness.enabled:        # and a group column no row has, or an unknown positive label
        check_groups(project.fairness, audited_rows(project, splits), _labels(project, splits))
    resolve_model(project.model)    # so does an unknown model
    with staged(final, keep_failed, overwrite=overwrite) as run_dir:
        _start(project, splits, run_dir, final, progress)
        train_stage(project, splits, run_dir, progress=progress)
        hardware.release_free_memory()  # training's freed heap must not sit under eval's two models
        summary, failure = _after_training(project, splits, run_dir, final, progress)
    register(final)
    if failure is not None:
        raise failure
    return summary


def _labels(project: Project, splits: Splits) -> list[str] | None:
    """The labels a classification run will know: the declared ones, else those of its rows."""
    if project.task.type != "classification":
        return None
    return list(project.task.labels or sorted({e.target for e in splits.train + splits.test}))


def _after_training(project: Project, splits: Splits, run_dir: Path, final: Path,
                    progress: bool) -> tuple[dict | None, StageError | None]:
    """eval -> optimize -> report. The first stage that fails stops the chain but is returned, not
    raised, so the caller still puts the trained model in place."""
    stages = [("eval", lambda: evaluate_and_judge(project, splits, run_dir, final, progress))]
    if project.optimize.enabled:
        stages.append(("optimize", lambda: optimize_stage(project, splits, run_dir, progress)))
    stages.append(("report", lambda: report_stage(run_dir)))
    summary = None
    for name, stage in stages:
        try:
            result = stage()
        except BaseException as e:  # Ctrl-C included: the trained model is work to keep
            return summary, _record_failure(project, run_dir, final, name, e)
        summary = result if name == "eval" else summary
        hardware.release_free_memory()  # what the stage freed goes back before the next one allocates
    return summary, None


def _record_failure(project: Project, run_dir: Path, final: Path, stage: str, e: BaseException) -> StageError:
    """Write the failed stage into summary.json; the StageError to raise once the run is in place."""
    if isinstance(e, KeyboardInterrupt):
        cause, code = ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)
    elif isinstance(e, TunesmithError):
        # Exit 1 even when the cause was bad input: the run itself was made, and a script reading the
        # code must not take "trained, then the judge refused the key" for "nothing was done".
        cause, code = e.line().removeprefix("error: "), 1
    else:
        cause, code = f"{type(e).__name__}: {e}", 1
    cause = " ".join(cause.split())[:500]  # one line, whatever the exception said
    rerun = _rerun_commands(project, stage, final)
    path = run_dir / "summary.json"
    try:
        summary = fsio.read_json(path, dict) if path.is_file() else _unevaluated_summary(project, run_dir, final)
        summary["failed"] = {"stage": stage, "error": cause, "rerun": rerun}
        fsio.write_json(path, summary)
    except Exception as w:  # e.g. a full disk: the model must still be put in place, so only say so
        cause += f"; summary.json not updated ({type(w).__name__}: {w})"
    error = StageError(f"the {stage} stage failed after training ({cause}); the trained model is kept", str(final),
                       "rerun it with " + " then ".join(f"`{c}`" for c in rerun), exit_code=code)
    error.__cause__ = e
    return error


def _rerun_commands(project: Project, stage: str, final: Path) -> list[str]:
    """The commands that finish a run whose `stage` failed (optimize and eval rebuild the report)."""
    if stage == "eval":
        return [f"tunesmith eval {final}"] + ([f"tunesmith optimize {final}"] if project.optimize.enabled else [])
    return [f"tunesmith {stage} {final}"]


def _unevaluated_summary(project: Project, run_dir: Path, final: Path) -> dict:
    """What summary.json can say before eval finished: the run's identity and its training."""
    return {"name": project.name, "model": project.model, "method": project.train.method,
            "objective_metric": project.objective.metric, "instruction": project.task.instruction,
            "run_dir": str(final), "training": _training_summary(run_dir)}


def clear_failure(run_dir: Path, stages: tuple[str, ...]) -> None:
    """Drop summary.json's failure record once one of `stages` has been rerun successfully."""
    path = Path(run_dir) / "summary.json"
    summary = fsio.read_json(path, dict) if path.is_file() else {}
    if summary.get("failed", {}).get("stage") in stages:
        del summary["failed"]
        fsio.write_json(path, summary)


def report_run(run_dir: Path) -> Path:
    """report on an evaluated run directory; returns the report page."""
    check_evaluated(run_dir)
    if not (Path(run_dir) / "data" / "report.json").is_file():  # the page's data section
        raise RunDirError("the run lacks data/report.json", str(Path(run_dir) / "data" / "report.json"),
                          "restore it from a copy of the run, or run `tunesmith run` again")
    _check_predictions(run_dir)
    with run_lock(Path(run_dir).resolve()):
        with reading_run_files(run_dir):
            page = report_stage(run_dir)
        clear_failure(run_dir, ("report",))
    return page


def _check_predictions(run_dir: Path) -> None:
    """RunDirError for an evaluated run without its predictions (eval writes them): every command that
    rebuilds the report checks first, as the page lost its answers without a word."""
    if not (Path(run_dir) / PREDICTIONS).is_file():
        raise RunDirError(f"the evaluated run lacks {PREDICTIONS}", str(Path(run_dir) / PREDICTIONS),
                          f"restore it, or run `tunesmith eval {run_dir}` again")


def _check_inputs_outside(project: Project, final: Path) -> None:
    """A run replaces its whole folder (--overwrite): refuse one the project reads data from."""
    final = final.resolve()
    for real in sorted(data_inputs(project)):
        if real == final or final in real.parents:
            raise RunDirError(f"the project reads {real}, inside the run directory it would replace",
                              f"--out {final}", "move that file out of the run directory, or give another --out")


def train_only(project: Project, out: Path | None = None, progress: bool = True, keep_failed: bool = False,
               overwrite: bool = False) -> Path:
    """data -> train; the run directory can then be evaluated with `tunesmith eval`."""
    final = final_dir(project.base_dir, project.name, out)
    check_out(final, overwrite, given=out is not None)
    _check_inputs_outside(project, final)
    splits = prepare_data_apart(project)
    resolve_model(project.model)
    distributed.init_from_env()
    if distributed.rank() != 0:
        # Other ranks train their data shard; rank 0 alone writes the run directory, except
        # that under FSDP each rank adds its optimiser shard to rank 0's checkpoint folders.
        train_stage(project, splits, staging_dir(final), progress=False)
        return final
    with staged(final, keep_failed, overwrite=overwrite) as run_dir:
        _start(project, splits, run_dir, final, progress)
        train_stage(project, splits, run_dir, progress=progress)
    return final


def resume_training(run_dir: Path, progress: bool = True, keep_failed: bool = False,
                    overwrite: bool = False) -> Path:
    """Continue an interrupted run's training from its newest checkpoint; returns the run directory (an
    earlier run there is replaced only with `overwrite`)."""
    final, staging = interrupted_run(run_dir)
    project = load_config(staging / "config.yaml", check_files=False)
    splits = load_splits(staging / "data")
    _check_same_inputs(project, staging, final)  # on every rank: one refusing alone would leave the others waiting
    check_out(final, overwrite)
    distributed.init_from_env()
    if distributed.rank() != 0:
        train_stage(project, splits, staging, progress=False, resume=True)
        return final
    if progress:
        print(f"resuming training in {final}", file=sys.stderr)
    with staged(final, keep_failed, resume=True, overwrite=overwrite) as run_dir:
        train_stage(project, splits, run_dir, progress=progress, resume=True)
    return final


# What training began from (the config and the curated splits), beside the checkpoints and removed
# with them: a resume must continue that training, not a mixture of it and an edited config or split.
TRAINING_INPUTS = Path("checkpoints") / "inputs.json"


# The config sections a training reads (eval, objective, serve... may change between interruption and resume).
TRAINING_SECTIONS = ("model", "task", "data", "train", "fairness")
TRAINING_FILES = ("train.jsonl", "validation.jsonl", "report.json")  # the splits trained on, and the label set


def _training_inputs(project: Project, run_dir: Path) -> dict:
    folder = run_dir / "data"
    data = {name: file_sha256(folder / name) for name in TRAINING_FILES if (folder / name).is_file()}
    return {"config": flatten(project.model_dump(mode="json", include=set(TRAINING_SECTIONS))), "data": data}


def _check_same_inputs(project: Project, staging: Path, final: Path) -> None:
    """RunDirError when the interrupted run's config.yaml or curated splits changed since its training
    began (a batch size, a learning rate, a row): the checkpoints belong to the training as it began."""
    path = staging / TRAINING_INPUTS
    if not path.is_file():  # a run interrupted before tunesmith recorded its inputs
        return
    began, now = fsio.read_json(path, dict), _training_inputs(project, staging)
    config_then, config_now = began.get("config", {}), now["config"]
    # Keys on both sides only: a key a later tunesmith adds (or drops) is no edit.
    changed = next((k for k in sorted(set(config_then) & set(config_now)) if config_then[k] != config_now[k]), None)
    again = f"restore it to resume, or train the project afresh with `--out {final} --overwrite`"
    if changed is not None:
        raise RunDirError(f"config.yaml's {changed} changed since training began ({config_then[changed]!r} -> "
                          f"{config_now[changed]!r}); its checkpoints continue the training as it began",
                          str(staging / "config.yaml"), again)
    if data := next((n for n in sorted(set(began.get("data", {})) | set(now["data"]))
                     if began.get("data", {}).get(n) != now["data"].get(n)), None):
        raise RunDirError(f"data/{data} changed since training began", str(staging / "data" / data), again)


def evaluate_run(run_dir: Path, progress: bool = True) -> dict:
    """eval -> verdict -> report on an existing run directory that holds a trained model."""
    project, splits = open_run(run_dir)
    with run_lock(Path(run_dir).resolve()):
        failed = _failure(run_dir)
        summary = evaluate_and_judge(project, splits, run_dir, Path(run_dir).resolve(), progress)
        if failed and failed["stage"] == "optimize":  # eval does not rerun optimize: keep saying so
            summary["failed"] = failed
            fsio.write_json(Path(run_dir) / "summary.json", summary)
        report_stage(run_dir)
    register(run_dir)
    return summary


def _failure(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "summary.json"
    return fsio.read_json(path, dict).get("failed") if path.is_file() else None


def compare_methods(project: Project, methods: list[str], out: Path, progress: bool = True,
                    overwrite: bool = False) -> list[dict]:
    """Train and evaluate each method on the same splits and budget; write compare.json and compare.png.

    The config's learning rate is kept for its own method; the others use their method's default
    (a rate tuned for LoRA would wreck full fine-tuning)."""
    from tunesmith.evaluate.leaderboard import entry, rank, write
    from tunesmith.registry import METHODS

    if not methods:
        raise InputError("names no method", "--methods", f"give one or more of: {', '.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"unknown method '{unknown[0]}'", "--methods", f"available: {', '.join(METHODS)}")
    twice = next((m for i, m in enumerate(methods) if m in methods[:i]), None)
    if twice is not None:  # its second run would go into the first one's folder after a whole training
        raise InputError(f"method '{twice}' is listed twice", "--methods", "name each method once")
    out = Path(out).resolve()
    check_runs_folder(out, methods, ("compare.json", "compare.png"), overwrite)  # before any training
    configs = [(method, _method_config(project, method)) for method in methods]  # a clash fails before training
    prepare_data_apart(configs[0][1])  # and bad data (its libraries stay in a child), for the first method
    raw_train = check_data(project)[0].get("train", [])
    for _, variant in configs:  # and a setting the model cannot take (train.lora.r past its layers' width)
        check_method_fits(variant)
        check_method_rows(variant, raw_train)  # or rows it cannot train on (SFT rows for dpo), as its run reads them
    entries = []
    for method, variant in configs:
        if progress:
            print(f"compare: {method} (learning rate {variant.train.learning_rate:g})", file=sys.stderr)
        run(variant, out / method, progress, overwrite=overwrite)
        entries.append(entry(method, out / method))
    ranked = rank(entries, project.task.type, project.eval.bootstrap_resamples, project.eval.seed)
    write(ranked, out)
    earlier = sorted(p.name for p in out.iterdir() if p.name not in methods and is_run_dir(p))
    if earlier:  # an earlier call's runs stay, but their config may differ: not ranked with these
        print(f"compare: compare.json ranks this call's methods only; {', '.join(earlier)} in --out are earlier "
              "runs (give every method to rank them together)", file=sys.stderr)
    return ranked


def _method_config(project: Project, method: str) -> Project:
    """The project with `method`: the config's learning rate for its own method, else the method's default."""
    lr = project.train.learning_rate if method == project.train.method else METHOD_SPECS[method].learning_rate
    updates = {"train.method": method, "train.learning_rate": lr}
    if project.objective.metric_defaulted:  # every method ranked on one metric each of them is scored on
        updates["objective.metric"] = metric_names(project.task.type)[0]
    try:
        return derive(project, updates)
    except ValidationError as e:
        why = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise InputError(f"method '{method}' does not fit this config ({why})", "--methods",
                         "leave it out, or change the config key the message names") from None


def optimize_run(run_dir: Path, names: list[str] | None = None, progress: bool = True) -> OptimizeResult:
    """optimize -> report on an evaluated run directory."""
    if names is not None:  # checked as optimize.variants is: known names, each once
        try:
            OptimizeConfig(variants=names)
        except ValidationError as e:
            raise InputError(e.errors()[0]["msg"].removeprefix("Value error, "), "--variants",
                             "name known variants, each once, e.g. --variants merged,int8") from None
    project, splits = open_run(run_dir)
    if project.task.type == "text":
        raise InputError("the optimize stage does not support task.type text (its parity check compares "
                         "predictions, and a text run makes none)", "task.type", "serve the trained model as it is")
    check_evaluated(run_dir)  # what the report optimize rebuilds at its end reads, named before anything is built
    _check_predictions(run_dir)
    with run_lock(Path(run_dir).resolve()):
        result = optimize_stage(project, splits, Path(run_dir), progress, names)
        report_stage(run_dir)
        clear_failure(run_dir, ("optimize", "report"))
    return result


def evaluate_and_judge(project: Project, splits: Splits, run_dir: Path, final: Path, progress: bool = True) -> dict:
    # Raw text (continued pre-training) is judged on held-out loss, not on generated predictions.
    result = (text_eval_stage if project.task.type == "text" else eval_stage)(project, splits, run_dir, progress)
    audit = audit_stage(project, splits, run_dir, progress) if project.fairness.enabled else None
    summary = {
        "name": project.name, "model": project.model, "method": project.train.method,
        "objective_metric": project.objective.metric, "instruction": project.task.instruction,
        "objective": _verdict(project, result.baseline, result.finetuned, result.comparison, audit).to_json(),
        "metrics": {"baseline": result.baseline, "finetuned": result.finetuned},
        "comparison": result.comparison,
        "run_dir": str(final), "report": str(final / "report.html"),
        "training": _training_summary(run_dir),
        # Test rows the data stage removed, and (preference methods) those no figure scores.
        "data": {**test_removals(run_dir / "data"),
                 **{k: v for k, v in result.to_json().items() if k.startswith("test_rows_not_scored")}},
    }
    if result.forgetting is not None:
        summary["forgetting"] = result.forgetting
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
    summary_path = Path(run_dir) / "summary.json"
    if not summary_path.is_file() or "metrics" not in read_summary(run_dir):
        raise RunDirError("the run has not been evaluated (no metrics in summary.json)", str(run_dir),
                          f"run `tunesmith eval {run_dir}` first")
    if not (Path(run_dir) / "metrics.json").is_file():
        raise RunDirError("the evaluated run lacks metrics.json", str(Path(run_dir) / "metrics.json"),
                          f"restore it, or run `tunesmith eval {run_dir}` again")
    read_metrics(run_dir)  # a damaged one is named before the audit writes anything
    _check_predictions(run_dir)
    with run_lock(Path(run_dir).resolve()):
        audit = audit_stage(project, splits, Path(run_dir), progress)
        summary = read_summary(run_dir)
        metrics = read_metrics(run_dir)
        summary["objective"] = _verdict(project, metrics["baseline"], metrics["finetuned"], metrics.get("comparison"),
                                        audit).to_json()
        summary["fairness"] = headline_figures(audit)
        # where the run is now (it may have been copied or moved since eval wrote these)
        here = Path(run_dir).resolve()
        summary["run_dir"], summary["report"] = str(here), str(here / "report.html")
        fsio.write_json(summary_path, summary)
        report_stage(run_dir)
    register(run_dir)
    return {"audit": audit, "summary": summary}


def register(run_dir: Path) -> None:
    """Record the run in the registry; a registry problem never fails the run itself."""
    try:
        record_run(run_dir)
    except Exception as e:
        print(f"warning: run not recorded in the registry ({type(e).__name__}: {e})", file=sys.stderr)


def _verdict(project: Project, baseline: dict, finetuned: dict, comparison: dict | None,
             audit: dict | None) -> Verdict:
    """The objective judged on the fine-tuned model's figures, fairness figures included."""
    figures = dict(finetuned)
    if audit is not None:
        figures.update({k: v for k, v in headline_figures(audit).items() if v is not None})
    return judge(project.objective, baseline, figures, comparison)


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
    if not run_dir.is_dir():
        raise RunDirError("not found" if not run_dir.exists() else "is not a folder", str(run_dir),
                          "give a folder made by `tunesmith run` or `tunesmith train`")
    for needed in ("config.yaml", "data/report.json", "model/tunesmith.json", "model/prompt.json"):
        if not (run_dir / needed).exists():
            raise RunDirError(f"not a trained run directory (no {needed})", str(run_dir),
                              "give a folder made by `tunesmith run` or `tunesmith train`")
    project = load_config(run_dir / "config.yaml", check_files=False)
    _check_prompt_matches(project, run_dir)
    return project, load_splits(run_dir / "data")


def _check_prompt_matches(project: Project, run_dir: Path) -> None:
    """RunDirError when config.yaml's task section no longer says what the model was trained with
    (model/prompt.json): eval would score the baseline with the edited prompt and the fine-tuned model
    with its own, and report the difference as a gain."""
    from tunesmith.tasks.prompts import read_prompt_format
    from tunesmith.train.finetuned import read_meta

    trained = read_prompt_format(run_dir / "model" / "prompt.json")
    task = project.task
    said = {"type": (task.type, trained.task_type), "max_length": (task.max_length, trained.max_length),
            "label_scoring": (task.label_scoring, trained.label_scoring), "train_on": (task.train_on, trained.train_on)}
    if task.labels is not None and task.type == "classification":  # other tasks ignore task.labels
        said["labels"] = (list(task.labels), trained.labels)
    if read_meta(run_dir / "model")["method"] != "prompt_optimization":  # it chooses its own instruction
        said["instruction"] = (task.instruction, trained.instruction)
    for key, (config, model) in said.items():
        if config != model:
            raise RunDirError(f"config.yaml's task.{key} ({str(config)[:60]!r}) is not what the model was trained "
                              f"with ({str(model)[:60]!r}, model/prompt.json)", str(run_dir / "config.yaml"),
                              f"restore task.{key}; to change it, train a new run")


def exit_code(summary: dict) -> int:
    return EXIT_MET if summary["objective"]["met"] else EXIT_NOT_MET


def _start(project: Project, splits: Splits, run_dir: Path, final: Path, progress: bool) -> None:
    from tunesmith.data.stage import summary

    lines = summary(splits, None)
    if progress:
        print(f"run directory: {final} (if interrupted: {resume_command(final)})", file=sys.stderr)
        print("data: " + "; ".join(line for line in lines if not line.startswith("warning: ")), file=sys.stderr)
    for line in lines:  # --quiet hides progress, never a warning about the data
        if line.startswith("warning: "):
            print(line, file=sys.stderr)
    fsio.write_text(run_dir / "config.yaml", dump_config(project))
    save_splits(splits, run_dir / "data")
    fsio.write_json(run_dir / TRAINING_INPUTS, _training_inputs(project, run_dir))
