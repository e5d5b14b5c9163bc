"""Commands of the production loop: feedback on live answers, retraining a challenger, promotion
and rollback. Each is a thin function over the stage code; `register` adds them to the app."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tunesmith.cli.common import DEBUG, guarded

# --- feedback -------------------------------------------------------------------------------------
feedback_app = typer.Typer(no_args_is_help=True, help="Verdicts on served answers: import labels that arrive offline.")


@feedback_app.command("import")
def feedback_import(file: Path = typer.Argument(..., help="JSONL or CSV: {request_id, label | correction | rating}."),
                    run: Optional[Path] = typer.Option(None, "--run", help="The served run: its request log."),
                    db: Optional[Path] = typer.Option(None, "--db", help="The request log file itself."),
                    replace: bool = typer.Option(False, "--replace", help="Replace verdicts already stored."),
                    debug: bool = DEBUG) -> None:
    """Store verdicts on logged answers, all or none (a bad row: exit 2 naming file:line)."""
    def go() -> int:
        from tunesmith.serve.feedback import import_file

        path, redact = _request_log(run, db)
        done = import_file(file, path, replace, redact)
        print(f"imported {done.total} verdicts (new {done.new}, replaced {done.replaced}) into {done.db}")
        return 0
    guarded(debug, go)


def _request_log(run: Path | None, db: Path | None) -> tuple[Path, bool]:
    """The log --run/--db name and whether it redacts PII (a bare --db: yes; a run: its serve.request_log)."""
    from tunesmith.errors import InputError, RunDirError
    from tunesmith.serve.server import serve_settings

    if (run is None) == (db is None):
        raise InputError("give exactly one of --run RUN_DIR or --db PATH", "--run/--db")
    if db is not None:
        return db, True
    if not (run / "config.yaml").is_file():
        raise RunDirError(f"not a run directory (no config.yaml): {run}", "--run")
    cfg, path = serve_settings(run)
    if not Path(path).is_file():
        raise RunDirError(f"no request log at {path}", "--run", "serve the run first (`tunesmith serve RUN_DIR`); "
                          "a run swapped in by `serve --registry` is logged in the first run's log: give it with --db")
    return Path(path), cfg.request_log.redact_pii

# --- retrain --------------------------------------------------------------------------------------
def retrain_command(run_dir: Optional[Path] = typer.Argument(None, help="The champion: the served run directory."),
                    registry: Optional[str] = typer.Option(None, "--registry",
                                                           help="Retrain the run promoted under this name instead "
                                                                "of RUN_DIR (and record the challenger under it)."),
                    data: Optional[Path] = typer.Option(None, "--data", help="Extra labelled rows in the task's "
                                                                             "data format."),
                    out: Optional[Path] = typer.Option(None, "--out", help="The challenger's run directory "
                                                                           "(default: a new run beside the champion)."),
                    db: Optional[Path] = typer.Option(None, "--db", help="The request log (default: the "
                                                                         "champion's serve.request_log)."),
                    name: Optional[str] = typer.Option(None, "--name", help="Champion registry name (default: "
                                                                            "the project name)."),
                    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
                    debug: bool = DEBUG) -> None:
    """Train a challenger on the champion's data plus labelled traffic; promote it when it is not worse on
    the test split, better on recent traffic and meets the objective. Exit 0 promoted, 3 rejected, 2 bad input."""
    def go() -> int:
        from tunesmith.pipeline.retrain import data_line, retrain

        champion, registry_name = _champion(run_dir, registry, name)
        result = retrain(champion, data, out, db, registry_name, progress=not quiet)
        rec = result.record
        print(f"challenger: {result.challenger} (champion: {result.champion})")
        print("data: " + data_line(rec["data"]))
        for label, key in (("original test split", "test"), ("recent traffic", "traffic")):
            print(f"{label}: " + _comparison_line(rec["comparisons"][key]))
        print(("PROMOTED" if result.promoted else "REJECTED") + f" under {rec['name']}:")
        for check in result.decision.checks:
            print(f"  [{'ok' if check.passed else 'no'}] {check.detail}")
        if "not_promoted" in rec:
            print(f"  [no] {rec['not_promoted']}")
        print(f"promotion.json: {result.path}")
        return result.exit_code
    guarded(debug, go)


def _champion(run_dir: Path | None, registry: str | None, name: str | None) -> tuple[Path, str | None]:
    """(champion run, registry name): RUN_DIR, or the run promoted under --registry, which is then also
    the name the challenger is recorded under unless --name says otherwise."""
    from tunesmith.errors import InputError

    if (run_dir is None) == (registry is None):
        raise InputError("give the champion as RUN_DIR or as --registry NAME" +
                         (", not both" if run_dir is not None else ""), "--registry",
                         "`tunesmith retrain RUN_DIR` or `tunesmith retrain --registry NAME`")
    if name is not None:  # `--name ""` fell back to the default name, unsaid
        from tunesmith import champions

        champions.check_name(name, "--name")
    if registry is None:
        return run_dir, name
    from tunesmith.serve.server import champion_run

    return champion_run(registry), registry if name is None else name


def _comparison_line(row: dict | None) -> str:
    if row is None:
        return "no rows to compare"
    return (f"{row['metric']} champion {row['champion']:.4f}, challenger {row['challenger']:.4f}, "
            f"diff {row['diff']:+.4f} [95% CI {row['ci_low']:+.4f}, {row['ci_high']:+.4f}], "
            f"p={row['p_value']:.4g} ({row['test']}, n={row['n']})")


# --- promote / rollback ---------------------------------------------------------------------------
def promote_command(run_dir: Path = typer.Argument(..., help="a trained run directory"),
                    name: Optional[str] = typer.Option(None, "--name",
                                                       help="Registry name (default: the run's project name)."),
                    force: bool = typer.Option(False, "--force", help="Promote a run that did not meet its "
                                                                      "objective or was not evaluated."),
                    reason: str = typer.Option("manual", "--reason", help="Why, kept in the registry's history."),
                    debug: bool = DEBUG) -> None:
    """Make RUN_DIR the champion served under NAME: `tunesmith serve --registry NAME` swaps to it."""
    def go() -> int:
        from tunesmith import champions

        if name is not None:
            champions.check_name(name, "--name")
        _check_run(run_dir)
        project = _check_servable(run_dir)
        registry = name if name is not None else project.name
        met = _objective_met(run_dir, force)
        before = champions.current(registry)
        if before is not None and before != run_dir.resolve():
            _check_same_kind(before, run_dir, registry)
        event = champions.promote(registry, run_dir, reason=reason, record={"objective_met": met, "forced": force})
        if before is not None and before == run_dir.resolve():
            print(f"{run_dir} is already the champion of {registry} (nothing changed)")
            return 0
        previous = next(e["previous"] for e in champions.history(registry) if e["id"] == event)
        print(f"promoted {run_dir} as {registry} (was: {previous or 'none'})")
        return 0
    guarded(debug, go)


def rollback_command(name: str = typer.Argument(..., help="the registry name"),
                     reason: str = typer.Option("manual", "--reason", help="Why, kept in the registry's history."),
                     debug: bool = DEBUG) -> None:
    """Serve NAME's champion before the current one again: `tunesmith serve --registry NAME` swaps back."""
    def go() -> int:
        from tunesmith import champions

        now, before = champions.rollback(name, reason=reason, check=_check_servable)
        print(f"rolled back {name}: now serving {now} (was: {before})")
        return 0
    guarded(debug, go)


