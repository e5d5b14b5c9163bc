"""Preference rows: `{prompt, chosen, rejected}` pairs (DPO, ORPO, SimPO) and `{prompt, completion, label}`
rows (KTO), parsed from one raw record. Kept apart from data/pairs.py so that data/examples.py can read
preference rows as examples without an import cycle.

The prompt is a string (`prompt`) or a conversation: `messages` (or a `prompt` list) of turns read as
chat rows read theirs, ending with the user's or a tool's. An answer is a string, one assistant message, or a list
holding one assistant message (TRL's conversational format).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunesmith.data.row_text import json_kind, message_text, openai_messages, text_value


@dataclass(frozen=True)
class Pair:
    """One preference row. For KTO rows `chosen` is the completion, `rejected` is None and `label`
    says whether the completion is desirable; for paired rows `label` is None."""

    prompt: str                        # the prompt text (the last user turn for a conversation)
    chosen: str
    rejected: str | None
    label: bool | None = None
    messages: list[dict] | None = None  # the conversation before the answer, for chat rows
    source: str = ""

    def to_json(self) -> dict:
        row: dict[str, Any] = {"messages": self.messages} if self.messages else {"prompt": self.prompt}
        if self.label is None:
            row.update(chosen=self.chosen, rejected=self.rejected)
        else:
            row.update(completion=self.chosen, label=self.label)
        return row


class PairError(ValueError):
    """A row that is not a valid preference row (the message says why)."""


def parse_pair(record: Any, source: str = "", kto: bool = False, text_cells: bool = False) -> Pair:
    """One raw record as a Pair; raises PairError naming the field at fault. `text_cells`: a CSV row."""
    if not isinstance(record, dict):
        raise PairError(f"expected a JSON object, got {json_kind(record)}")
    prompt, messages = _prompt(record)
    if kto:
        label = kto_label(_need(record, "label"), text_cells)
        if label is None:
            raise PairError(f"field 'label' must be true or false, got {_shown(record['label'])}")
        return Pair(prompt, _answer(_need(record, "completion"), "completion"), None, label, messages, source)
    chosen = _answer(_need(record, "chosen"), "chosen")
    rejected = _answer(_need(record, "rejected"), "rejected")
    if chosen.strip() == rejected.strip():  # "same" and "same " too: whitespace at the ends is no preference
        raise PairError("'chosen' and 'rejected' are the same answer (the pair teaches nothing)")
    return Pair(prompt, chosen, rejected, None, messages, source)


def _need(record: dict, name: str) -> Any:
    if name not in record:
        raise PairError(f"missing field '{name}'; fields present: {', '.join(map(str, record)) or 'none'}")
    return record[name]


def _prompt(record: dict) -> tuple[str, list[dict] | None]:
    """(prompt text, conversation or None) from `prompt` (string or message list) or `messages`. A
    conversation is read as chat rows are (data/row_text.py: text parts, tool calls and tool turns); it
    ends where the answer starts, after a user or a tool turn, and has a user turn."""
    value = record["messages"] if "messages" in record else _need(record, "prompt")
    name = "messages" if "messages" in record else "prompt"
    if isinstance(value, str):
        return text_value(value, name, PairError), None
    if not isinstance(value, list) or not value:
        raise PairError(f"field '{name}' must be a string or a non-empty list of messages")
    messages = openai_messages(value, PairError, name)
    if messages[-1]["role"] not in ("user", "tool"):
        raise PairError(f"the last message of '{name}' must be the user's or a tool's (the answers are "
                        "chosen/rejected)")
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        raise PairError(f"'{name}' needs a user message")
    return users[-1], messages


def _answer(value: Any, name: str) -> str:
    """An answer given as text, as one assistant message, or as a list of exactly one assistant message."""
    if isinstance(value, list):
        if len(value) != 1:
            raise PairError(f"field '{name}' as a list must hold exactly one assistant message, got {len(value)}")
        value = value[0]
    if isinstance(value, dict):
        if value.get("role") != "assistant":
            raise PairError(f"field '{name}' must be the assistant's message, got role {value.get('role')!r}")
        return message_text(value, name, PairError)  # text parts and tool calls, as a chat answer's
    return text_value(value, name, PairError)


def kto_label(value: Any, text_cells: bool = False) -> bool | None:
    """A KTO label: a boolean, or in a CSV file (`text_cells`), which can only write text, "true"/"false"
    (any case, spaces around); None for anything else (a generation row's own label is not a KTO one)."""
    if isinstance(value, bool):
        return value
    if text_cells and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _shown(value: Any) -> str:
    return repr(value[:40]) if isinstance(value, str) else type(value).__name__


def is_preference_row(record: dict, text_cells: bool = False) -> bool:
    """Whether a raw record is a preference row: it has `chosen`/`rejected`, or a true/false `label`
    beside a `completion` (KTO; `text_cells`: a CSV row's "true"/"false"). Any other label is not one."""
    return "chosen" in record or "rejected" in record or (
        "completion" in record and kto_label(record.get("label"), text_cells) is not None)


def is_kto_row(record: dict, text_cells: bool = False) -> bool:
    return ("chosen" not in record and "rejected" not in record
            and kto_label(record.get("label"), text_cells) is not None)


def has_text_cells(file: str) -> bool:
    """Whether rows of `file` hold text only (CSV, TSV): there "true" is how a boolean is written."""
    return file.lower().endswith((".csv", ".tsv"))
