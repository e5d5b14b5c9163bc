"""`tunesmith tune`: hyperparameter search with Optuna (TPE sampler, median pruning on the
validation metric), the study kept in SQLite, the best trial trained again as a normal run.

The first trial is the config as written, so the search can only end at least as good as the
default on validation. Trials train on the same curated splits; each is scored by its best
validation figure of the objective metric.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import sys
from pathlib import Path

from tunesmith.config import Project, derive
from tunesmith.data.prepare import prepare_data
from tunesmith.registry import METHOD_SPECS
from tunesmith.tasks.metrics import METRICS

SEARCHABLE = ("lora", "dora")
STUDY_FILE = "study.sqlite"


def space(trial, project: Project) -> dict:
    """Sampled values: LoRA rank, alpha, dropout, learning rate (around the method's default) and epochs.
    Each range holds the config's own value too: trial 0 is the config as written, whatever it says.
    Epochs are searched only when they decide the length (train.max_steps, when set, does)."""
    base, t = METHOD_SPECS[project.train.method].learning_rate, project.train
    params = {"lora.r": trial.suggest_categorical("lora.r", _with([4, 8, 16, 32], t.lora.r)),
              "lora.alpha": trial.suggest_categorical("lora.alpha", _with([8, 16, 32, 64], t.lora.alpha)),
              "lora.dropout": trial.suggest_float("lora.dropout", 0.0, max(0.2, t.lora.dropout)),
              "learning_rate": trial.suggest_float("learning_rate", min(base / 10, t.learning_rate),
                                                   max(base * 10, t.learning_rate), log=True)}
    if t.max_steps is None:
        params["epochs"] = trial.suggest_categorical("epochs", _with([1, 2, 3], t.epochs))
    return params


def _with(choices: list, value) -> list:
    return choices if value in choices else sorted([*choices, value])


def apply_params(project: Project, params: dict) -> Project:
    return derive(project, {f"train.{key}": value for key, value in params.items()})


def defaults(project: Project) -> dict:
    t = project.train
    fixed = {"lora.r": t.lora.r, "lora.alpha": t.lora.alpha, "lora.dropout": t.lora.dropout,
             "learning_rate": t.learning_rate}
    return fixed if t.max_steps is not None else {**fixed, "epochs": t.epochs}


def tune(project: Project, trials: int, out: Path, progress: bool = True, seed: int = 0,
         overwrite: bool = False) -> dict:
    """Run the study in out/study.sqlite (continued if it exists), then the best configuration as a run
    in out/best (an existing out/best is replaced only with `overwrite`)."""
    from tunesmith.errors import InputError, RunDirError
    from tunesmith.runs import check_runs_folder, is_run_dir
    from tunesmith.train.stage import check_method_fits

    if project.train.method not in SEARCHABLE:
        raise InputError(f"tune searches LoRA hyperparameters; train.method is {project.train.method}", "train.method",
                         f"use one of: {', '.join(SEARCHABLE)}")
    out = Path(out).resolve()
    # A best run already there is kept when the study is complete and it is of the best trial's config
    # (finished by hand after an interruption: `_best_run`); otherwise refused before any trial trains.
    kept_best = not overwrite and is_run_dir(out / "best")
    check_runs_folder(out, [] if kept_best else ["best"], (STUDY_FILE, "trials"), overwrite)
    _check_study_file(out / STUDY_FILE)
    if kept_best and _scored_on_disk(out / STUDY_FILE) < trials:  # more trials may find another best
        raise RunDirError("already holds a tunesmith run", f"--out {out / 'best'}",
                          "pass --overwrite to replace it, or give a new folder")
    _check_kept_trials(out, overwrite)
    splits = prepare_data(project)
    check_method_fits(project)  # before the study is made: a rank the model cannot take fails trial 0
    out.mkdir(parents=True, exist_ok=True)
    _settle_aside(out)  # what a tune killed before its new study scored left set aside: put back
    try:
        study = _open_study(out, project, seed, overwrite)
        _run_trials(study, project, splits, out, trials, progress)
    finally:  # a study --overwrite replaced is dropped only once the new one has a score, else put back
        _settle_aside(out)
    sign = 1 if METRICS[project.objective.metric].higher_is_better else -1
    best = study.best_trial
    summary = _best_run(apply_params(project, _params(best.params, project)), out / "best", progress, overwrite)
    default = _default_trial(study, project)
    default_value = sign * default.value if default is not None and default.value is not None else None
    return {"study": str(out / STUDY_FILE), "trials": _trial_rows(study, sign), "best_trial": best.number,
            "best_params": _params(best.params, project), "best_validation": sign * best.value,
            "default_trial": default.number if default is not None else None,
            "default_validation": default_value, "summary": summary}


def _check_kept_trials(out: Path, overwrite: bool) -> None:
    from tunesmith.errors import RunDirError

    kept = out / "trials"
    if foreign := _foreign_trial_files(kept):  # trial logs are replaced, with --overwrite too; never these
        raise RunDirError(f"holds files tune did not write ({', '.join(foreign[:3])}); left untouched",
                          f"--out {out}", "give a new folder, or move them out of trials/")
    if kept.is_dir() and any(kept.iterdir()) and not (out / STUDY_FILE).exists() and not overwrite:
        # Without its study, trial numbers restart at 000 and each new trial would replace a kept log.
        raise RunDirError(f"holds {kept.name}/ but no study.sqlite: new trials would replace the kept trials' logs",
                          f"--out {out}", "pass --overwrite to replace them, or give a new folder")
    aside = out / REPLACED
    if aside.is_symlink() or (aside.exists() and not aside.is_dir()):
        raise RunDirError(f"{aside} is not the folder tune sets a replaced study aside in; left untouched",
                          f"--out {out}", "move it away, then rerun")


def _run_trials(study, project: Project, splits, out: Path, trials: int, progress: bool) -> None:
    """Trials until `trials` are scored, each training in out/trials/NNN (its logs kept, its weights not)."""
    import optuna

    from tunesmith.train.stage import train_stage

    metric = project.objective.metric
    sign = 1 if METRICS[metric].higher_is_better else -1
    if _default_trial(study, project) is None and not _waiting(study):
        study.enqueue_trial(defaults(project))  # the config as written (again, if its trial was interrupted)

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
        finally:  # trials keep their logs, not their weights: an interrupted trial's checkpoints neither, as
            for weights in ("model", "checkpoints"):  # its place goes to a new trial (it is never resumed)
                shutil.rmtree(folder / weights, ignore_errors=True)
        best = result.best[metric] if result.best else evals[-1]
        if progress:
            print(f"tune: trial {trial.number}: {metric} {best:.4f} with {params}", file=sys.stderr)
        return sign * best

    # Only scored trials count: an interrupted one (FAIL) is listed but its place is taken by a new one.
    study.optimize(objective, n_trials=max(0, trials - len(_scored(study))), catch=())


# What a trial's folder holds (train_stage's files and trackers'); `model` is removed once it is scored.
TRIAL_FILES = frozenset({"train.json", "train_log.jsonl", "model", "checkpoints", "tensorboard", "mlruns", "wandb"})


def _foreign_trial_files(kept: Path) -> list[str]:
    """Entries of out/trials that no trial wrote (paths relative to out): anything but NNN folders of
    TRIAL_FILES. A trial's folder is emptied before it trains, so they would be deleted with it."""
    if kept.is_symlink() or (kept.exists() and not kept.is_dir()):
        return [kept.name]
    if not kept.is_dir():
        return []
    foreign = []
    for entry in sorted(kept.iterdir()):
        if entry.is_symlink() or not entry.is_dir() or not entry.name.isdigit():
            foreign.append(f"{kept.name}/{entry.name}")
            continue
        # Hidden entries are the writers' own (fsio's .NAME.HEX.tmp files, left by a killed trial).
        foreign += [f"{kept.name}/{entry.name}/{f.name}" for f in sorted(entry.iterdir())
                    if f.name not in TRIAL_FILES and not f.name.startswith(".")]
    return foreign


def _best_run(project: Project, folder: Path, progress: bool, overwrite: bool) -> dict:
    """The best configuration as a run in `folder` (its summary). A run already there of this very
    config, finished after an interrupted tune with `tunesmith train --resume`, is kept (and evaluated
    if it is not yet) rather than refused; another run there is replaced only with `overwrite`."""
    from tunesmith.config import dump_config, load_config
    from tunesmith.errors import RunDirError
    from tunesmith.pipeline import evaluate_run, run
    from tunesmith.runs import is_run_dir, read_summary

    if overwrite or not is_run_dir(folder):
        return run(project, folder, progress, overwrite=overwrite)
    if dump_config(load_config(folder / "config.yaml", check_files=False)) != dump_config(project):
        raise RunDirError("already holds a tunesmith run, not of the best trial's configuration", f"--out {folder}",
                          "pass --overwrite to replace it, or give a new folder")
    if (folder / "summary.json").is_file() and "objective" in (summary := read_summary(folder)):
        return summary
    return evaluate_run(folder, progress)


def _open_study(out: Path, project: Project, seed: int, overwrite: bool):
    """The study in out/study.sqlite: new, or the one an earlier `tune` of this same config left there.
    A link, a foreign database or a study of another config is refused (its trials would be scored as
    this config's); with `overwrite` a study of another config is replaced, with its trial logs."""
    import optuna

    from tunesmith.errors import InputError

    # ERROR: a failed trial raises out of the study (catch=()) and the CLI says it in one line; optuna's
    # own "Trial N failed" warning would add a traceback, on Ctrl-C and SIGTERM too, and its INFO lines
    # ("Using an existing study") would stand beside a refusal's one `error:` line.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    path = out / STUDY_FILE
    _check_study_file(path)
    storage = f"sqlite:///{path}"
    fingerprint = hashlib.sha256(project.model_dump_json(exclude={"name"}).encode()).hexdigest()

    def create():
        return optuna.create_study(study_name=project.name, storage=storage, load_if_exists=True,
                                   direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
                                   pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))
    others = [n for n in optuna.get_all_study_names(storage) if n != project.name]
    if others and not overwrite:  # a renamed project: its new study's trial logs would replace the old one's
        raise InputError(f"--out holds the study of another project name ({others[0]!r})", str(path),
                         "give a new --out, or pass --overwrite to start a new study there")
    study = None if others else create()
    if study is not None and study.trials and study.user_attrs.get("config") != fingerprint and not overwrite:
        raise InputError("--out holds a study of another config (or of an earlier tunesmith): its trials "
                         "would be reported as this config's", str(path),
                         "give a new --out, or pass --overwrite to start a new study there")
    if study is None or (study.trials and study.user_attrs.get("config") != fingerprint):
        del study  # (its storage's connections go with it before the file moves)
        _set_aside(out)  # kept until the new study scores a trial (see tune), put back if it never does
        study = create()
    study.set_user_attr("config", fingerprint)
    return study


