"""Turn raw rows into validated examples for a task, collecting every bad row."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config import TaskConfig
from tunesmith.config.schema import control_problem, label_problem
from tunesmith.config.settings import label_form
from tunesmith.config.sources import HF_PREFIX
from tunesmith.data.io import ReadResult, Row, RowProblem, RowSource, read_rows
from tunesmith.data.pair_rows import PairError, has_text_cells, is_kto_row, is_preference_row, parse_pair
from tunesmith.data.row_text import SHAREGPT_ROLES, json_kind, openai_messages, text_value
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
    # Preference rows (train.method dpo|orpo|simpo|kto): `target` is the chosen answer (KTO: the completion),
    # `rejected` the rejected one, `desirable` a KTO row's label. Saved with the splits.
    rejected: str | None = None
    desirable: bool | None = None
    record: dict | None = field(default=None, repr=False, compare=False)
    file: str = field(default="", compare=False)
    line: int = field(default=0, compare=False)

    def to_json(self) -> dict:
        row = {"input": self.input, "target": self.target, "source": self.source}
        for key in ("messages", "group", "augmented", "attributes", "rejected", "desirable"):
            if getattr(self, key) is not None:
                row[key] = getattr(self, key)
        if self.weight != 1.0:
            row["weight"] = self.weight
        return row

    @classmethod
    def from_json(cls, row: dict) -> Example:
        return cls(row["input"], row["target"], row["source"], row.get("messages"), row.get("group"),
                   row.get("augmented"), row.get("attributes"), row.get("weight", 1.0), row.get("rejected"),
                   row.get("desirable"))

    def raw(self) -> dict:
        """The original row as read (or this example's fields when it has none)."""
        return dict(self.record) if isinstance(self.record, dict) else self.to_json()


def load_examples(path: Path | RowSource, task: TaskConfig, max_errors: int = 20, group_field: str | None = None,
                  attribute_fields: list[str] | None = None) -> tuple[list[Example], list[RowProblem]]:
    """Read and validate one data file; returns the good examples and every problem found."""
    result: ReadResult = read_rows(path)
    examples, problems = [], list(result.problems)
    parse = {"classification": _classification, "text": _raw_text}.get(task.type, _generation)
    mapped = _mapped_names(path)
    for row in result.rows:
        try:
            example = parse(row, task)
            example.group = _group(row, group_field)
            if attribute_fields:
                rec = row.record if isinstance(row.record, dict) else {}
                # A missing value is a group of its own in the audit, not an invalid row.
                example.attributes = {f: _group_text(rec.get(f), f, "fairness.group_fields") or MISSING_GROUP
                                      for f in attribute_fields}
        except _MissingField as e:
            problems.append(RowProblem(row.file, row.line, e.reason(mapped)))
            continue
        except _RowError as e:
            problems.append(RowProblem(row.file, row.line, str(e)))
            continue
        example.record, example.file, example.line = row.record, row.file, row.line
        examples.append(example)
    problems.sort(key=lambda p: p.line)
    if not examples and problems:
        _raise_if_field_never_present(problems, result.rows, task, mapped)
    return examples, problems


def _mapped_names(source: Path | RowSource) -> dict[str, tuple[str, str]]:
    """The name a task reads -> (the source's column, the config key that mapped it), from data.columns."""
    if not isinstance(source, RowSource):
        return {}
    return {target: (column, f"{source.columns_key}.{name}") for name, target, column in source.renames}


def _raise_if_field_never_present(problems: list[RowProblem], rows: list[Row], task: TaskConfig,
                                  mapped: dict[str, tuple[str, str]]) -> None:
    """A field missing from every row is a config mistake (wrong field name), not bad data."""
    missing = {p.reason.split("'")[1] for p in problems if p.reason.startswith("missing field '")}
    if len(missing) != 1 or len(problems) != len(rows):
        return
    name = missing.pop()
    keys = {task.text_field: "task.text_field", task.label_field: "task.label_field",
            task.prompt_field: "task.prompt_field", task.completion_field: "task.completion_field"}
    keys.update({column: key for column, key in mapped.values()})
    present = sorted({str(k) for r in rows if isinstance(r.record, dict) for k in r.record})
    fields = ', '.join(_shown(p) for p in present)
    hint = (f"an Alpaca row's answer is its 'output': map your answer column onto it with data.columns "
            f"(e.g. {{output: ...}}; fields present: {fields})" if name == "output" and name not in keys
            else f"set {keys.get(name, 'the field name')} to one of the fields present: {fields}")
    sep = next((c for c in ";\t|," if len(present) == 1 and c in present[0]), None)
    if sep is not None and str(problems[0].file).lower().endswith((".csv", ".tsv")):  # one header cell: "text;label"
        hint = (f"the header reads as one field, '{present[0][:60]}': the file seems to separate its fields with "
                f"{sep!r}; tunesmith reads .csv files comma-separated and .tsv files tab-separated")
    raise DataError(f"no row has the field '{name}'", problems[0].file, problems[0].line, hint)


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


MISSING_GROUP = "(missing)"  # the group of a row without a value: listed in the audit, never compared


class _RowError(ValueError):
    pass


class _MissingField(_RowError):
    """A row without a field the task reads (said in the source's own column names under data.columns)."""

    def __init__(self, name: str, what: str, present: list[str]):
        self.name, self.what, self.present = name, what, present
        super().__init__(self.reason({}))

    def reason(self, mapped: dict[str, tuple[str, str]]) -> str:
        back = {target: column for target, (column, _) in mapped.items()}
        # A name with spaces around it (a CSV header "text, label") is quoted: they would be invisible.
        present = ", ".join(_shown(back.get(k, k)) for k in self.present) or "none"
        if self.name in mapped:
            column, key = mapped[self.name]
            return f"missing field '{column}' ({self.what}, mapped by {key}); fields present: {present}"
        return f"missing field '{self.name}' ({self.what}); fields present: {present}"


def _shown(name: str) -> str:
    return repr(name) if name != name.strip() else name


def _group(row: Row, group_field: str | None) -> str | None:
    if group_field is None:
        return None
    value = _group_text(_require_object(row).get(group_field), group_field, "data.group_field")
    if value is None:
        raise _RowError(f"missing group field '{group_field}' (data.group_field)")
    return value


def _group_text(value: Any, name: str, key: str) -> str | None:
    """A group value as one text, None when it is absent, null, blank or the missing group's own name.
    Booleans are written as JSON writes them, so a JSON `true` and a CSV's "true" are one group while
    the text "True" stays another (str() would merge `true` with "True"); lists and objects are refused."""
    if value is None or (isinstance(value, str) and (not value.strip() or value == MISSING_GROUP)):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        raise _RowError(f"group field '{name}' holds a {'list' if isinstance(value, list) else 'JSON object'}, "
                        f"not a text, number or boolean ({key})")
    if problem := control_problem(str(value)):  # a group is named in reports and messages, as a label is
        raise _RowError(f"group field '{name}' {problem} ({key})")
    return str(value)


def _field(rec: dict, name: str, what: str) -> Any:
    if name not in rec:
        raise _MissingField(name, what, [str(k) for k in rec])
    return rec[name]


def _text(value: Any, name: str) -> str:
    return text_value(value, name, _RowError)


def _source(row: Row) -> str:
    # An hf:// reference keeps its whole name (its last part is only the split).
    return f"{row.file if row.file.startswith(HF_PREFIX) else Path(row.file).name}:{row.line}"


def _classification(row: Row, task: TaskConfig) -> Example:
    rec = _require_object(row)
    text = _text(_field(rec, task.text_field, "the input text"), task.text_field)
    label = _field(rec, task.label_field, "the label")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise _RowError(f"label '{task.label_field}' must be a string, got {json_kind(label)}")
    # NFC: "café" typed precomposed or as e + a combining accent is one label, not two that look alike.
    label = label_form(_text(str(label), task.label_field).strip())
    if problem := label_problem(label):
        raise _RowError(f"label {json.dumps(label[:80])} {problem}")
    return Example(text, label, _source(row))


def _raw_text(row: Row, task: TaskConfig) -> Example:
    """task.type text: the document is the input and every token of it is trained on (no target)."""
    rec = _require_object(row)
    return Example(_text(_field(rec, task.text_field, "the document text"), task.text_field), "", _source(row))


def _generation(row: Row, task: TaskConfig) -> Example:
    """One generation/chat row, its format detected from its keys: OpenAI `messages`, ShareGPT
    `conversations`, Alpaca `instruction`/`output`, else the configured prompt/completion fields."""
    rec = _require_object(row)
    if is_preference_row(rec, has_text_cells(row.file)):  # before `messages`: a preference prompt ends with the user
        return _preference(rec, row)
    chat = next((k for k in ("messages", "conversations") if k in rec), None)
    if chat and rec.get(task.completion_field) is not None:
        # Two answers in one row: which one trains? (A `prompt` beside `messages`, as UltraChat has, repeats
        # the first user turn and is fine; a completion is an answer of its own.)
        raise _RowError(f"the row holds both '{chat}' and '{task.completion_field}': two formats in one row; "
                        f"keep one (the conversation, or {task.prompt_field}/{task.completion_field})")
    if "messages" in rec:
        return _chat(openai_messages(rec["messages"], _RowError), row)
    if "conversations" in rec:
        return _chat(_with_system(rec, _sharegpt_messages(rec["conversations"])), row)
    if "instruction" in rec and "output" in rec:
        return _alpaca(rec, row)
    if "instruction" in rec and task.completion_field not in rec:  # an Alpaca row without its answer
        _field(rec, "output", "the Alpaca answer")
    prompt = _text(_field(rec, task.prompt_field, "the prompt"), task.prompt_field)
    completion = _text(_field(rec, task.completion_field, "the completion"), task.completion_field)
    return Example(prompt, completion, _source(row))


def _preference(rec: dict, row: Row) -> Example:
    """A `{prompt, chosen, rejected}` or KTO `{prompt, completion, label}` row (data/pair_rows.py): the
    chosen answer (or completion) is the target, so generation metrics use it as the reference."""
    try:
        text = has_text_cells(row.file)
        pair = parse_pair(rec, _source(row), kto=is_kto_row(rec, text), text_cells=text)
    except PairError as e:
        raise _RowError(str(e)) from None
    return Example(pair.prompt, pair.chosen, _source(row), messages=pair.messages, rejected=pair.rejected,
                   desirable=pair.label)


def _sharegpt_messages(turns: Any) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise _RowError("'conversations' must be a non-empty list")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or SHAREGPT_ROLES.get(t["from"]) is None:
            raise _RowError(f"conversations[{i}] needs 'from' of human, gpt or system (or user, assistant, tool)")
        out.append({"role": SHAREGPT_ROLES[t["from"]], "content": _text(t.get("value"), f"conversations[{i}].value")})
    return out


def _with_system(rec: dict, messages: list[dict]) -> list[dict]:
    """A row-level `system` field (LLaMA-Factory's ShareGPT and Alpaca) as the first message."""
    system = rec.get("system")
    if system is None or (isinstance(system, str) and not system.strip()) or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": _text(system, "system")}] + messages


def _alpaca(rec: dict, row: Row) -> Example:
    """Alpaca: `instruction` (+ optional `input`) -> `output`; with `system` or `history` (earlier
    [instruction, response] pairs, as LLaMA-Factory writes them) the row becomes a conversation."""
    instruction = _text(rec["instruction"], "instruction")
    extra = rec.get("input") or ""
    if not isinstance(extra, str):
        raise _RowError(f"field 'input' must be a string, got {json_kind(extra)}")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    output = _text(rec["output"], "output")
    if not rec.get("history") and not rec.get("system"):
        return Example(prompt, output, _source(row))
    history = rec.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
        raise _RowError("field 'history' must be a list of [instruction, response] pairs")
    turns = [{"role": role, "content": _text(text, f"history[{i}]")}
             for i, pair in enumerate(history) for role, text in zip(("user", "assistant"), pair)]
    turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return _chat(_with_system(rec, turns), row)


def _chat(messages: list[dict], row: Row) -> Example:
    """An example from text turns: `target` is the last (assistant) turn, `messages` what came before."""
    if messages[-1]["role"] != "assistant":
        raise _RowError("the last message must be the assistant's answer (the training target)")
    context = messages[:-1]
    if not any(m["role"] == "user" for m in context):
        raise _RowError("a chat example needs at least one user message before the answer")
    last_user = next(m["content"] for m in reversed(context) if m["role"] == "user")
    return Example(last_user, messages[-1]["content"], _source(row), messages=context)


def _require_object(row: Row) -> dict:
    if not isinstance(row.record, dict):
        raise _RowError(f"expected a JSON object, got {json_kind(row.record)}")
    return row.record
