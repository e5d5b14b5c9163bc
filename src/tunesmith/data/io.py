"""Readers for JSONL, CSV and Parquet that keep each row's source line."""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import DataError

# Far deeper than any data format needs (chat rows are 3 levels deep); deeper rows are refused.
MAX_NESTING = 64
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


@dataclass
class Row:
    """One raw record and where it came from (1-based line; for Parquet, the row number)."""

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


def read_rows(path: Path) -> ReadResult:
    """Read every record of a data file; unreadable rows become problems, not exceptions.

    Raises:
        DataError: for an unsupported extension or an empty file.
    """
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"unsupported data file type '{path.suffix}'", str(path),
                        hint=f"use one of {', '.join(sorted(set(FORMATS)))}")
    if path.stat().st_size == 0:
        raise DataError("data file is empty", str(path), hint="it needs at least one example")
    result = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}[kind](path)
    if not result.rows and not result.problems:
        raise DataError("data file has no rows", str(path), hint="it needs at least one example")
    return result


def _read_jsonl(path: Path) -> ReadResult:
    out = ReadResult()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                out.problems.append(RowProblem(str(path), lineno, f"undecodable bytes (not UTF-8) at byte {e.start}"))
                continue
            if not text.strip():
                continue
            record, reason = _parse_json_line(text)
            if reason:
                out.problems.append(RowProblem(str(path), lineno, reason))
            else:
                out.rows.append(Row(record, str(path), lineno))
    return out


def _parse_json_line(text: str) -> tuple[Any, str | None]:
    """(record, None), or (None, why the line is not a usable record)."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:  # before ValueError, its base class
        return None, f"invalid JSON: {e.msg} (column {e.colno})"
    except ValueError as e:
        return None, json_value_error(e)
    except RecursionError:
        return None, f"JSON nested too deeply (more than {MAX_NESTING} levels)"
    if _depth(record) > MAX_NESTING:
        # Parsed, but so deep that later recursive code (copying, json.dumps) would overflow the stack.
        return None, f"JSON nested too deeply (more than {MAX_NESTING} levels)"
    return record, None


def json_value_error(e: ValueError) -> str:
    """Why json.loads refused a line with a plain ValueError: in practice an integer longer than
    Python's int/str conversion limit (sys.get_int_max_str_digits(), 4300 by default)."""
    if "digits" in str(e):
        return f"number too long (an integer of more than {sys.get_int_max_str_digits()} digits)"
    return f"invalid JSON: {e}"


def _depth(value: Any) -> int:
    """Nesting depth of lists and dicts, walked without recursion (the value may be very deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in node)
    return deepest


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
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = next(reader, None)
    if not header:
        raise DataError("CSV file has no header row", str(path), hint="the first line must name the columns")
    start = reader.line_num + 1
    try:
        for cells in reader:
            if any(c.strip() for c in cells):
                if len(cells) != len(header):
                    out.problems.append(RowProblem(str(path), start, f"{len(cells)} columns, header has {len(header)}"))
                else:
                    out.rows.append(Row(dict(zip(header, cells)), str(path), start))
            start = reader.line_num + 1
    except csv.Error as e:
        out.problems.append(RowProblem(str(path), reader.line_num, f"malformed CSV: {e}"))
    return out


def _read_parquet(path: Path) -> ReadResult:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"cannot read Parquet file: {e}", str(path),
                        hint="check that it is a valid Parquet file") from None
    return ReadResult(rows=[Row(rec, str(path), i) for i, rec in enumerate(table.to_pylist(), start=1)])
