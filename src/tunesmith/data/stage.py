"""`tunesmith data check|clean|augment|split|report`: the data stage's commands, each returning the
lines to print. Outputs go to a folder that appears complete or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunesmith import fsio, runs
from tunesmith.config import Project
from tunesmith.data.examples import Example, raise_for_problems
from tunesmith.data.prepare import (
    Splits,
    check_data,
    data_report,
    load_corrections,
    prepare_data,
    refuse_unlearnable,
    save_splits,
)
from tunesmith.data.sources import describe, input_paths
from tunesmith.errors import InputError

# A text this many characters per token of task.max_length is almost surely truncated.
CHARS_PER_TOKEN = 4
IMBALANCE_RATIO = 10
# What clean/augment/split/report write into --out, and the marker that says a folder is their output
# (so a later command may write there again; any other non-empty folder is the user's and left alone).
OUTPUT_FILES = ("train.jsonl", "validation.jsonl", "test.jsonl", "removed.jsonl", "suspects.jsonl",
                "changes.jsonl", "report.json", "report.html")
MARKER = ".tunesmith-data"


def check(project: Project) -> list[str]:
    """Validate every row of every file (raises DataError listing all bad rows) and summarise."""
    loaded, problems = check_data(project)
    raise_for_problems(problems, project.data.max_errors)
    lines = [f"{role}: {len(rows)} valid rows ({_file(project, role)})" for role, rows in loaded.items()]
    rows = [e for group in loaded.values() for e in group]
    lines += [f"warning: {w}" for w in check_warnings(project, loaded)]
    if project.data.corrections is not None:  # check_data has validated it
        fixes = load_corrections(project)
        lines.append(f"corrections: {len(fixes.decisions)} decisions ({fixes.path})")
    if project.task.type == "classification":
        train = loaded["train"]
        if train:
            refuse_unlearnable(train, loaded.get("test", []), project.task.labels, train[0].file or train[0].source)
        counts = Counter(e.target for e in train)
        lines.append(f"labels: {len(counts)} in train; " + ", ".join(f"{k[:80]} {v}" for k, v in counts.most_common()))
    lines.append(f"data OK: {len(rows)} rows")
    return lines


def check_warnings(project: Project, loaded: dict[str, list[Example]]) -> list[str]:
    """Oversized texts, class imbalance, classes with too few examples, labels unseen in training."""
    out = []
    limit = project.task.max_length * CHARS_PER_TOKEN
    long_rows = [e for rows in loaded.values() for e in rows if len(e.input) + len(e.target) > limit]
    for e in long_rows[: project.data.max_errors]:
        out.append(f"{e.file}:{e.line}: {len(e.input) + len(e.target)} characters, likely longer than "
                   f"task.max_length ({project.task.max_length} tokens) and truncated")
    if len(long_rows) > project.data.max_errors:
        out.append(f"... and {len(long_rows) - project.data.max_errors} more oversized rows")
    if project.task.type != "classification":
        return out
    counts = Counter(e.target for e in loaded["train"])
    if counts and max(counts.values()) > IMBALANCE_RATIO * min(counts.values()):
        (big, nb), (small, ns) = counts.most_common()[0], counts.most_common()[-1]
        out.append(f"class imbalance: '{big}' has {nb} training rows, '{small}' {ns} (ratio > {IMBALANCE_RATIO})")
    out += [f"label '{k[:80]}' has only {n} training rows (fewer than 5)" for k, n in sorted(counts.items()) if n < 5]
    held = {e.target for role in ("validation", "test") for e in loaded.get(role, [])}
    out += [f"label '{k}' appears in held-out files but never in train" for k in sorted(held - set(counts))]
    return out


def clean(project: Project, out: Path, progress: bool = True) -> list[str]:
    """Clean and split; write the splits, removed.jsonl, suspects.jsonl, changes.jsonl, report.json."""
    check_out(project, out)
    splits = prepare_data(project, progress=progress, augment_rows=False)
    _write(splits, out)
    return summary(splits, out)


def augment_data(project: Project, out: Path, progress: bool = True) -> list[str]:
    """Clean, split and augment the training split as data.augment says."""
    check_out(project, out)
    splits = prepare_data(project, progress=progress, augment_rows=True)
    _write(splits, out)
    made = Counter(e.augmented.split(":")[0] for e in splits.train if e.augmented)
    return summary(splits, out) + [f"augmented training rows: {sum(made.values())} "
                                   f"({', '.join(f'{k} {v}' for k, v in sorted(made.items())) or 'none'})"]


def split(project: Project, out: Path) -> list[str]:
    """Split only (no cleaning): stratified, or group-aware with data.group_field."""
    check_out(project, out)
    raw = project.model_copy(deep=True)
    raw.data.clean.enabled = False
    splits = prepare_data(raw, augment_rows=False)
    _write(splits, out)
    removed = splits.curation.report().get("removed_by_reason", {}) if splits.curation else {}
    return ([f"{name}: {len(rows)} rows" for name, rows in splits.by_name().items()]
            + [f"removed: {', '.join(f'{k} {v}' for k, v in removed.items())}"] * bool(removed)
            + [f"warning: {w}" for w in splits.warnings] + [f"written to {out}"])


@dataclass
class DataReport:
    """What `tunesmith data report` found: the report (as data/report.json holds it) and the lines to print."""

    report: dict
    lines: list[str]


def report(project: Project, out: Path | None, progress: bool = True,
           page: Callable[[Path, dict], object] | None = None) -> DataReport:
    """The data report (what `run` writes to data/report.json), optionally saved as out/report.json with
    what `page(folder, report)` writes beside it (the caller's report.html: pages belong to the report
    layer, which sits above data). Both are published together, or neither is."""
    if out is not None:
        check_out(project, out)
    splits = prepare_data(project, progress=progress)
    rep = data_report(splits)
    if out is not None:
        def write(stage: Path) -> None:
            fsio.write_json(stage / "report.json", rep)
            if page is not None:
                page(stage, rep)
        _publish(Path(out), write)
    return DataReport(rep, summary(splits, None) + ([f"report written to {out}"] if out is not None else []))


def summary(splits: Splits, out: Path | None) -> list[str]:
    lines = [f"{name}: {len(rows)} rows" for name, rows in splits.by_name().items()]
    cur = splits.curation.report() if splits.curation else {}
    removed = cur.get("removed_by_reason", {})
    lines.append("removed: " + (", ".join(f"{k} {v}" for k, v in removed.items()) or "nothing"))
    if cur.get("test_rows_removed"):
        # Said on a line of its own: fewer test rows change the benchmark that runs are compared on.
        lines.append(f"test rows removed: {cur['test_rows_removed']} (" + ", ".join(
            f"{k} {v}" for k, v in cur["test_rows_removed_by_reason"].items()) + "; listed in removed.jsonl)")
    if cur.get("pii_found"):
        lines.append("PII found: " + ", ".join(f"{k} {v}" for k, v in cur["pii_found"].items()))
    if cur.get("conflicting_duplicates_total"):
        lines.append(f"similar rows with different labels: {cur['conflicting_duplicates_total']} pairs, kept "
                     "(see report.json)")
    if cur.get("kept_duplicates_by_kind"):
        lines.append("duplicates found and kept (action: report): "
                     + ", ".join(f"{k} {v}" for k, v in cur["kept_duplicates_by_kind"].items()) + " (see report.json)")
    if cur.get("suspected_label_errors"):
        lines.append(f"suspected label errors: {cur['suspected_label_errors']}"
                     + (f" (see {Path(out) / 'suspects.jsonl'})" if out else ""))
    if splits.corrections:
        c = splits.corrections
        lines.append(f"corrections: relabelled {c['rows_relabelled']}, dropped {c['rows_dropped']}, kept "
                     f"{c['rows_kept']} rows ({c['file']})")
    lines += [f"warning: {w}" for w in splits.warnings]
    if out is not None:
        lines.append(f"written to {out}")
    return lines


def check_out(project: Project, out: Path) -> None:
    """Refuse an --out whose files are not ours to replace: one of the project's own input files (always),
    or a non-empty folder that is not an earlier output of these commands. A new or empty folder is fine.

    Raises:
        InputError: naming --out; nothing has been touched.
    """
    out = Path(out).absolute()
    where = f"--out {out}"
    inputs = _input_files(project)
    clash = [name for name in OUTPUT_FILES + (MARKER,) if (out / name).resolve() in inputs]
    if clash:
        raise InputError(f"would overwrite the project's own input file {out / clash[0]}", where,
                         "give a new folder for the output, e.g. --out data-clean")
    run = runs.enclosing_run(out)  # a link to a run's data/ is that folder; RUN/../x is not inside RUN
    if run is not None:  # a run's data/ looks like our output, but its splits are what the run was scored on
        raise InputError(f"is inside the run directory {run}; a run's files are never replaced", where,
                         "give a folder outside any run, e.g. --out data-clean")
    fsio.check_output_folder(out, where, is_data_output, "tunesmith data")


def is_data_output(folder: Path) -> bool:
    """Whether `folder` was written by `tunesmith data clean|augment|split|report`: it holds the marker,
    or (output of a version without the marker) only our file names and a tunesmith report.json."""
    if (folder / MARKER).is_file():
        return True
    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    if "report.json" not in names or not names <= set(OUTPUT_FILES):
        return False
    try:
        report = fsio.read_json(folder / "report.json")
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(report, dict) and {"splits", "labels"} <= set(report)


def _input_files(project: Project) -> set[Path]:
    """The files the project reads (config, data files, benchmark suites), symlinks resolved."""
    return data_inputs(project) | ({Path(project.base_dir, project.source).resolve()} if project.source else set())


def data_inputs(project: Project) -> set[Path]:
    """The data the project reads (data sources, corrections, benchmark suites), symlinks resolved."""
    paths = input_paths(project) + [suite.data for suite in project.benchmarks]
    paths += [project.data.corrections] if project.data.corrections is not None else []
    return {Path(project.base_dir, p).resolve() for p in paths}


def _mark(out: Path) -> None:
    fsio.write_text(out / MARKER, "written by tunesmith data; a later `tunesmith data ... --out` may replace "
                    "the files here\n")


def _write(splits: Splits, out: Path) -> None:
    """save_splits into `out` as one step: `_publish`."""
    _publish(out, lambda stage: save_splits(splits, stage))


def _publish(out: Path, write) -> None:
    """`write(folder)` into a hidden folder inside `out`, then each file moved into place, and the outputs
    of an earlier command this one does not write removed (a report.html of other data beside a new
    report.json): nothing is moved until every file is written, and a name held by a folder or a link is
    refused first. A folder made here is removed again when anything fails."""
    out = Path(out)
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        _mark(out)  # first: a folder a kill left half-made can be written again
        for stale in out.glob(".writing-*"):  # what a killed earlier command left
            shutil.rmtree(stale, ignore_errors=True)
        stage = Path(tempfile.mkdtemp(prefix=".writing-", dir=out))
        try:
            write(stage)
            written = sorted(p.name for p in stage.iterdir())
            if blocked := next((n for n in OUTPUT_FILES if (out / n).is_symlink() or (out / n).exists()
                                and not (out / n).is_file()), None):
                raise InputError(f"{out / blocked} is not a file an earlier `tunesmith data` wrote", f"--out {out}",
                                 "move it away, or give a new folder")
            with fsio.signals_deferred():  # the output is replaced whole: Ctrl-C waits until it is
                for name in set(OUTPUT_FILES) - set(written):
                    (out / name).unlink(missing_ok=True)
                for name in written:
                    os.replace(stage / name, out / name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    except BaseException:
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _file(project: Project, role: str) -> str:
    return describe(project, role)
