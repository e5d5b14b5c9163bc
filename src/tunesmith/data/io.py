"""Readers for JSONL, CSV, Parquet, Arrow and `datasets` datasets (a save_to_disk folder or the local
Hugging Face cache) that keep each row's source line (or row number), with data.columns renames."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config.sources import HF_PREFIX, folder_problem, parse_hf_ref
from tunesmith.errors import DataError

# Far deeper than any data format needs (chat rows are 3 levels deep); deeper rows are refused.
MAX_NESTING = 64
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
           ".arrow": "arrow"}


@dataclass(frozen=True)
class RowSource:
    """What read_rows reads: a data file, a `datasets` save_to_disk folder or hf://NAME[:CONFIG]/SPLIT, with
    renames (data.columns field, the name the task reads it under, the source's column) applied to every
    row. `key` is the config key it came from (data.train, ...), named by errors about the whole source;
    `columns_key` the key the renames came from (data.columns, or a source's own data.train.0.columns)."""

    location: str
    renames: tuple[tuple[str, str, str], ...] = ()
    key: str = "data"
    columns_key: str = "data.columns"


@dataclass
class Row:
    """One raw record and where it came from (1-based line; for Parquet, Arrow and datasets, the row number)."""

    record: Any
    file: str
    line: int


@dataclass
class RowProblem:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class ReadResult:
    rows: list[Row] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)


def read_rows(source: Path | RowSource) -> ReadResult:
    """Read every record of a data file or dataset; unreadable rows become problems, not exceptions.

    Raises:
        DataError: for an unsupported extension, an empty file, an unreadable dataset, or a data.columns
            column that no row has.
    """
    src = source if isinstance(source, RowSource) else RowSource(str(source))
    if src.location.startswith(HF_PREFIX):
        result = _read_hf_cache(src)
    elif Path(src.location).is_dir():
        result = _read_saved_dataset(Path(src.location))
    else:
        try:
            result = _read_file(Path(src.location))
        except OSError as e:  # gone or unreadable since the config was checked (e.g. before `eval`)
            raise DataError(f"cannot read the data file ({e.strerror or type(e).__name__})", src.location,
                            hint="check that it exists and is readable") from None
    if src.renames:
        _rename(result, src)
    return result


def _read_file(path: Path) -> ReadResult:
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"unsupported data file type '{path.suffix}'", str(path),
                        hint=f"use one of {', '.join(sorted(set(FORMATS)))}")
    if path.stat().st_size == 0:
        raise DataError("data file is empty", str(path), hint="it needs at least one example")
    if kind in ("jsonl", "csv") and _utf16(path):  # without a BOM, ASCII in UTF-16 is valid UTF-8 with NULs
        raise DataError("the file is UTF-16 text; tunesmith reads UTF-8", str(path),
                        hint="save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    if kind in ("jsonl", "csv") and _all_nul_head(path):
        raise DataError("the file starts with NUL bytes, not text (a disk image or a file zeroed by a crash?)",
                        str(path), hint="give a UTF-8 text file")
    result = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet, "arrow": _read_arrow}[kind](path)
    if not result.rows and not result.problems:
        raise DataError("data file has no rows", str(path), hint="it needs at least one example")
    return result


def _rename(result: ReadResult, src: RowSource) -> None:
    """Apply data.columns: each mapped column's value moves to the name the task reads. A column that no
    row has is a mistake in the mapping, not bad rows; a row that lacks it fails as a row missing the field."""
    records = [r.record for r in result.rows if isinstance(r.record, dict)]
    for name, _, column in src.renames:
        if records and not any(column in rec for rec in records):
            present = sorted({str(k) for rec in records[:1000] for k in rec})
            raise DataError(f"no row has the column '{column}' that {src.columns_key}.{name} names", src.location,
                            hint=f"columns present: {', '.join(present) or 'none'}")
    for row in result.rows:
        if isinstance(row.record, dict):
            rec = dict(row.record)
            moved = {target: rec.pop(column) for _, target, column in src.renames if column in rec}
            rec.update(moved)  # after every pop, so swapped names ({text: label, label: text}) work
            row.record = rec


