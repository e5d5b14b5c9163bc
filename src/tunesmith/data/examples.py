"""Turn raw rows into validated examples for a task, collecting every bad row."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config import TaskConfig
from tunesmith.data.io import ReadResult, Row, RowProblem, read_rows
from tunesmith.errors import DataError


@dataclass
class Example:
    """A task example. For classification `target` is the label; for generation the completion.

    `messages` holds the conversation before the answer for chat data (else None). `group` is the
    value of data.group_field (kept together by splits, used by reports); `augmented` says how an
    augmented row was made (None for real rows). `record`, `file` and `line` point back at the raw
    row, so curation can say exactly which row it changed; they are not saved with the splits.
    """

    input: str
    target: str
    source: str
    messages: list[dict] | None = None
    group: str | None = None
    augmented: str | None = None
    # Values of fairness.group_fields columns (kept with the splits so a run can be audited later).
    attributes: dict[str, str] | None = None
    weight: float = 1.0     # the row's weight in the training loss (fairness.mitigation: reweight)
    record: dict | None = field(default=None, repr=False, compare=False)
    file: str = field(default="", compare=False)
    line: int = field(default=0, compare=False)

    def to_json(self) -> dict:
        row = {"input": self.input, "target": self.target, "source": self.source}
        for key in ("messages", "group", "augmented", "attributes"):
            if getattr(self, key) is not None:
                row[key] = getattr(self, key)
        if self.weight != 1.0:
            row["weight"] = self.weight
        return row

    @classmethod
    def from_json(cls, row: dict) -> Example:
        return cls(row["input"], row["target"], row["source"], row.get("messages"), row.get("group"),
                   row.get("augmented"), row.get("attributes"), row.get("weight", 1.0))

    def raw(self) -> dict:
        """The original row as read (or this example's fields when it has none)."""
        return dict(self.record) if isinstance(self.record, dict) else self.to_json()


def load_examples(path: Path, task: TaskConfig, max_errors: int = 20, group_field: str | None = None,
                  attribute_fields: list[str] | None = None) -> tuple[list[Example], list[RowProblem]]:
    """Read and validate one data file; returns the good examples and every problem found."""
    result: ReadResult = read_rows(path)
    examples, problems = [], list(result.problems)
    parse = _classification if task.type == "classification" else _generation
    for row in result.rows:
        try:
            example = parse(row, task)
            example.group = _group(row, group_field)
            if attribute_fields:
                rec = row.record if isinstance(row.record, dict) else {}
                # A missing value is a group of its own in the audit, not an invalid row.
                example.attributes = {f: str(rec[f]) if rec.get(f) not in (None, "") else "(missing)"
                                      for f in attribute_fields}
        except _RowError as e:
            problems.append(RowProblem(row.file, row.line, str(e)))
            continue
        example.record, example.file, example.line = row.record, row.file, row.line
        examples.append(example)
    problems.sort(key=lambda p: p.line)
    if not examples and problems:
        _raise_if_field_never_present(problems, result.rows, task)
    return examples, problems


def _raise_if_field_never_present(problems: list[RowProblem], rows: list[Row], task: TaskConfig) -> None:
    """A field missing from every row is a config mistake (wrong field name), not bad data."""
    missing = {p.reason.split("'")[1] for p in problems if p.reason.startswith("missing field '")}
    if len(missing) != 1 or len(problems) != len(rows):
        return
    name = missing.pop()
    keys = {task.text_field: "task.text_field", task.label_field: "task.label_field",
            task.prompt_field: "task.prompt_field", task.completion_field: "task.completion_field"}
    present = sorted({str(k) for r in rows if isinstance(r.record, dict) for k in r.record})
    raise DataError(f"no row has the field '{name}'", problems[0].file, problems[0].line,
                    f"set {keys.get(name, 'the field name')} to one of the fields present: {', '.join(present)}")


def raise_for_problems(problems: list[RowProblem], max_errors: int, hint: str | None = None) -> None:
    """One DataError for the first problem, with the rest (up to the cap) as details."""
    if not problems:
        return
    first = problems[0]
    more = f" (and {len(problems) - 1} more invalid rows)" if len(problems) > 1 else ""
    err = DataError(f"invalid row: {first.reason}{more}", first.file, first.line,
                    hint or "fix or remove the row; `tunesmith data check` lists every bad row")
    err.details = [str(p) for p in problems[:max_errors]]
    raise err


class _RowError(ValueError):
    pass


def _group(row: Row, group_field: str | None) -> str | None:
    if group_field is None:
        return None
    value = _require_object(row).get(group_field)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _RowError(f"missing group field '{group_field}' (data.group_field)")
    return str(value)


def _field(rec: dict, name: str, what: str) -> Any:
    if name not in rec:
        raise _RowError(f"missing field '{name}' ({what}); fields present: {', '.join(map(str, rec)) or 'none'}")
    return rec[name]


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _RowError(f"field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _RowError(f"field '{name}' is empty")
    return value


def _source(row: Row) -> str:
    return f"{Path(row.file).name}:{row.line}"


def _classification(row: Row, task: TaskConfig) -> Example:
    rec = _require_object(row)
    text = _text(_field(rec, task.text_field, "the input text"), task.text_field)
    label = _field(rec, task.label_field, "the label")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise _RowError(f"label '{task.label_field}' must be a string, got {type(label).__name__}")
    label = _text(str(label), task.label_field)
    return Example(text, label.strip(), _source(row))


def _generation(row: Row, task: TaskConfig) -> Example:
    rec = _require_object(row)
    if "messages" in rec:
        return _chat(rec, row)
    if "instruction" in rec and "output" in rec:
        instruction = _text(rec["instruction"], "instruction")
        extra = rec.get("input") or ""
        if not isinstance(extra, str):
            raise _RowError(f"field 'input' must be a string, got {type(extra).__name__}")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Example(prompt, _text(rec["output"], "output"), _source(row))
    prompt = _text(_field(rec, task.prompt_field, "the prompt"), task.prompt_field)
    completion = _text(_field(rec, task.completion_field, "the completion"), task.completion_field)
    return Example(prompt, completion, _source(row))


def _chat(rec: dict, row: Row) -> Example:
    messages = rec["messages"]
    if not isinstance(messages, list) or not messages:
        raise _RowError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise _RowError(f"messages[{i}] needs a role of system, user or assistant")
        _text(m.get("content"), f"messages[{i}].content")
    if messages[-1]["role"] != "assistant":
        raise _RowError("the last message must be the assistant's answer (the training target)")
    context = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    if not any(m["role"] == "user" for m in context):
        raise _RowError("a chat example needs at least one user message before the answer")
    last_user = next(m["content"] for m in reversed(context) if m["role"] == "user")
    return Example(last_user, messages[-1]["content"], _source(row), messages=context)


def _require_object(row: Row) -> dict:
    if not isinstance(row.record, dict):
        raise _RowError(f"expected a JSON object, got {type(row.record).__name__}")
    return row.record
