"""The data stage: load, validate, split and describe the project's data."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith import fsio
from tunesmith.config import Project
from tunesmith.data.examples import Example, load_examples, raise_for_problems
from tunesmith.data.io import RowProblem
from tunesmith.data.split import stratified_split
from tunesmith.errors import DataError

SPLITS = ("train", "validation", "test")


@dataclass
class Splits:
    """Curated splits and the label set (classification only)."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: list[str] | None = None
    warnings: list[str] = field(default_factory=list)

    def by_name(self) -> dict[str, list[Example]]:
        return {"train": self.train, "validation": self.validation, "test": self.test}


def check_data(project: Project) -> tuple[dict[str, list[Example]], list[RowProblem]]:
    """Validate every configured file; returns examples per file role and all problems."""
    files = {k: getattr(project.data, k) for k in SPLITS if isinstance(getattr(project.data, k), Path)}
    loaded, problems = {}, []
    for role, path in files.items():
        examples, bad = load_examples(path, project.task, project.data.max_errors)
        loaded[role] = examples
        problems.extend(bad)
    return loaded, problems


def prepare_data(project: Project) -> Splits:
    """Validate the data files and build train/validation/test splits.

    Raises:
        DataError: for the first invalid row (all of them are listed in the error's details).
    """
    loaded, problems = check_data(project)
    raise_for_problems(problems, project.data.max_errors)
    data, task = project.data, project.task
    key = (lambda e: e.target) if task.type == "classification" else (lambda e: "")
    train = loaded["train"]
    test = loaded.get("test")
    if test is None:
        fraction = data.test if isinstance(data.test, float) else 0.2
        train, test = stratified_split(train, [key(e) for e in train], fraction, data.seed)
    validation = loaded.get("validation")
    if validation is None:
        train, validation = stratified_split(train, [key(e) for e in train], float(data.validation), data.seed + 1)
    splits = Splits(train, validation, test)
    _check_sizes(splits, data.train)
    if task.type == "classification":
        splits.labels = _label_set(splits, task.labels)
        splits.warnings += _label_warnings(splits)
    return splits


def _check_sizes(splits: Splits, train_path: Path) -> None:
    for name, rows in splits.by_name().items():
        if not rows:
            raise DataError(f"the {name} split is empty", str(train_path),
                            "add examples or give a separate file for it under data:")


def _label_set(splits: Splits, declared: list[str] | None) -> list[str]:
    seen = sorted({e.target for e in splits.train})
    if declared is None:
        return seen
    undeclared = sorted({e.target for rows in splits.by_name().values() for e in rows} - set(declared))
    if undeclared:
        first = next(e for rows in splits.by_name().values() for e in rows if e.target in undeclared)
        raise DataError(f"label '{first.target}' is not in task.labels", first.source,
                        "add it to task.labels or fix the row")
    return list(declared)


def _label_warnings(splits: Splits) -> list[str]:
    counts = Counter(e.target for e in splits.train)
    warnings = [f"label '{lab}' has only {n} training examples" for lab, n in sorted(counts.items()) if n < 5]
    unseen = sorted({e.target for e in splits.test} - set(counts))
    if unseen:
        warnings.append(f"test labels never seen in training: {', '.join(unseen)}")
    return warnings


def data_report(splits: Splits) -> dict:
    """Sizes, label distribution per split, text lengths, warnings."""
    report: dict = {"splits": {}, "labels": splits.labels, "warnings": splits.warnings}
    for name, rows in splits.by_name().items():
        lengths = sorted(len(e.input) for e in rows)
        entry = {"rows": len(rows), "chars_median": lengths[len(lengths) // 2] if lengths else 0,
                 "chars_max": lengths[-1] if lengths else 0}
        if splits.labels is not None:
            entry["label_counts"] = dict(sorted(Counter(e.target for e in rows).items()))
        report["splits"][name] = entry
    return report


def save_splits(splits: Splits, data_dir: Path) -> None:
    """Write the curated splits and report.json under `data_dir`."""
    for name, rows in splits.by_name().items():
        fsio.write_jsonl(data_dir / f"{name}.jsonl", [e.to_json() for e in rows])
    fsio.write_json(data_dir / "report.json", data_report(splits))


def load_splits(data_dir: Path) -> Splits:
    """Read back the splits a data stage saved in a run directory."""
    import json

    rows = {}
    for name in SPLITS:
        path = data_dir / f"{name}.jsonl"
        if not path.is_file():
            raise DataError(f"missing curated split {name}.jsonl", str(data_dir), "run the data stage first")
        rows[name] = [Example.from_json(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines()]
    report = fsio.read_json(data_dir / "report.json")
    return Splits(rows["train"], rows["validation"], rows["test"], report.get("labels"), report.get("warnings", []))