REPLACED = ".replaced"  # out/.replaced: the study and trial logs --overwrite replaces, until a new trial scores


def _set_aside(out: Path) -> None:
    """Move the study and its trial logs into out/.replaced (empty here: `tune` settles one first)."""
    aside = out / REPLACED
    aside.mkdir()
    for name in (STUDY_FILE, "trials"):
        if (out / name).exists():
            os.replace(out / name, aside / name)


def _settle_aside(out: Path) -> None:
    """A study set aside by --overwrite: dropped once the study in its place has scored a trial, else put
    back. Run at the end of a tune and at the start of the next (a kill leaves it undecided)."""
    aside = out / REPLACED
    if aside.is_symlink() or not aside.is_dir():
        return
    if _scored_on_disk(out / STUDY_FILE) == 0:
        for name in (STUDY_FILE, "trials"):
            if (aside / name).exists():
                if (out / name).is_dir():
                    shutil.rmtree(out / name)
                else:
                    (out / name).unlink(missing_ok=True)
                os.replace(aside / name, out / name)
    shutil.rmtree(aside, ignore_errors=True)


def _check_study_file(path: Path) -> None:
    """InputError unless `path` is missing, empty or an Optuna study database (checked read-only: Optuna
    would add its tables to any SQLite file, and write through a link to wherever it points)."""
    from tunesmith.errors import InputError

    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise InputError("study.sqlite is a symbolic link or not a file; left untouched", str(path),
                         "give a new --out folder")
    if not path.exists() or path.stat().st_size == 0:
        return
    try:
        db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        with open(path, "rb") as f:
            sqlite = f.read(16) == b"SQLite format 3\x00"
        if sqlite and isinstance(e, sqlite3.OperationalError):
            return  # a database read-only cannot open (a killed tune's hot journal, a lock): Optuna recovers it
        raise InputError(f"study.sqlite is not a study database ({e}); left untouched", str(path),
                         "give a new --out folder") from None
    if not {"studies", "trials"} <= tables:
        raise InputError("study.sqlite is not an Optuna study of `tunesmith tune`; left untouched", str(path),
                         "give a new --out folder")


def _scored_on_disk(path: Path) -> int:
    """Scored trials (complete or pruned, as `_scored` counts) in the study file, read without writing
    it (optuna's storage would create or migrate it); 0 when there is no study yet."""
    import sqlite3

    if not path.is_file():
        return 0
    db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED')").fetchone()[0]
    except sqlite3.Error:  # no trials table yet: nothing scored
        return 0
    finally:
        db.close()


def _scored(study) -> list:
    from optuna.trial import TrialState

    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def _waiting(study) -> bool:
    from optuna.trial import TrialState

    return any(t.state == TrialState.WAITING for t in study.trials)


def _default_trial(study, project: Project):
    """The scored trial of the config as written (the first enqueued), None until one is scored. Compared on
    the searched keys: a study begun when epochs were searched beside max_steps holds them too."""
    wanted = defaults(project)
    return next((t for t in _scored(study) if {k: t.params.get(k) for k in wanted} == wanted), None)


def _params(p: dict, project: Project) -> dict:
    return {**defaults(project), **p}


def _trial_rows(study, sign: int) -> list[dict]:
    return [{"number": t.number, "state": t.state.name, "value": None if t.value is None else sign * t.value,
             "params": t.params} for t in study.trials]