def _read_jsonl(path: Path) -> ReadResult:
    if path.suffix.lower() == ".json" and _starts_array(path):
        return _read_json_array(path)
    out = ReadResult()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                out.problems.append(RowProblem(str(path), lineno, f"undecodable bytes (not UTF-8) at byte {e.start}"))
                continue
            if lineno == 1:
                text = text.removeprefix("\ufeff")  # a byte-order mark, as Windows editors write
            if not text.strip():
                continue
            record, reason = _parse_json_line(text)
            if reason:
                out.problems.append(RowProblem(str(path), lineno, reason))
            else:
                out.rows.append(Row(record, str(path), lineno))
    return out


def _utf16(path: Path) -> bool:
    """Whether a text file starts as UTF-16 does: its byte-order mark, or a NUL beside every ASCII byte."""
    with open(path, "rb") as f:
        head = f.read(256)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return True
    pairs = len(head) // 2
    if _all_nul_head(path):  # no text at all: said as such, not as UTF-16
        return False
    return pairs >= 4 and (head[0::2][:pairs].count(0) == pairs or head[1::2][:pairs].count(0) == pairs)


def _all_nul_head(path: Path) -> bool:
    """Whether the file's first 256 bytes are all NUL."""
    with open(path, "rb") as f:
        head = f.read(256)
    return bool(head) and head.count(0) == len(head)


def _starts_array(path: Path) -> bool:
    """Whether a .json file holds one JSON array (Alpaca's alpaca_data.json) rather than JSON lines."""
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head.startswith(b"[")


_SPACE = re.compile(r"[ \t\r\n]*")


