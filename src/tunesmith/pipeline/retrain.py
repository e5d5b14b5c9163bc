"""`tunesmith retrain`: a challenger trained from the champion's config on its data plus labelled
traffic, compared with the champion side by side, and promoted when the promotion rule says so.

The challenger is a whole `tunesmith run` (data -> train -> eval -> report) into a new run directory
beside the champion (or --out). Its inputs stay with it in `retrain/` (train.jsonl, test.jsonl, and
validation.jsonl when the champion validated on a file, each in the task's data format, plus
traffic_test.jsonl), and its config.yaml points there; its `serve.request_log.path` is the log this
retrain read (the champion's, or --db), so a server that swaps to the challenger, and `tunesmith
monitor`, `feedback import --run` and the next `retrain` of the challenger, all use the one log of
the lineage. Both models then answer the held-out traffic with
the eval stage's prediction code (predictions/traffic_test.jsonl), both runs' test predictions are
paired by row, and promotion.json records the figures and the decision. A failure after training
keeps the challenger: a trained model is never deleted.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError

from tunesmith import fsio, hardware
from tunesmith.config import Project, derive, dump_config, load_config
from tunesmith.data.examples import Example
from tunesmith.data.prepare import read_split
from tunesmith.errors import InputError, RunDirError
from tunesmith.evaluate.compare import compare
from tunesmith.evaluate.predictions_file import example_key, require_test_predictions
from tunesmith.pipeline.promotion import Decision, decide
from tunesmith.pipeline.traffic import Assembly, assemble, champion_labels, check_supported, write_rows
from tunesmith.run_registry import find_run
from tunesmith.runs import check_out, is_run_dir, new_run_id, run_lock, staging_dir
from tunesmith.tasks.metrics import METRICS
from tunesmith.train.finetuned import check_model_files

EXIT_PROMOTED, EXIT_REJECTED = 0, 3
INPUTS = "retrain"  # the challenger's input files, inside its run directory


@dataclass
class RetrainResult:
    """The challenger, the decision and everything promotion.json holds."""

    champion: Path
    challenger: Path
    decision: Decision
    record: dict
    path: Path  # promotion.json

    @property
    def promoted(self) -> bool:
        """The rule said promote, and the registry took it (the champion had not changed meanwhile)."""
        return self.decision.promote and "not_promoted" not in self.record

    @property
    def exit_code(self) -> int:
        return EXIT_PROMOTED if self.promoted else EXIT_REJECTED


def retrain(run_dir: Path, data: Path | None = None, out: Path | None = None, db: Path | None = None,
            name: str | None = None, progress: bool = True) -> RetrainResult:
    """Build, evaluate and judge a challenger of the champion run `run_dir`; promote it if the rule says so.

    Args:
        data: extra labelled rows in the task's data format.
        out: the challenger's run directory (default: a new run-id folder beside the champion).
        db: the request log (default: the one the champion's serve section names).
        name: the champion registry name (default: the project's name).

    Raises:
        InputError: a bad champion, log, --data, --out or --name, or too few labelled requests; nothing written.
        StageError: a stage after training failed; the challenger is kept.
    """
    champion, project = _champion(run_dir)
    name = _registry_name(project.name if name is None else name)
    _check_served(champion, name)
    db = _request_log(champion, db)
    final = Path(out).resolve() if out else champion.parent / new_run_id()
    if is_run_dir(final):  # retrain never replaces a run, least of all the champion it learns from
        raise RunDirError("already holds a tunesmith run" + (" (the champion)" if final == champion.resolve() else ""),
                          f"--out {final}", "give a new or empty folder for the challenger")
    check_out(final)
    inputs = final.with_name(f".{final.name}.retrain-inputs")
    if inputs.exists() or inputs.is_symlink():
        raise RunDirError(f"{inputs} is in the way (inputs of an earlier retrain into this folder)", f"--out {final}",
                          "give another --out, or move it away")
    if data is not None and not Path(data).is_file():  # said first, not behind "too few labelled requests"
        # /dev/zero through a symlink exists but is no data file: "not found" would send the user looking
        what = "is not a regular file" if Path(data).exists() else "file not found"
        raise InputError(what, f"--data {data}", "give labelled rows in the task's data format")
    assembly = assemble(project, champion, db, data)
    _say(progress, "retrain data: " + data_line(assembly.counts.to_json()))
    challenger_project = _write_inputs(project, champion, assembly, inputs, db)
    summary = _train(challenger_project, final, inputs, progress)
    _adopt_inputs(challenger_project, final, inputs)
    with run_lock(final):
        result = _judge(champion, final, challenger_project, assembly, summary, name, progress)
    if result.decision.promote:
        from tunesmith import champions

        try:
            event = champions.promote(name, final, parent=champion, reason="retrain", record=result.record,
                                      replacing=champion)
            result.record.update(promoted=True, registry={"name": name, "event": event})
        except champions.ChampionChanged as e:  # promoted or rolled back to while this one trained
            result.record.update(not_promoted=f"{e.what} ({e.hint})")
        fsio.write_json(result.path, result.record)
    return result


def _champion(run_dir: Path) -> tuple[Path, Project]:
    """The champion's resolved directory and config: an evaluated run of a task retrain supports."""
    run = Path(run_dir)
    if not is_run_dir(run):
        raise RunDirError("not a trained run directory (no model/tunesmith.json)", str(run_dir),
                          "give the served run's folder, made by `tunesmith run` or `tunesmith retrain`")
    run = find_run(str(run.resolve())).resolve()  # a path, never read as a registry id
    for needed in ("config.yaml", "data/train.jsonl", "data/test.jsonl", "predictions/test.jsonl"):
        if not (run / needed).is_file():
            raise RunDirError(f"the champion run has no {needed}", str(run), "give a run made by `tunesmith run`")
    project = load_config(run / "config.yaml", check_files=False)
    check_supported(project)
    check_model_files(run / "model")  # it answers the held-out traffic after training: refused now, not then
    if project.objective.metric not in METRICS:
        raise InputError(f"objective.metric {project.objective.metric} is not a task metric both models can be "
                         "scored on", f"{run / 'config.yaml'} (objective.metric)")
    return run, project


def _check_served(champion: Path, name: str) -> None:
    """InputError when another run is served under `name`: the challenger would be judged against the
    champion, then replace a run it was never compared with (refused at promotion; said now, before training)."""
    from tunesmith import champions

    served = champions.current(name)
    if served is not None and served.resolve() != champion.resolve():
        raise InputError(f"'{name}' serves {served}, not {champion}: the challenger would replace a run it was "
                         "never compared with", "--name", f"retrain the run served now (`tunesmith retrain "
                         f"--registry {name}`), or record the challenger under another --name")


def _registry_name(name: str) -> str:
    from tunesmith.champions import NAME

    if not NAME.fullmatch(name):
        raise InputError(f"invalid registry name '{name}'", "--name",
                         "letters, digits, '.', '_' and '-', starting with a letter or digit")
    return name


def _request_log(champion: Path, db: Path | None) -> Path:
    from tunesmith.serve.server import serve_settings

    path = Path(db) if db is not None else serve_settings(champion)[1]
    if path is None or not Path(path).is_file():
        raise InputError(f"no request log at {path}", "--db" if db is not None else f"{champion} (serve.request_log)",
                         "give the log the champion's server wrote with --db PATH")
    return Path(path).resolve()


def _write_inputs(project: Project, champion: Path, assembly: Assembly, inputs: Path, db: Path) -> Project:
    """Write the challenger's data files into `inputs`; the challenger's config, validated again, with
    `db` (the request log read) as its serve.request_log.path. On any failure `inputs` is removed: a
    leftover would block the next retrain into the same folder."""
    inputs.mkdir(parents=True)
    try:
        return _derive_challenger(project, champion, assembly, inputs, db)
    except BaseException:
        shutil.rmtree(inputs, ignore_errors=True)
        raise


def _derive_challenger(project: Project, champion: Path, assembly: Assembly, inputs: Path, db: Path) -> Project:
    write_rows(inputs / "train.jsonl", assembly.train, project)
    write_rows(inputs / "test.jsonl", _split(champion, "test"), project)
    write_rows(inputs / "traffic_test.jsonl", assembly.traffic_test, project)
    # One request log for the lineage: a server swapped to the challenger keeps writing where this retrain read.
    # The files are written in the task's own field names, so data.columns (the champion's sources') is dropped.
    updates: dict = {"data.train": inputs / "train.jsonl", "data.test": inputs / "test.jsonl", "data.columns": {},
                     "serve.request_log.path": Path(db).resolve()}
    # The champion's own validation rows when it validated on given sources; rows carved before repeating traffic.
    validation = (_split(champion, "validation") if not isinstance(project.data.validation, float)
                  else assembly.validation)
    if validation is not None:
        write_rows(inputs / "validation.jsonl", validation, project)
        updates["data.validation"] = inputs / "validation.jsonl"
    if project.task.labels is not None and assembly.counts.new_labels:
        updates["task.labels"] = champion_labels(champion, project) + assembly.counts.new_labels
    if project.retrain.traffic_weight > 1:
        # Rows are deduplicated above; the data stage must keep the deliberate repeats of traffic rows.
        updates.update({"data.clean.exact_dedup": False, "data.clean.near_dedup.enabled": False,
                        "data.clean.semantic_dedup.enabled": False})
    try:
        return derive(project, updates)
    except ValidationError as e:
        raise InputError(f"the challenger's config is invalid ({e.errors()[0]['msg']})",
                         str(champion / "config.yaml")) from None


def _split(champion: Path, name: str) -> list[Example]:
    return read_split(champion / "data", name)


def _train(project: Project, final: Path, inputs: Path, progress: bool) -> dict:
    """`tunesmith run` for the challenger. Inputs that no run needs any more are removed on failure;
    those of an interrupted run that can be resumed, or of a trained one, are kept."""
    from tunesmith.pipeline import run

    try:
        return run(project, final, progress)
    except BaseException:
        if is_run_dir(final):
            _adopt_inputs(project, final, inputs)
        elif not staging_dir(final).exists():
            shutil.rmtree(inputs, ignore_errors=True)
        raise


def _adopt_inputs(project: Project, final: Path, inputs: Path) -> None:
    """Move the input files into the run directory and point its config.yaml at them there."""
    moved = final / INPUTS
    inputs.replace(moved)
    updates = {f"data.{k}": moved / getattr(project.data, k).name for k in ("train", "test", "validation")
               if isinstance(getattr(project.data, k), Path)}
    fsio.write_text(final / "config.yaml", dump_config(derive(project, updates)))


def _judge(champion: Path, challenger: Path, project: Project, assembly: Assembly, summary: dict, name: str,
           progress: bool) -> RetrainResult:
    """Both comparisons, the rule's decision, promotion.json."""
    metric = project.objective.metric
    test = _test_comparison(champion, challenger, project)
    _say(progress, f"scoring champion and challenger on {len(assembly.traffic_test)} held-out traffic rows")
    traffic = _traffic_comparison(champion, challenger, project, assembly.traffic_test)
    decision = decide(metric, test, traffic, summary["objective"], project.objective.tolerance)
    record = {
        "champion": str(champion), "challenger": str(challenger), "name": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "metric": metric,
        "data": assembly.counts.to_json(), "feedback": assembly.counts.feedback,
        "comparisons": {"test": test, "traffic": traffic},
        "objective": summary["objective"], "rule": {"tolerance": project.objective.tolerance},
        # True once the registry has recorded the promotion (a registry failure leaves it false).
        "decision": decision.to_json(), "promoted": False,
    }
    path = challenger / "promotion.json"
    fsio.write_json(path, record)
    return RetrainResult(champion, challenger, decision, record, path)


def _test_comparison(champion: Path, challenger: Path, project: Project) -> dict | None:
    """Champion vs challenger on the champion's test split, paired by (text, gold) from both runs'
    predictions/test.jsonl; rows only one run has are counted and left out (None: no row in common)."""
    mine = require_test_predictions(champion)
    theirs: dict[tuple, list[str]] = {}
    rows_b = require_test_predictions(challenger)
    for r in rows_b:
        theirs.setdefault(example_key(r), []).append(r["prediction"])
    golds, a, b = [], [], []
    for r in mine:
        match = theirs.get(example_key(r))
        if match:
            golds.append(r["gold"])
            a.append(r["prediction"])
            b.append(match.pop(0))
    unmatched = {"champion": len(mine) - len(golds), "challenger": len(rows_b) - len(golds)}
    if any(unmatched.values()):
        print(f"warning: the runs' test predictions differ in {unmatched['champion']} champion and "
              f"{unmatched['challenger']} challenger rows; the comparison uses the {len(golds)} rows both have",
              file=sys.stderr)
    if not golds:
        return None
    return {**_paired(project, golds, a, b), "split": "test", "unmatched_rows": unmatched}


def _traffic_comparison(champion: Path, challenger: Path, project: Project, rows: list[Example]) -> dict | None:
    """Both models answer the held-out traffic (eval-stage prediction code); saved beside the test predictions."""
    if not rows:
        return None
    old, new = _predict(champion, rows, project), _predict(challenger, rows, project)
    fsio.write_jsonl(challenger / "predictions" / "traffic_test.jsonl",
                     [{"text": e.input, "gold": e.target, "prediction": p, "champion_prediction": q,
                       "source": e.source} for e, p, q in zip(rows, new, old)])
    return {**_paired(project, [e.target for e in rows], old, new), "split": "traffic_test"}


def _predict(run: Path, rows: list[Example], project: Project) -> list[str]:
    """`run`'s answers to `rows`, as the eval stage predicts: its fine-tuned model, the eval settings."""
    from tunesmith.tasks.predict import predict
    from tunesmith.train.finetuned import load_finetuned

    model, tokenizer, fmt, _ = load_finetuned(run / "model", need_base=False)
    device = hardware.device()
    preds = predict(model.to(device), tokenizer, fmt, rows, batch_size=project.eval.batch_size,
                    max_new_tokens=project.eval.max_new_tokens,
                    autocast=hardware.use_bf16(project.eval.precision, device), sampling=project.eval.generation)
    return preds.texts


def _paired(project: Project, golds: list[str], champion: list[str], challenger: list[str]) -> dict:
    """The objective metric for both models and compare.py's paired figures for challenger - champion."""
    metric = project.objective.metric
    row = compare(project.task.type, golds, champion, challenger, [metric], project.eval.bootstrap_resamples,
                  project.eval.seed)[metric]
    fn = METRICS[metric].fn
    return {"metric": metric, "n": len(golds), "champion": round(fn(golds, champion), 6),
            "challenger": round(fn(golds, challenger), 6), **row}


def data_line(c: dict) -> str:
    """The data counts in one line."""
    line = (f"{c['labelled']} labelled requests ({c['usable']} usable: {c['incomplete']} cut in the log, "
            f"{c['no_truth']} rated wrong without a label, {c['token_prompts']} token-id prompts left out); "
            f"{c['held_out']} with a label or correction held out as traffic_test"
            f"{_removed_note(c.get('held_out_removed', 0))} ({c['rating_only']} only rated right, never held "
            "out); training "
            f"{c['traffic_used']} traffic rows (x{c['traffic_weight']}), {c['extra_used']} from --data, "
            f"{c['champion_used']} of the champion's; removed {c['duplicates_removed']} duplicates, "
            f"{c['test_overlap_removed']} overlapping a test set")
    return line + (f"; new labels: {', '.join(c['new_labels'])}" if c["new_labels"] else "")


def _removed_note(n: int) -> str:
    return f" (after {n} more removed by its cleaning)" if n else ""


def _say(progress: bool, line: str) -> None:
    if progress:
        print(line, file=sys.stderr)
