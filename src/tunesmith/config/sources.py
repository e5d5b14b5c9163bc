"""Data sources of data.train/test/validation: files, globs, `datasets` save_to_disk folders and
hf://NAME[:CONFIG]/SPLIT references, each optionally weighted and capped (how they mix: data/sources.py)."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import Field, ValidationError, field_validator

from tunesmith.config.settings import _Strict


class KeyedError(ValueError):
    """A cross-field error that knows which key it belongs to."""

    def __init__(self, loc: tuple, msg: str):
        super().__init__(msg)
        self.loc, self.msg = loc, msg


HF_PREFIX = "hf://"
# hf://NAME[:CONFIG]/SPLIT, NAME optionally owner/name. Character classes without '/' or ':' keep it linear.
_HF_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HF_REF = re.compile(rf"hf://({_HF_PART}(?:/{_HF_PART})?)(?::({_HF_PART}))?/({_HF_PART})")
GLOB_CHARS = ("*", "?", "[")
# A folder holding one of these is a `datasets` save_to_disk folder (datasets.load_from_disk reads it).
SAVED_DATASET_FILES = ("dataset_info.json", "state.json")
# tunesmith's field names per task type that data.columns may map onto a source's columns.
COLUMN_FIELDS = {
    "classification": ("text", "label"),
    "text": ("text",),
    "generation": ("prompt", "completion", "instruction", "input", "output", "system", "history", "messages",
                   "conversations", "chosen", "rejected", "label"),
}
COLUMN_FIELDS["chat"] = COLUMN_FIELDS["generation"]


class HfRef(NamedTuple):
    """A parsed hf://NAME[:CONFIG]/SPLIT reference."""

    name: str
    config: str | None
    split: str


def parse_hf_ref(ref: str) -> HfRef:
    """(name, config, split) of `hf://NAME[:CONFIG]/SPLIT`. Raises ValueError saying what is wrong."""
    match = _HF_REF.fullmatch(ref)
    if match is None:
        raise ValueError(f"'{ref}' is not a Hugging Face dataset reference of the form hf://NAME[:CONFIG]/SPLIT "
                         "(e.g. hf://imdb/train or hf://glue:sst2/validation)")
    name, config, split = match.groups()
    return HfRef(name, config, split)


def is_glob(path: str) -> bool:
    """Whether a path as the user wrote it is a glob pattern."""
    return any(c in path for c in GLOB_CHARS)


class Located(NamedTuple):
    """Where a local source is: its absolute path (a glob: an absolute pattern whose folder part is escaped,
    so it matches the same files wherever it is read again), and for a glob the files it matches."""

    path: str
    files: list[str] | None


def locate_path(path: str, base: Path, files: list[str] | None = None) -> Located:
    """A source's path made absolute against `base` (the config file's folder) and a glob matched, sorted.

    Whether it is a glob is decided on `path` as written: `[`, `*` or `?` in base's own name are plain
    characters (escaped before matching), never pattern syntax. An existing path is taken literally even
    when its name has such characters. `files` recorded by an earlier load are used instead of matching
    again (a run's saved config reads the same files)."""
    written = Path(path).expanduser()
    literal = written if written.is_absolute() else (base / written).resolve()
    if not is_glob(path) or literal.exists():
        return Located(str(literal), None)
    pattern = glob_pattern(path, base)
    if files is None:
        files = sorted(glob_matches(pattern))
    return Located(pattern, list(files))


def glob_pattern(path: str, base: Path) -> str:
    """A glob as written made absolute against `base`, whose own name is escaped (see locate_path)."""
    written = Path(path).expanduser()
    return str(written) if written.is_absolute() else glob.escape(str(base.resolve())) + os.sep + str(written)


MAX_GLOB_FOLDERS = 100_000  # folders a `**` may walk, each path through links counted once


class GlobTooWide(ValueError):
    """A `**` glob that would walk a link loop for ever, or more than MAX_GLOB_FOLDERS folders."""


def glob_matches(pattern: str) -> Iterator[str]:
    """The files an absolute glob matches, as the loader reads them: `**` follows links to folders (so a
    check of where the matches lie must walk this, not Path.glob, which does not on Python 3.11).
    glob itself has no guard against a link to a folder above: that, or a tree past MAX_GLOB_FOLDERS, is
    a GlobTooWide before glob starts."""
    if "**" in pattern:
        _check_walk(_literal_folder(pattern))
    return (m for m in glob.iglob(pattern, recursive=True) if Path(m).is_file())


_ESCAPED = re.compile(r"\[([*?[])\]")  # what glob.escape makes of a literal *, ? or [


def _literal_folder(pattern: str) -> Path:
    """The folder a glob walks from: its leading parts without wildcards (glob.escape's escapes undone)."""
    parts = []
    for part in Path(pattern).parts:
        plain = _ESCAPED.sub("", part)
        if any(c in plain for c in GLOB_CHARS):
            break
        parts.append(_ESCAPED.sub(r"\1", part))
    return Path(*parts)


