"""`tunesmith tune`: hyperparameter search with Optuna (TPE sampler, median pruning on the
validation metric), the study kept in SQLite, the best trial trained again as a normal run.

The first trial is the config as written, so the search can only end at least as good as the
default on validation. Trials train on the same curated splits; each is scored by its best
validation figure of the objective metric.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tunesmith.config import Project, derive
from tunesmith.data.prepare import prepare_data
from tunesmith.registry import METHOD_SPECS
from tunesmith.tasks.metrics import METRICS

SEARCHABLE = ("lora", "dora")


def space(trial, project: Project) -> dict:
    """Sampled values: LoRA rank, alpha, dropout, learning rate (around the method's default) and epochs."""
    base = METHOD_SPECS[project.train.method].learning_rate
    return {"lora.r": trial.suggest_categorical("lora.r", [4, 8, 16, 32]),
            "lora.alpha": trial.suggest_categorical("lora.alpha", [8, 16, 32, 64]),
            "lora.dropout": trial.suggest_float("lora.dropout", 0.0, 0.2),
            "learning_rate": trial.suggest_float("learning_rate", base / 10, base * 10, log=True),
            "epochs": trial.suggest_categorical("epochs", [1, 2, 3])}


def apply_params(project: Project, params: dict) -> Project:
    return derive(project, {f"train.{key}": value for key, value in params.items()})


def defaults(project: Project) -> dict:
    t = project.train
    return {"lora.r": t.lora.r, "lora.alpha": t.lora.alpha, "lora.dropout": t.lora.dropout,
            "learning_rate": t.learning_rate, "epochs": t.epochs}


def tune(project: Project, trials: int, out: Path, progress: bool = True, seed: int = 0,
         overwrite: bool = False) -> dict:
    """Run the study in out/study.sqlite (continued if it exists), then the best configuration as a run
    in out/best (an existing out/best is replaced only with `overwrite`)."""
    import optuna

    from tunesmith.errors import InputError, RunDirError
    from tunesmith.pipeline import run
    from tunesmith.runs import check_runs_folder
    from tunesmith.train.stage import train_stage

    if project.train.method not in SEARCHABLE:
        raise InputError(f"tune searches LoRA hyperparameters; train.method is {project.train.method}", "train.method",
                         f"use one of: {', '.join(SEARCHABLE)}")
    out = Path(out).resolve()
    check_runs_folder(out, ["best"], ("study.sqlite", "trials"), overwrite)  # before the study, not after it
    kept = out / "trials"
    if kept.is_dir() and any(kept.iterdir()) and not (out / "study.sqlite").exists() and not overwrite:
        # Without its study, trial numbers restart at 000 and each new trial would replace a kept log.
        raise RunDirError(f"holds {kept.name}/ but no study.sqlite: new trials would replace the kept trials' logs",
                          f"--out {out}", "pass --overwrite to replace them, or give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    splits = prepare_data(project)
    metric = project.objective.metric
    sign = 1 if METRICS[metric].higher_is_better else -1
    # ERROR: a failed trial raises out of the study (catch=()) and the CLI says it in one line; optuna's
    # own "Trial N failed" warning would add a traceback, on Ctrl-C and SIGTERM too.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(study_name=project.name, storage=f"sqlite:///{out / 'study.sqlite'}",
                                load_if_exists=True,
                                direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))
    if not study.trials:
        study.enqueue_trial(defaults(project))  # trial 0: the config as written

    def objective(trial) -> float:
        params = space(trial, project)
        folder = out / "trials" / f"{trial.number:03d}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        evals = []

        def report(record: dict) -> None:
            evals.append(record[metric])
            trial.report(sign * record[metric], len(evals))
            if trial.should_prune():
                raise optuna.TrialPruned()
        try:
            result = train_stage(apply_params(project, params), splits, folder, progress=False, on_validate=report)
        finally:
            shutil.rmtree(folder / "model", ignore_errors=True)  # trials keep their logs, not their weights
        best = result.best[metric] if result.best else evals[-1]
        if progress:
            print(f"tune: trial {trial.number}: {metric} {best:.4f} with {params}", file=sys.stderr)
        return sign * best

    finished = sum(t.state.is_finished() for t in study.trials)  # an enqueued trial is not finished yet
    study.optimize(objective, n_trials=max(0, trials - finished), catch=())
    best = study.best_trial
    summary = run(apply_params(project, _params(best.params, project)), out / "best", progress, overwrite=overwrite)
    default_value = sign * study.trials[0].value if study.trials[0].value is not None else None
    return {"study": str(out / "study.sqlite"), "trials": _trial_rows(study, sign), "best_trial": best.number,
            "best_params": _params(best.params, project), "best_validation": sign * best.value,
            "default_validation": default_value, "summary": summary}


def _params(p: dict, project: Project) -> dict:
    return {**defaults(project), **p}


def _trial_rows(study, sign: int) -> list[dict]:
    return [{"number": t.number, "state": t.state.name, "value": None if t.value is None else sign * t.value,
             "params": t.params} for t in study.trials]
