"""data.train/test/validation as sources: files, globs, `datasets` folders and hf:// references, each capped
by max_rows, with data.columns applied; the training split mixed by the sources' weights; a fingerprint
of every source, recorded in data/report.json.

Mixing (training split only; held-out sources are used whole). Without any weight the sources are
concatenated. With weights (a source without one counts 1), the training split keeps its size: T, the
rows the sources have left after max_rows, cleaning and carving off held-out fractions. Source i
contributes round(T * w_i / sum(w)) rows (largest remainders, so the shares add up to T exactly): a
seeded sample without repeats when it has that many rows, else all of its rows as often as they fit
whole, plus a seeded sample for the rest. Keeping T fixed means a weight changes the mix, not the
amount of training; repeating a small source is what a weight above its natural share asks for, and
the report says how many rows each source gave, so a heavily repeated source is visible.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from tunesmith.config import Project, TaskConfig
from tunesmith.config.sources import HF_PREFIX, DataSource, locate_path
from tunesmith.data.examples import Example, load_examples
from tunesmith.data.io import RowProblem, RowSource
from tunesmith.errors import DataError, InputError

ROLES = ("train", "validation", "test")
# data.columns field -> the TaskConfig attribute naming the field the task reads (others keep their name).
TASK_FIELD_KEYS = {"text": "text_field", "label": "label_field", "prompt": "prompt_field",
                   "completion": "completion_field"}


@dataclass
class LoadedData:
    """Examples per role given as sources, every row problem, and one report entry per source."""

    examples: dict[str, list[Example]] = field(default_factory=dict)
    problems: list[RowProblem] = field(default_factory=list)
    sources: dict[str, list[dict]] = field(default_factory=dict)

    def report(self) -> dict:
        """What data/report.json records: each role's sources and one fingerprint of all of them."""
        digest = hashlib.sha256(json.dumps(self.sources, sort_keys=True).encode()).hexdigest()
        return {**self.sources, "fingerprint": digest}


def load_sources(project: Project) -> LoadedData:
    """Read every source of data.train/test/validation (fractions are carved later, in prepare)."""
    out = LoadedData()
    for role in ROLES:
        srcs = project.data.sources(role)
        if not srcs:
            continue
        out.examples[role], out.sources[role] = [], []
        for i, src in enumerate(srcs):
            rows, problems, entry = _load_source(project, role, i, src)
            out.examples[role] += rows
            out.problems += problems
            out.sources[role].append(entry)
    return out


def _load_source(project: Project, role: str, index: int, src: DataSource) -> tuple[list[Example], list, dict]:
    key = f"data.{role}"
    where = f"{project.source} ({key})" if project.source else key
    locations = locate(src, project.base_dir, where)
    # A source's own columns replace data.columns for it (sources with different schemas mix).
    renames = column_renames(project.data.columns if src.columns is None else src.columns, project.task)
    columns_key = "data.columns" if src.columns is None else f"data.{role}.{index}.columns"
    rows, problems = [], []
    for location in locations:
        got, bad = load_examples(RowSource(location, renames, where, columns_key), project.task,
                                 project.data.max_errors, project.data.group_field, project.fairness.group_fields)
        rows += got
        problems += bad
    read = len(rows)
    if src.max_rows is not None and read > src.max_rows:
        rng = random.Random(f"{project.data.seed}:{role}:{index}:max_rows")
        rows = [rows[j] for j in sorted(rng.sample(range(read), src.max_rows))]
    entry = {"source": src.path, "locations": locations, "weight": src.weight, "max_rows": src.max_rows,
             "rows_read": read, "rows_kept": len(rows), "sha256": _fingerprint(locations, rows)}
    return rows, problems, entry