def _check_walk(top: Path) -> None:
    """Walk `top` as `**` does (links to folders followed, hidden folders skipped), counting folders."""
    walked, stack = 0, [(top, frozenset())]  # (folder, the (device, inode) of each folder above it)
    while stack:
        folder, above = stack.pop()
        try:
            st = folder.stat()
            entries = list(os.scandir(folder))
        except OSError:  # gone, or not readable: glob skips it too
            continue
        here = (st.st_dev, st.st_ino)
        if here in above:
            raise GlobTooWide(f"{folder} is a symbolic link to a folder above it: ** would never end")
        walked += 1
        if walked > MAX_GLOB_FOLDERS:
            raise GlobTooWide(f"** would walk more than {MAX_GLOB_FOLDERS:,} folders under {top}")
        for entry in entries:
            try:
                if not entry.name.startswith(".") and entry.is_dir():
                    stack.append((Path(entry.path), above | {here}))
            except OSError:
                continue


def folder_problem(folder: Path) -> tuple[str, str] | None:
    """(what is wrong, hint) when a folder is not a `datasets` save_to_disk folder of one split; None if it
    is. The config loader and the reader both ask, so a folder is judged the same way by each."""
    if (folder / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in folder.iterdir() if (p / "state.json").is_file())
        return ("holds a dataset with several splits",
                f"give one split's folder: {', '.join(str(folder / s) for s in splits) or 'none found'}")
    if not any((folder / name).is_file() for name in SAVED_DATASET_FILES):
        return ("is a folder, not a data file or a `datasets` save_to_disk folder",
                "give a .jsonl/.csv/.parquet/.arrow file, a glob such as data/*.jsonl, or a saved dataset")
    return None


def check_columns(columns: dict[str, str], loc: tuple) -> dict[str, str]:
    """A column mapping (data.columns, or a source's own `columns`): each names a column, none twice."""
    key = ".".join(map(str, loc))
    for name, column in columns.items():
        if not isinstance(column, str) or not column.strip():
            raise KeyedError((*loc, name), f"{key}.{name} must name a column of the sources")
    taken = list(columns.values())
    twice = next((c for c in taken if taken.count(c) > 1), None)
    if twice is not None:
        raise KeyedError(loc, f"{key} maps several fields to the column '{twice}'")
    return columns


class DataSource(_Strict):
    """One source of data.train/test/validation: a data file, a glob, a `datasets` save_to_disk folder or
    hf://NAME[:CONFIG]/SPLIT (relative paths resolve from the config file's folder)."""

    path: str = Field(min_length=1)
    # Training sources only: each contributes weight/sum(weights) of the training rows (data/sources.py).
    weight: float | None = Field(None, gt=0, le=1e6, allow_inf_nan=False)  # relative: a sum must stay finite
    max_rows: int | None = Field(None, ge=1)     # a seeded sample of this many rows when the source has more
    # This source's own column mapping, used instead of data.columns (sources with different schemas).
    columns: dict[str, str] | None = None
    # Written by tunesmith, not by hand: the files a glob matched when the config was loaded, so a run's
    # saved config.yaml reads the same files again.
    files: list[str] | None = None

    @field_validator("path")
    @classmethod
    def _hf_reference(cls, v: str) -> str:
        if v.startswith(HF_PREFIX):
            parse_hf_ref(v)
        return v


def as_sources(value: Any, key: str) -> Any:
    """A glob, an hf:// reference, a mapping or a list as a list of DataSource; a plain path or a fraction
    as it is. Errors of an item name its key (data.KEY.I.FIELD)."""
    if isinstance(value, str) and (value.startswith(HF_PREFIX) or is_glob(value)):
        items, single = [value], True
    elif isinstance(value, dict):
        items, single = [value], True
    elif isinstance(value, list):
        if not value:
            raise KeyedError(("data", key), f"data.{key} is an empty list; give at least one file or source")
        items, single = value, False
    else:
        return value
    sources = [_source(item, ("data", key) if single else ("data", key, i)) for i, item in enumerate(items)]
    for i, src in enumerate(sources):
        if key != "train" and src.weight is not None:
            loc = ("data", key, "weight") if single else ("data", key, i, "weight")
            raise KeyedError(loc, f"data.{key}: weight mixes training sources only; held-out sources are used "
                             "whole (max_rows caps one)")
    return sources


def _source(item: Any, loc: tuple) -> DataSource:
    if isinstance(item, DataSource):
        return item
    if isinstance(item, Path):
        item = str(item)
    if isinstance(item, str):
        item = {"path": item}
    if not isinstance(item, dict):
        raise KeyedError(loc, f"{'.'.join(map(str, loc))}: a source is a path, a glob, hf://NAME[:CONFIG]/SPLIT "
                          f"or a mapping {{path, weight, max_rows, columns}}, got {type(item).__name__}")
    try:
        src = DataSource.model_validate(item)
    except ValidationError as e:
        err = e.errors()[0]
        where = (*loc, *err["loc"])
        key = ".".join(map(str, where))
        if err["type"] == "extra_forbidden":
            msg = f"unknown key '{key}' (a data source takes path, weight, max_rows, columns)"
        elif err["type"] == "missing":
            msg = f"missing required key '{key}' (the source's file, glob, folder or hf:// reference)"
        else:
            msg = f"invalid value for '{key}': {err['msg'].removeprefix('Value error, ')}"
        raise KeyedError(where, msg) from None
    if src.columns is not None:
        check_columns(src.columns, (*loc, "columns"))
    return src
