"""A run's predictions/test.jsonl, read back and checked, for every reader (compare, runs diff, drift
reference, report answers, retrain's paired test, the fairness baseline, export's parity check, human
evaluation). The eval stage writes one row per test example, of one of two kinds:

- answers (classification, generation, chat): `text`, `source` (file:line), `gold`, `prediction`,
  `baseline_prediction`;
  classification rows add `correct` and `confidence`, preference pairs add `rejected`, `margin` and
  `baseline_margin`;
- documents (task.type text): `text`, `source`, `tokens`, `nll_per_token`, `baseline_nll_per_token`.

A row edited by hand into another shape must be one error naming the file and line, not a KeyError
deep inside whichever command read it.
"""

from __future__ import annotations

import math
from pathlib import Path

from tunesmith import fsio

PREDICTIONS = Path("predictions") / "test.jsonl"

_ANSWER = ("text", "source", "gold", "prediction", "baseline_prediction")
_DOCUMENT = ("tokens", "nll_per_token", "baseline_nll_per_token")
_PAIR = ("rejected", "margin", "baseline_margin")  # on the rows that are preference pairs


def read_test_predictions(run: Path) -> list[dict] | None:
    """The rows of `run`'s predictions/test.jsonl, None when the file is missing.

    Raises:
        fsio.DamagedFile: naming the file and line of a row that is not what the eval stage writes.
    """
    path = Path(run) / PREDICTIONS
    if not path.is_file():
        return None
    rows = fsio.read_jsonl(path)
    first = rows[0] if rows and isinstance(rows[0], dict) else {}
    answers = "prediction" in first or "gold" in first  # (a document row has neither: an edited first row
    # that lost one is still read as the answer row it is, and named for the field it lost)
    # `correct` and `confidence` are on every row of a classification run (runs before 2026-11 also wrote
    # `correct` on generation rows, without `confidence`), or on none.
    kinds = (answers, "correct" in first, answers and "confidence" in first)
    for line, row in enumerate(rows, 1):
        problem = _problem(row, *kinds)
        if problem is not None:
            raise fsio.DamagedFile(path, problem, line, what="not what tunesmith wrote")
    return rows


def example_key(row: dict) -> tuple[str, str]:
    """What makes two runs' rows the same test example: its prompt and its gold answer (sources differ:
    retrain's challenger reads the champion's test split from its own copy)."""
    return row["text"], row["gold"]


def require_test_predictions(run: Path) -> list[dict]:
    """read_test_predictions for a reader that cannot go on without them (RunDirError when missing)."""
    from tunesmith.errors import RunDirError

    rows = read_test_predictions(run)
    if rows is None:
        raise RunDirError(f"no {PREDICTIONS}", str(run), "evaluate the run first (`tunesmith eval RUN_DIR`)")
    return rows


def _problem(row: object, answers: bool, correct: bool, confidence: bool) -> str | None:
    """Why `row` is not a row of its file's kind, or None. A figure may be null: the eval stage writes a
    NaN or an infinite one (a broken model's) as null, never as a bare NaN."""
    if not isinstance(row, dict):
        return f"a {type(row).__name__}, not an object"
    texts, numbers = (_ANSWER, ()) if answers else (_ANSWER[:2], _DOCUMENT)
    if answers and "rejected" in row:
        texts, numbers = texts + _PAIR[:1], _PAIR[1:]
    if confidence:
        numbers += ("confidence",)
    if bad := next((f for f in texts if not isinstance(row.get(f), str)), None):
        return f"'{bad}' missing or not a text"
    if bad := next((f for f in numbers if f not in row or not (row[f] is None or _number(row[f]))), None):
        return f"'{bad}' missing or not a number"
    if correct != isinstance(row.get("correct"), bool):
        return "'correct' must be a boolean on every row of the file, or on none"
    return None


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
