"""The data stage: load, validate, split and describe the project's data."""

from __future__ import annotations

import hashlib
import os
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith import fsio
from tunesmith.config import Project
from tunesmith.data.augment import augment
from tunesmith.data.clean import Curation
from tunesmith.data.corrections import Corrections
from tunesmith.data.examples import Example, raise_for_problems
from tunesmith.data.io import RowProblem
from tunesmith.data.mitigate import apply_mitigation
from tunesmith.data.normalize import normalize_text
from tunesmith.data.pairs import pairs_from_examples, refuse_undesirable_targets
from tunesmith.data.profile import embedding_spread, split_profile
from tunesmith.data.sources import LoadedData, load_sources, mix_training
from tunesmith.data.split import group_split, stratified_split
from tunesmith.errors import DataError, InputError, TunesmithError
from tunesmith.registry import METHOD_SPECS

SPLITS = ("train", "validation", "test")


@dataclass
class Splits:
    """Curated splits, the label set (classification only) and what curation did."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: list[str] | None = None
    warnings: list[str] = field(default_factory=list)
    curation: Curation | None = None
    # Each role's sources (rows read, kept, taken for training; sha256) and their fingerprint: sources.py.
    sources: dict | None = None
    corrections: dict | None = None     # what data.corrections did (corrections.py)

    def by_name(self) -> dict[str, list[Example]]:
        return {"train": self.train, "validation": self.validation, "test": self.test}


def check_data(project: Project) -> tuple[dict[str, list[Example]], list[RowProblem]]:
    """Validate every configured source; returns examples per role given as sources and all problems."""
    loaded = load_sources(project)
    load_corrections(project)  # a bad corrections file is bad input too
    declared = project.task.labels
    if project.task.type == "classification" and declared is not None:  # what _label_set refuses after cleaning
        allowed = set(declared)
        loaded.problems += [RowProblem(e.file, e.line, f"label '{e.target[:80]}' is not in task.labels")
                            for rows in loaded.examples.values() for e in rows if e.target not in allowed]
    loaded.problems += _method_problems(project, loaded.examples.get("train", []))
    return loaded.examples, loaded.problems


def _method_problems(project: Project, train: list[Example]) -> list[RowProblem]:
    """What the train stage refuses in training rows for train.method (a KTO row in a DPO project, an
    undesirable completion for a supervised method), found by `data check` too: its first such row."""
    try:
        check_method_rows(project, train)
    except DataError as e:
        return [RowProblem(e.path, e.lineno or 0, f"{e.what} ({e.hint})")]
    return []


def check_method_rows(project: Project, train: list[Example]) -> None:
    """DataError at the first training row train.method cannot train on (an SFT row for DPO, a KTO row
    labelled undesirable for a supervised method)."""
    method = project.train.method
    if METHOD_SPECS[method].preference:
        pairs_from_examples(train, kto=method == "kto")
    else:
        refuse_undesirable_targets(train, method)


def load_corrections(project: Project) -> Corrections | None:
    """data.corrections read and validated (DataError at its file:line), or None when not set."""
    path = project.data.corrections
    if path is None:
        return None
    return Corrections.load(path, project.task.text_field, project.task.labels)


def prepare_data(project: Project, progress: bool = False, augment_rows: bool = True) -> Splits:
    """Validate, clean, split, decontaminate, check labels and augment the project's data.

    Cleaning runs per file before splitting (so duplicates cannot straddle splits); held-out rows
    are never augmented and training rows overlapping them are removed.

    Raises:
        DataError: for the first invalid row (all of them are listed in the error's details).
    """
    sources: LoadedData = load_sources(project)
    # With the method's own refusals (SFT rows for DPO), before anything is written or trained, as data check does.
    raise_for_problems(sources.problems + _method_problems(project, sources.examples.get("train", [])),
                       project.data.max_errors)
    data, task = project.data, project.task
    curation = Curation(data.clean, task.type, progress)
    fixes = load_corrections(project)
    loaded = {role: curation.clean_rows(role, rows) for role, rows in sources.examples.items()}
    train, validation, test = _split(loaded, project)
    if data.group_field:  # rows of one group never span two splits, given files included
        train = curation.separate_groups(train, validation + test)
        validation = curation.separate_groups(validation, test, role="validation")
    if fixes is not None:  # after the split (it never moves a row between splits), never on test rows
        train, validation = fixes.apply(curation, "train", train), fixes.apply(curation, "validation", validation)
        fixes.note_test(test)
    train = curation.decontaminate(train, validation + test)
    validation = curation.decontaminate(validation, test, role="validation")
    before_noise, train = train, curation.label_noise(train)
    if fixes is not None:
        train = fixes.honour_keeps(curation, before_noise, train, data.clean.label_noise.action)
    # After cleaning and carving: repeats a weight asks for are neither deduplicated nor split apart.
    train = mix_training(train, sources.sources["train"], data.seed)
    splits = Splits(train, validation, test, curation=curation, sources=sources.report(),
                    corrections=fixes.report() if fixes is not None else None)
    splits.warnings += fixes.warnings() if fixes is not None else []
    _check_sizes(splits, sources.sources["train"][0]["source"], task.type == "classification")
    if augment_rows and data.augment.enabled:
        splits.train = train + augment(train, data.augment, _paraphraser(project))
    if project.fairness.enabled and project.fairness.mitigation != "none":
        splits.train = apply_mitigation(splits.train, project.fairness)
    if task.type == "classification":
        splits.labels = _label_set(splits, task.labels, sources.sources["train"][0]["source"])
        splits.warnings += _label_warnings(splits)
    return splits


DATA_PROCESS_ENV = "TUNESMITH_DATA_PROCESS"


def prepare_data_apart(project: Project, progress: bool = False) -> Splits:
    """`prepare_data` in a child process (`python -m tunesmith.data.child`), for the commands that train next.

    Curation imports scikit-learn, cleanlab and datasets and loads the MiniLM embedder (about 280 MB
    resident on the quickstart). Training never needs them again, and a process cannot hand imported
    libraries back, so they live and end in the child. A fresh interpreter, not a fork: safe whatever
    threads this one has started. Errors come back as raised there. The child runs in a session of its
    own, so a terminal's Ctrl-C reaches only this process, which then kills it; it also dies with this
    process. With the environment variable TUNESMITH_DATA_PROCESS=inline it runs in this process (the
    test suite's setting: one process start less per run).
    """
    mode = os.environ.get(DATA_PROCESS_ENV, "child")
    if mode not in ("child", "inline"):
        raise InputError(f"{DATA_PROCESS_ENV}={mode!r} is not a mode", DATA_PROCESS_ENV, "use child or inline")
    if mode == "inline":
        return prepare_data(project, progress)
    import pickle
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-m", "tunesmith.data.child", str(os.getpid())],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    try:
        out, _ = child.communicate(pickle.dumps((project, progress)))
    except BaseException:  # Ctrl-C here: the child, in its own session, is stopped now
        child.kill()
        child.wait()
        raise
    if child.returncode != 0 or not out:
        raise TunesmithError(f"the data preparation process ended without a result (exit {child.returncode}: "
                             "killed, or out of memory?)", DATA_PROCESS_ENV,
                             f"rerun; {DATA_PROCESS_ENV}=inline prepares the data in this process")
    status, value = pickle.loads(out)
    if status == "error":
        raise value
    return value


def _split(loaded: dict[str, list[Example]], project: Project) -> tuple[list, list, list]:
    """(train, validation, test): given files as they are, fractions carved from train."""
    data, task = project.data, project.task
    keys = (lambda rows: [e.target for e in rows]) if task.type == "classification" else (lambda rows: [""] * len(rows))

    def carve(rows: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
        if data.group_field:
            return group_split(rows, [e.group for e in rows], keys(rows), fraction, seed)
        return stratified_split(rows, keys(rows), fraction, seed)

    train, test = loaded["train"], loaded.get("test")
    if test is None:
        train, test = carve(train, data.test if isinstance(data.test, float) else 0.2, data.seed)
    validation = loaded.get("validation")
    if validation is None:
        train, validation = carve(train, float(data.validation), data.seed + 1)
    return train, validation, test


def _paraphraser(project: Project):
    """The model's paraphrases, normalised as data.clean.normalize says inputs are: a generated text may
    hold control characters (a NUL, a DEL) that cleaning took out of every real row."""
    def paraphrase(texts: list[str], n: int) -> list[list[str]]:
        from tunesmith.data.paraphrase import paraphrase_with_model

        made = paraphrase_with_model(project.model, texts, n, seed=project.data.augment.seed)
        cfg, task = project.data.clean.normalize, project.task.type
        return [[normalize_text(t, cfg, task)[0] for t in row] for row in made]
    return paraphrase


def _check_sizes(splits: Splits, train_path: str, classification: bool) -> None:
    for name, rows in splits.by_name().items():
        if not rows:
            # Say what cleaning took: 50 identical rows leave one, and "empty" alone would puzzle.
            removed = splits.curation.report()["removed_by_reason"] if splits.curation else {}
            parts = [f"cleaning removed {', '.join(f'{n} {k}' for k, n in removed.items())}"] if removed else []
            counts = Counter(e.target for e in splits.train)
            if name != "train" and classification and counts and max(counts.values()) == 1:
                # a fraction is carved per label, and a label's only row stays in training
                parts.append(f"each of the {len(counts)} labels has a single training row, and a label's only "
                             "row is never held out")
            why = f" ({'; '.join(parts)})" if parts else ""
            raise DataError(f"the {name} split is empty{why}", train_path,
                            hint="add examples or give a separate file for it under data:")


def refuse_unlearnable(train: list[Example], test: list[Example], declared: list[str] | None,
                       train_path: str) -> None:
    """DataError for classification rows a model cannot learn or be scored on: a single training label
    (a constant predictor meets a test of that label), or, without task.labels, test labels none of which
    is a training label (0 for both models). `data check` asks too, on the files as given."""
    seen = sorted({e.target for e in train})
    if len(seen) == 1:
        raise DataError(f"the training split holds a single label ('{seen[0][:80]}'): a classifier has nothing to "
                        "tell apart", train_path, hint="add rows of the other labels (two at least)")
    wanted = {e.target for e in test}
    if declared is None and seen and wanted and not wanted & set(seen):
        raise DataError(f"none of the test labels ({_shown_with_look_alikes(sorted(wanted), seen)}) is among the "
                        f"training labels ({', '.join(x[:40] for x in seen[:10])})", _row_at(test[0]),
                        hint="give a test file labelled as the training rows are, or list the classes in task.labels")


def _label_set(splits: Splits, declared: list[str] | None, train_path: str) -> list[str]:
    refuse_unlearnable(splits.train, splits.test, declared, train_path)
    seen = sorted({e.target for e in splits.train})
    if declared is None:
        return seen
    undeclared = sorted({e.target for rows in splits.by_name().values() for e in rows} - set(declared))
    if undeclared:
        first = next(e for rows in splits.by_name().values() for e in rows if e.target in undeclared)
        raise DataError(f"label '{first.target}' is not in task.labels", first.source,
                        hint="add it to task.labels or fix the row")
    return list(declared)


def _row_at(e) -> str:
    """A row's whole path and line when it was read from a file, else its source as recorded."""
    return f"{e.file}:{e.line}" if e.file and e.line else e.source


def _label_warnings(splits: Splits) -> list[str]:
    counts = Counter(e.target for e in splits.train)
    warnings = [f"label '{lab[:80]}' has only {n} training examples" for lab, n in sorted(counts.items()) if n < 5]
    unseen = sorted({e.target for e in splits.test} - set(counts))
    if unseen:
        warnings.append(f"test labels never seen in training: {_shown_with_look_alikes(unseen, list(counts))}")
    return warnings + _look_alike_labels(splits.labels or [])


def _shown_with_look_alikes(labels: list[str], known: list[str]) -> str:
    """`labels` listed, each one that differs from a `known` label only in case or width followed by it:
    a test file spelling the classes another way is the likeliest cause of labels never seen in training."""
    folded = {unicodedata.normalize("NFKC", k).casefold(): k for k in known}
    shown = []
    for label in labels[:20]:
        twin = folded.get(unicodedata.normalize("NFKC", label).casefold())
        shown.append(label[:80] + (f" (training spells it '{twin[:80]}')" if twin is not None else ""))
    return ", ".join(shown) + (f" and {len(labels) - 20} more" if len(labels) > 20 else "")


def _look_alike_labels(labels: list[str]) -> list[str]:
    """Labels that differ only in case or character width (Alpha, alpha, ａｌｐｈａ): kept as separate classes,
    as the data says, but most likely one class spelled several ways."""
    alike: dict[str, list[str]] = {}
    for label in labels:
        alike.setdefault(unicodedata.normalize("NFKC", label).casefold(), []).append(label)
    groups = [names for names in alike.values() if len(names) > 1]
    if not groups:
        return []
    shown = "; ".join(" / ".join(n[:40] for n in names[:4]) for names in groups[:5])
    return [f"{len(groups)} group(s) of labels differ only in case or width, each a class of its own: {shown}"
            f"{' ...' if len(groups) > 5 else ''}; spell each class one way (data.corrections, or fix the rows)"]


def data_report(splits: Splits) -> dict:
    """Sizes, label distribution, lengths, diversity and groups per split, plus what curation did."""
    report: dict = {"splits": {}, "labels": splits.labels, "warnings": splits.warnings}
    if splits.sources is not None:
        report["sources"] = splits.sources
    if splits.corrections is not None:
        report["corrections"] = splits.corrections
    for name, rows in splits.by_name().items():
        report["splits"][name] = split_profile(rows, splits.labels is not None)
    if splits.curation is not None:
        report["curation"] = splits.curation.report()
        vectors = splits.curation.cached_vectors([e.input for e in splits.train if e.augmented is None])
        if vectors is not None:
            report["splits"]["train"]["embedding_spread"] = embedding_spread(vectors)
    return report


def test_removals(data_dir: Path) -> dict:
    """How many test rows the data stage of a run removed, and why (from its data/report.json)."""
    path = Path(data_dir) / "report.json"
    curation = fsio.read_json(path).get("curation", {}) if path.is_file() else {}
    return {"test_rows_removed": curation.get("test_rows_removed", 0),
            "test_rows_removed_by_reason": curation.get("test_rows_removed_by_reason", {})}


def save_splits(splits: Splits, data_dir: Path) -> None:
    """Write the curated splits, what curation removed, changed and suspects, and report.json (with
    each split file's sha256, which `load_splits` checks)."""
    report = data_report(splits)
    for name, rows in splits.by_name().items():
        fsio.write_jsonl(data_dir / f"{name}.jsonl", [e.to_json() for e in rows])
        report["splits"][name]["sha256"] = file_sha256(data_dir / f"{name}.jsonl")
    curation = splits.curation
    fsio.write_jsonl(data_dir / "removed.jsonl", curation.removed if curation else [])
    fsio.write_jsonl(data_dir / "suspects.jsonl", curation.suspects if curation else [])
    fsio.write_jsonl(data_dir / "changes.jsonl", curation.changes if curation else [])
    fsio.write_json(data_dir / "report.json", report)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()  # (hashlib.file_digest is Python 3.11+; 3.10 is supported)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_split(data_dir: Path, name: str, report: dict | None = None) -> list[Example]:
    """One curated split of a run, as its data stage wrote it: a file edited since (its sha256 is not
    the one in data/report.json; runs made before digests were recorded are not checked) is refused,
    as it would be scored, trained on or served from as if it were the split the run was made with.
    `report` is data/report.json when the caller has read it."""
    data_dir = Path(data_dir)
    path = data_dir / f"{name}.jsonl"
    if not path.is_file():
        raise DataError(f"missing curated split {name}.jsonl", str(data_dir), hint="run the data stage first")
    if report is None:
        if not (data_dir / "report.json").is_file():  # what the split is checked against: a run's own file
            raise DataError("missing data/report.json (the data stage's record of the splits)",
                            str(data_dir / "report.json"), hint="restore the run's file, or make a new run")
        report = fsio.read_json(data_dir / "report.json", dict)
    entry = report.get("splits", {}).get(name) if isinstance(report.get("splits"), dict) else None
    recorded = entry.get("sha256") if isinstance(entry, dict) else None
    again = f"restore the run's file; to use other rows, give them as data.{name} in a project and make a new run"
    if recorded is not None and file_sha256(path) != recorded:
        raise DataError(f"the curated {name} split was changed after the data stage wrote it (sha256 differs from "
                        "data/report.json's)", str(path), hint=again)
    rows = [_example(row, path, i) for i, row in enumerate(fsio.read_jsonl(path), start=1)]
    counted = entry.get("rows") if isinstance(entry, dict) else None
    if type(counted) is int and counted != len(rows):  # a run from before the digests: its row count, at least
        raise DataError(f"the curated {name} split was changed after the data stage wrote it ({len(rows)} rows, "
                        f"data/report.json says {counted})", str(path), hint=again)
    return rows


def _example(row, path: Path, i: int) -> Example:
    """A curated row read back; DamagedFile naming its line when it is not one the data stage wrote."""
    try:
        return Example.from_json(row)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise fsio.DamagedFile(path, f"{type(e).__name__}: {e}", i, what="not a curated row") from None


def load_splits(data_dir: Path) -> Splits:
    """Read back the splits a data stage saved in a run directory."""
    report = fsio.read_json(data_dir / "report.json", dict)
    rows = {name: read_split(data_dir, name, report) for name in SPLITS}
    return Splits(rows["train"], rows["validation"], rows["test"], report.get("labels"), report.get("warnings", []))