def _read_json_array(path: Path) -> ReadResult:
    """The objects of a .json file holding one array, each a row at the line where it starts; the
    first element that does not parse ends the reading (what follows cannot be located reliably). An
    object giving a key twice is a row problem, and reading goes on after it."""
    out, where = ReadResult(), str(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        out.problems.append(RowProblem(where, 1, f"undecodable bytes (not UTF-8) at byte {e.start}"))
        return out
    decoder, pos = _DECODER, _SPACE.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    while not text.startswith("]", pos):
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            record, end = decoder.raw_decode(text, pos)
        except _DuplicateKey as e:  # a row problem; a plain decode (last key kept) finds where the row ends
            out.problems.append(RowProblem(where, line, str(e)))
            try:
                end = _PLAIN_DECODER.raw_decode(text, pos)[1]
            except (ValueError, RecursionError):  # invalid further on: where it ends is unknown, reading stops
                return out
            record = None
        except json.JSONDecodeError as e:
            out.problems.append(RowProblem(where, e.lineno, f"invalid JSON: {e.msg} (column {e.colno})"))
            return out
        except RecursionError:
            out.problems.append(RowProblem(where, line, f"JSON nested too deeply (more than {MAX_NESTING} levels)"))
            return out
        except ValueError as e:
            out.problems.append(RowProblem(where, line, json_value_error(e)))
            return out
        if record is None:
            pass
        elif why := _record_problem(record):
            out.problems.append(RowProblem(where, line, why))
        else:
            out.rows.append(Row(record, where, line))
        pos = _SPACE.match(text, end).end()
        if text.startswith(",", pos):
            pos = _SPACE.match(text, pos + 1).end()
            if text.startswith("]", pos):  # strict JSON, as json.load: `[{...},]` is refused
                line += text.count("\n", counted, pos)
                why = "invalid JSON: a comma before ']' (trailing commas are not JSON)"
                out.problems.append(RowProblem(where, line, why))
                return out
        elif not text.startswith("]", pos):
            line += text.count("\n", counted, pos)
            out.problems.append(RowProblem(where, line, "invalid JSON: expected ',' or ']' after an element"))
            return out
    after = _SPACE.match(text, pos + 1).end()
    if after < len(text):  # the line of the trailing text itself, not of the ']'
        out.problems.append(RowProblem(where, line + text.count("\n", counted, after), "text after the array's end"))
    return out


class _DuplicateKey(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object's dict; a key given twice is refused (json keeps the last silently, and a row with
    two labels is a row nobody can trust), as YAML configs refuse it."""
    record = dict(pairs)
    if len(record) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(f"the key '{twice[:80]}' is given twice in one object")
    return record


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_pairs)


def loads_unique(text: str) -> Any:
    """json.loads, refusing an object that gives a key twice (a ValueError saying which key)."""
    return _DECODER.decode(text)

_PLAIN_DECODER = json.JSONDecoder()  # only to find where an object with a repeated key ends


def _parse_json_line(text: str) -> tuple[Any, str | None]:
    """(record, None), or (None, why the line is not a usable record)."""
    try:
        record = _DECODER.decode(text)
    except _DuplicateKey as e:
        return None, str(e)
    except json.JSONDecodeError as e:  # before ValueError, its base class
        return None, f"invalid JSON: {e.msg} (column {e.colno})"
    except ValueError as e:
        return None, json_value_error(e)
    except RecursionError:
        return None, f"JSON nested too deeply (more than {MAX_NESTING} levels)"
    if why := _record_problem(record):
        return None, why
    return record, None


def json_value_error(e: ValueError) -> str:
    """Why json.loads refused a line with a plain ValueError: in practice an integer longer than
    Python's int/str conversion limit (sys.get_int_max_str_digits(), 4300 by default)."""
    if "digits" in str(e):
        return f"number too long (an integer of more than {sys.get_int_max_str_digits()} digits)"
    return f"invalid JSON: {e}"


def _record_problem(record: Any) -> str | None:
    """Why a parsed JSON value is not a usable record, or None: nested past MAX_NESTING (later recursive
    code, copying or json.dumps, would overflow the stack), or holding a lone surrogate: `"\\ud800"` is
    valid JSON but no tokenizer, database or UTF-8 file can take it. Walked without recursion."""
    stack = [(record, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError as e:
                return f"text that is not valid Unicode (a lone surrogate, escaped as \\u{ord(node[e.start]):04x})"
        elif isinstance(node, (dict, list)):
            if level > MAX_NESTING:
                return f"JSON nested too deeply (more than {MAX_NESTING} levels)"
            children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
            stack.extend((child, level + 1) for child in children)
    return None


MAX_CSV_FIELD = 16 * 2**20  # characters in one CSV cell


def _read_csv(path: Path) -> ReadResult:
    out = ReadResult()
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        out.problems.append(RowProblem(str(path), line, f"undecodable bytes (not UTF-8) at byte {e.start}"))
        return out
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    csv.field_size_limit(MAX_CSV_FIELD)  # the module's default, 128 KiB, refuses a long document
    # strict: a quote never closed is an error, not a field that silently swallows the rows after it
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise DataError(f"malformed CSV header: {e}", str(path), 1, "the first line must name the columns") from None
    if not header:
        raise DataError("CSV file has no header row", str(path), hint="the first line must name the columns")
    _refuse_twice_named([h for h in header if h.strip()], str(path), 1, " in the header")
    start = reader.line_num + 1
    try:
        for cells in reader:
            if any(c.strip() for c in cells):
                if len(cells) != len(header):
                    out.problems.append(RowProblem(str(path), start, f"{len(cells)} columns, header has {len(header)}"))
                else:
                    out.rows.append(Row(dict(zip(header, cells)), str(path), start))
            start = reader.line_num + 1
    except csv.Error as e:  # the rest of the file cannot be split into rows reliably
        why = (f"a field over {MAX_CSV_FIELD // 2**20} MiB" if "field limit" in str(e) else
               f"malformed CSV from this row on: {e} (is a quote left open, or text after a closing quote?)")
        out.problems.append(RowProblem(str(path), start, why))
    return out


def _refuse_twice_named(columns: list[str], where: str, line: int | None = None, place: str = "") -> None:
    """A column named twice: a row would keep one of the two values silently (or pyarrow fail obscurely)."""
    seen: set[str] = set()
    for name in columns:
        if name in seen:
            raise DataError(f"the column '{name[:80]}' appears twice{place}", where, line,
                            "give each column its own name")
        seen.add(name)


def _read_parquet(path: Path) -> ReadResult:
    import pyarrow.parquet as pq

    def read(what):
        try:
            return what(path)
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise DataError(f"cannot read Parquet file: {e}", str(path),
                            hint="check that it is a valid Parquet file") from None
    _refuse_twice_named(read(pq.read_schema).names, str(path))  # before read_table fails on it obscurely
    return _columnar_rows(read(pq.read_table).to_pylist(), str(path))


def _read_arrow(path: Path) -> ReadResult:
    """An Arrow IPC file (random access, as Feather v2 / pyarrow write it) or stream (as `datasets` does)."""
    import pyarrow as pa

    try:
        try:
            table = pa.ipc.open_file(path).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_stream(path).read_all()
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"cannot read Arrow file: {e}", str(path),
                        hint="check that it is an Arrow IPC file or stream") from None
    _refuse_twice_named(table.column_names, str(path))
    return _columnar_rows(table.to_pylist(), str(path))


def _read_saved_dataset(folder: Path) -> ReadResult:
    """A folder written by `datasets`' Dataset.save_to_disk (one split)."""
    problem = folder_problem(folder)
    if problem is not None:
        raise DataError(f"the folder {problem[0]}", str(folder), hint=problem[1])
    import datasets

    try:
        dataset = datasets.load_from_disk(str(folder))
    except Exception as e:  # datasets raises several types for a damaged folder
        raise DataError(f"cannot read the saved dataset: {e}", str(folder),
                        hint="write it again with Dataset.save_to_disk") from None
    if not isinstance(dataset, datasets.Dataset):
        raise DataError("the folder holds several splits", str(folder), hint="give one split's folder")
    return _dataset_rows(dataset, str(folder))


def _read_hf_cache(src: RowSource) -> ReadResult:
    """hf://NAME[:CONFIG]/SPLIT from the local Hugging Face datasets cache, offline: nothing is downloaded."""
    ref = parse_hf_ref(src.location)
    if Path(ref.name).is_dir():
        # datasets.load_dataset reads an existing local folder of that name instead of the cache.
        raise DataError(f"{src.location}: the current directory has a folder '{ref.name}', which `datasets` would "
                        "read instead of the Hugging Face cache", src.key,
                        hint=f"to read that folder, give its path (e.g. ./{ref.name}/...) instead of hf://; to read "
                        "the cached dataset, run tunesmith from another directory")
    import datasets

    with _offline():
        try:
            dataset = datasets.load_dataset(ref.name, ref.config, split=ref.split)
        except Exception as e:  # not cached: datasets raises several types (ConnectionError, FileNotFoundError, ...)
            fetch = (f"python -c \"import datasets; datasets.load_dataset('{ref.name}', "
                     f"{repr(ref.config) if ref.config else 'None'}, split='{ref.split}')\"")
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{src.location} is not in the local Hugging Face datasets cache "
                            f"({datasets.config.HF_DATASETS_CACHE}): {reason}", src.key,
                            hint=f"tunesmith never downloads at run time; fetch it on a machine with network "
                            f"({fetch}) and copy the cache here, or save_to_disk it and give that folder as the "
                            "path") from None
    return _dataset_rows(dataset, src.location)


# Offline mode is process-wide (datasets and huggingface_hub read module constants and the environment),
# so overlapping readers in several threads share one switch: the first turns it on, the last restores it.
_OFFLINE_LOCK = threading.Lock()
_offline_state: dict[str, Any] = {"depth": 0, "saved": None}


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hugging Face offline mode for the duration (datasets and huggingface_hub read it when called)."""
    import datasets
    import huggingface_hub.constants as hub

    with _OFFLINE_LOCK:
        if _offline_state["depth"] == 0:
            _offline_state["saved"] = (datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE,
                                       os.environ.get("HF_HUB_OFFLINE"))
            datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
            os.environ["HF_HUB_OFFLINE"] = "1"
        _offline_state["depth"] += 1
    try:
        yield
    finally:
        with _OFFLINE_LOCK:
            _offline_state["depth"] -= 1
            if _offline_state["depth"] == 0:
                saved = _offline_state["saved"]
                datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved[0], saved[1]
                if saved[2] is None:
                    os.environ.pop("HF_HUB_OFFLINE", None)
                else:
                    os.environ["HF_HUB_OFFLINE"] = saved[2]


def _dataset_rows(dataset: Any, label: str) -> ReadResult:
    return _columnar_rows(dataset.to_list(), label)


def _columnar_rows(records: list, label: str) -> ReadResult:
    """Rows of a table (Parquet, Arrow, `datasets`). A table gives every row every column, null where the
    row has none (a prompt/completion row of a file that also holds chat rows gets `messages: null`), so
    nulls are dropped: a row holds the fields it has, as a JSONL row of the same data would."""
    out = ReadResult()
    for i, record in enumerate(records, start=1):
        record = _without_nulls(record, 1)
        if why := _record_problem(record):
            out.problems.append(RowProblem(label, i, why))
        else:
            out.rows.append(Row(record, label, i))
    return out


def _without_nulls(value: Any, level: int) -> Any:
    if level > MAX_NESTING:  # left as it is: _record_problem refuses it
        return value
    if isinstance(value, dict):
        return {k: _without_nulls(v, level + 1) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v, level + 1) for v in value]
    return value