def locate(src: DataSource, base: Path, where: str) -> list[str]:
    """The files (or folder, or hf:// reference) a source reads; a glob matched now unless the config
    recorded its files (a run's saved config.yaml)."""
    if src.path.startswith(HF_PREFIX):
        return [src.path]
    located = locate_path(src.path, base, src.files)
    if located.files is None:
        return [located.path]
    if not located.files:
        raise InputError(f"no data file matches {src.path}", where,
                         f"globs are relative to the config file's folder ({base})")
    return located.files


def column_renames(columns: dict[str, str], task: TaskConfig) -> tuple[tuple[str, str, str], ...]:
    """(data.columns field, the name the task reads it under, the source's column) for each mapping."""
    return tuple((name, getattr(task, TASK_FIELD_KEYS[name]) if name in TASK_FIELD_KEYS else name, column)
                 for name, column in columns.items())


def _fingerprint(locations: list[str], rows: list[Example]) -> str:
    """sha256 of a source's bytes (a folder: every file in it); of its rows for an hf:// cache entry,
    whose files datasets owns and may lay out differently from one version to the next."""
    h = hashlib.sha256()
    for location in locations:
        h.update(location.encode() + b"\0")
        if location.startswith(HF_PREFIX):
            for e in rows:
                h.update(json.dumps(e.record, sort_keys=True, default=str).encode() + b"\n")
            continue
        path = Path(location)
        for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
            h.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def mix_training(train: list[Example], entries: list[dict], seed: int) -> list[Example]:
    """The training rows drawn from each source in proportion to its weight (see the module docstring);
    unchanged when no source has a weight. Adds rows_available and rows_taken to each entry."""
    owner = {loc: i for i, entry in enumerate(entries) for loc in entry["locations"]}
    groups: list[list[Example]] = [[] for _ in entries]
    for e in train:
        groups[owner.get(e.file, 0)].append(e)
    for entry, group in zip(entries, groups):
        entry["rows_available"] = len(group)
    if all(entry["weight"] is None for entry in entries):
        for entry, group in zip(entries, groups):
            entry["rows_taken"] = len(group)
        return train
    weights = [entry["weight"] or 1.0 for entry in entries]
    targets = shares(len(train), weights)
    rng = random.Random(f"{seed}:mix")
    out: list[Example] = []
    for entry, group, target in zip(entries, groups, targets):
        if target and not group:
            raise DataError(f"source {entry['source']} has no training rows left (after max_rows, cleaning and "
                            "held-out carving), so its weight cannot be met", entry["source"],
                            hint="remove its weight or the source, or give it more rows")
        out += draw(group, target, rng)
        entry["rows_taken"] = target
    return out


def shares(total: int, weights: list[float]) -> list[int]:
    """total split in proportion to weights, by largest remainders (the parts add up to total)."""
    exact = [total * w / sum(weights) for w in weights]
    parts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (parts[i] - exact[i], i))
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


def draw(rows: list[Example], k: int, rng: random.Random) -> list[Example]:
    """k rows: a seeded sample without repeats when there are enough, else whole copies plus a sample.
    Repeats are copies, so a later per-row change (a fairness weight) cannot reach two rows at once."""
    if not rows:
        return []
    whole, rest = divmod(k, len(rows))
    out = list(rows) if whole else []
    out += [replace(e) for _ in range(whole - 1) for e in rows]
    picked = [rows[j] for j in sorted(rng.sample(range(len(rows)), rest))]
    return out + ([replace(e) for e in picked] if whole else picked)


def describe(project: Project, role: str) -> str:
    """data.ROLE as a short text (for `tunesmith data check`)."""
    value = getattr(project.data, role)
    return ", ".join(src.path for src in value) if isinstance(value, list) else str(value)


def input_paths(project: Project) -> list[Path]:
    """Every local file or folder the data sources read (hf:// references have none)."""
    out = []
    for role in ROLES:
        for src in project.data.sources(role):
            try:
                out += [Path(p) for p in locate(src, project.base_dir, f"data.{role}") if not p.startswith(HF_PREFIX)]
            except InputError:
                continue
    return out
