"""Commands over datasets and people's judgements: `data check|clean|augment|split|report|pairs` and
`human export|import`. Each is a thin function over the stage code; `register` adds them to the app."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tunesmith.cli.common import DEBUG, QUIET
from tunesmith.cli.common import guarded as _guarded

data_app = typer.Typer(no_args_is_help=True, help="Check and prepare datasets.")
human_app = typer.Typer(no_args_is_help=True, help="Human A/B evaluation: export blinded pairs, import ratings.")


def register(app: typer.Typer) -> None:
    """Add the `data` and `human` command groups to `app`."""
    app.add_typer(data_app, name="data")
    app.add_typer(human_app, name="human")


DATA_OUT = typer.Option(..., "--out",
                        help="Folder for the cleaned splits, removed/suspects/changes.jsonl and report.json.")


def _data_command(config: Path, debug: bool, quiet: bool, fn) -> None:
    """Load the config, run one data command, print its lines."""
    def go() -> int:
        from tunesmith.config import load_config

        for line in fn(load_config(config), not quiet):
            print(line)
        return 0
    _guarded(debug, go, details=True)


@data_app.command("check")
def data_check(config: Path = typer.Argument(..., help="project.yaml"), debug: bool = DEBUG) -> None:
    """Validate every data file; list each bad row with file:line. Exit 2 when any row is invalid."""
    from tunesmith.data import stage

    _data_command(config, debug, True, lambda project, _: stage.check(project))


@data_app.command("clean")
def data_clean(config: Path = typer.Argument(..., help="project.yaml"), out: Path = DATA_OUT,
               quiet: bool = QUIET, debug: bool = DEBUG) -> None:
    """Clean and split as data.clean says; every removed row is listed with its reason."""
    from tunesmith.data import stage

    _data_command(config, debug, quiet, lambda project, progress: stage.clean(project, out, progress))


@data_app.command("augment")
def data_augment(config: Path = typer.Argument(..., help="project.yaml"), out: Path = DATA_OUT,
                 quiet: bool = QUIET, debug: bool = DEBUG) -> None:
    """Clean, split, then add augmented training rows as data.augment says."""
    from tunesmith.data import stage

    _data_command(config, debug, quiet, lambda project, progress: stage.augment_data(project, out, progress))


@data_app.command("split")
def data_split(config: Path = typer.Argument(..., help="project.yaml"), out: Path = DATA_OUT,
               debug: bool = DEBUG) -> None:
    """Stratified (or data.group_field-aware) train/validation/test split with the configured seed."""
    from tunesmith.data import stage

    _data_command(config, debug, True, lambda project, _: stage.split(project, out))


@data_app.command("report")
def data_report_command(config: Path = typer.Argument(..., help="project.yaml"),
                        out: Optional[Path] = typer.Option(None, "--out", help="Write report.json here."),
                        quiet: bool = QUIET, debug: bool = DEBUG) -> None:
    """Sizes per step, labels, lengths, duplicates, PII, diversity and groups of the curated data."""
    from tunesmith.data import stage

    def report(project, progress: bool) -> list[str]:
        def page(folder: Path, data: dict) -> None:
            from tunesmith.report.data_section import write_data_page  # matplotlib: only when a page is written

            write_data_page(folder, data, project.name)
        return stage.report(project, out, progress, page if out is not None else None).lines
    _data_command(config, debug, quiet, report)


@data_app.command("pairs")
def data_pairs(run_dir: Path = typer.Argument(..., help="a finished generation or chat run directory"),
               out: Path = typer.Option(..., "--out", help="A new or empty folder for pairs.jsonl and summary.json."),
               split: str = typer.Option("train", "--split", help="train, validation or test: where the prompts "
                                         "come from (test: a held-out set for the DPO run's data.test)"),
               keep_correct: bool = typer.Option(False, "--keep-correct", help="also write the rows answered "
                                                 "right, as plain prompt/completion rows"),
               quiet: bool = QUIET, debug: bool = DEBUG) -> None:
    """Preference pairs from one of the run's splits: chosen = the gold answer, rejected = the run's own
    wrong greedy answer (rows it answers right are skipped). Train on them with train.method dpo."""
    def go() -> int:
        from tunesmith.evaluate.onpolicy_pairs import build_pairs

        s = build_pairs(run_dir, out, not quiet, split, keep_correct)
        what = "kept as plain rows" if keep_correct else "skipped"
        print(f"{s['pairs']} pairs from {s['rows']} {split} rows ({s['skipped_correct']} answered right and "
              f"{s['skipped_empty']} empty, {what}); written to {out / 'pairs.jsonl'}")
        return 0
    _guarded(debug, go)


@human_app.command("export")
def human_export(run_dir: Path = typer.Argument(..., help="an evaluated run directory"),
                 against: Optional[Path] = typer.Option(None, "--against", help="compare with this run instead of "
                                                        "the baseline"),
                 out: Optional[Path] = typer.Option(None, "--out", help="folder (default RUN_DIR/human)"),
                 n: Optional[int] = typer.Option(None, "--n", help="at most this many pairs"),
                 seed: Optional[int] = typer.Option(None, "--seed", help="blinding seed (default: a random "
                                                    "one, recorded in key.json)"),
                 overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier export in the "
                                                "folder (its key no longer matches ratings collected for it)"),
                 debug: bool = DEBUG) -> None:
    """Write blinded, shuffled A/B pairs as pairs.csv and a rating form (form.html), plus key.json."""
    def go() -> int:
        from tunesmith.evaluate.human import export_pairs

        folder = export_pairs(run_dir, out or Path(run_dir) / "human", against, n, seed, overwrite)
        print(f"pairs: {folder / 'pairs.csv'}\nform: {folder / 'form.html'} (send to raters)\n"
              f"key: {folder / 'key.json'} (keep; needed to import ratings)")
        return 0
    _guarded(debug, go)


@human_app.command("import")
def human_import(ratings: list[Path] = typer.Argument(..., help="one ratings CSV per rater"),
                 key: Path = typer.Option(..., "--key", help="key.json written by `human export`"),
                 debug: bool = DEBUG) -> None:
    """Win/tie/loss rates with 95% intervals and inter-rater agreement; writes results.json beside the key."""
    def go() -> int:
        from tunesmith import fsio
        from tunesmith.evaluate.human import import_ratings

        result = import_ratings(key, ratings)
        fsio.write_json(Path(key).parent / "results.json", result)
        pooled = result["pooled"]
        print(f"{result['one']} vs {result['two']}: {pooled['ratings']} ratings by {result['raters']} rater(s)")
        for o in ("win", "tie", "loss"):
            r = pooled[o]
            print(f"  {o}: {r['rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] ({r['count']})")
        agree = result["agreement"]
        if agree.get("value") is not None:
            print(f"  agreement: {agree['statistic']} {agree['value']:.3f} on {agree['pairs']} pairs")
        elif agree.get("note"):
            print(f"  agreement: none measured ({agree['note']})")
        print(f"results: {Path(key).parent / 'results.json'}")
        return 0
    _guarded(debug, go)