def _check_run(run_dir: Path) -> None:
    """A trained run with its config (the default registry name is its project name)."""
    from tunesmith.errors import RunDirError
    from tunesmith.runs import is_run_dir

    if not is_run_dir(run_dir) or not (run_dir / "config.yaml").is_file():
        raise RunDirError("not a trained run directory (no model/tunesmith.json or config.yaml)", str(run_dir),
                          "give a folder made by `tunesmith run` or `tunesmith retrain`")


def _check_servable(run_dir: Path):
    """The run's project, once what a server following the registry reads first is found whole: its
    config and its model folder (the base an adapter applies to included). Refused now, not when the
    server swaps or restarts."""
    from tunesmith.config import load_config
    from tunesmith.train.finetuned import check_model_files

    project = load_config(run_dir / "config.yaml", check_files=False)
    check_model_files(run_dir / "model")
    return project


def _check_same_kind(champion: Path, run_dir: Path, registry: str) -> None:
    """A run answering another kind of request than the champion it would replace is refused: a server
    following the registry refuses to swap to it (serve/swap.py), and would serve the old one for ever."""
    from tunesmith.errors import InputError
    from tunesmith.train.finetuned import read_prompt_format

    try:
        have = read_prompt_format(champion / "model" / "prompt.json")
    except Exception:  # noqa: BLE001 - the champion's folder is damaged or gone: no kind to keep
        return
    new = read_prompt_format(run_dir / "model" / "prompt.json")
    if have.task_type != new.task_type or bool(have.labels) != bool(new.labels):
        raise InputError(f"the run's task type is {new.task_type}, the champion of {registry} ({champion}) is a "
                         f"{have.task_type} run: a server following {registry} would refuse it", "--name",
                         "promote it under a name of its own")


def _objective_met(run_dir: Path, force: bool) -> bool | None:
    """Whether the run met its objective (None: not evaluated); a run that did not, or was not
    evaluated, is refused unless `force`."""
    from tunesmith.errors import InputError
    from tunesmith.runs import read_summary

    summary = run_dir / "summary.json"
    verdict = read_summary(run_dir).get("objective") if summary.is_file() else None  # checked as eval writes it
    met = None if verdict is None else verdict["met"]
    if met or force:
        return met
    if met is None:
        raise InputError("the run has no objective verdict (not evaluated)", str(summary),
                         f"run `tunesmith eval {run_dir}` first, or pass --force to promote it anyway")
    missed = [f"{c.get('name')} {c.get('value')} (needs {c.get('op')} {c.get('target')})"
              for c in verdict.get("criteria", []) if c.get("met") is not True]
    raise InputError("the run did not meet its objective" + (f": {', '.join(missed)}" if missed else ""),
                     str(run_dir), "pass --force to promote it anyway")


def register(app: typer.Typer) -> None:
    """Add the loop's commands to `app`."""
    app.add_typer(feedback_app, name="feedback")
    app.command("retrain")(retrain_command)
    app.command("promote")(promote_command)
    app.command("rollback")(rollback_command)
