"""The text of a row's fields and chat messages, one rule for every row format: chat examples
(data/examples.py) and the prompts of preference rows (data/pair_rows.py) read messages alike, so a
conversation one of them accepts the other accepts too.

Each function takes the exception type its caller reports row problems with.
"""

from __future__ import annotations

import json
from typing import Any

# Chat rows: the role names each format uses, mapped onto system / user / assistant / tool. OpenAI's
# legacy `function` turn and ShareGPT's observation turns are tool results; ShareGPT's `function_call`
# turn is the assistant calling a tool (its text is what the model should learn to write).
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                "tool": "tool", "function": "tool"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "model": "assistant",
                  "function_call": "assistant", "tool": "tool", "observation": "tool", "function_response": "tool"}


_JSON_KINDS = ((bool, "true/false"), (int, "a number"), (float, "a number"), (str, "a string"), (list, "a list"),
               (dict, "an object"))


def json_kind(value: Any) -> str:
    """What a JSON value is, in JSON's words (null, a number, a list), not Python's (NoneType, int)."""
    if value is None:
        return "null (or the key is missing)"
    return next((name for kind, name in _JSON_KINDS if isinstance(value, kind)), type(value).__name__)


def text_value(value: Any, name: str, error: type[ValueError]) -> str:
    """`value` when it is a non-blank string, else `error` naming the field."""
    if not isinstance(value, str):
        raise error(f"field '{name}' must be a string, got {json_kind(value)}")
    if not value.strip():
        raise error(f"field '{name}' is empty")
    return value


def openai_messages(messages: Any, error: type[ValueError], name: str = "messages") -> list[dict]:
    """OpenAI chat messages as {role, content} text turns; an assistant's `tool_calls` (or legacy
    `function_call`) are kept as JSON text after its content, so a tool-calling turn is neither lost
    nor given structure the chat template would have to understand."""
    if not isinstance(messages, list) or not messages:
        raise error(f"'{name}' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or OPENAI_ROLES.get(m["role"]) is None:
            raise error(f"{name}[{i}] needs a role of {', '.join(OPENAI_ROLES)}")
        if m.get("weight", 1) != 1 or isinstance(m.get("weight"), bool):
            # OpenAI's weight 0 means "do not train on this turn": training on it silently would be worse.
            raise error(f"{name}[{i}].weight {json.dumps(m['weight'])[:20]}: per-turn weights are not "
                        "supported; remove the key (task.train_on says which assistant turns are trained: "
                        "all_assistant_turns or last_turn)")
        out.append({"role": OPENAI_ROLES[m["role"]], "content": message_text(m, f"{name}[{i}]", error)})
    return out


def message_text(m: dict, where: str, error: type[ValueError]) -> str:
    """A message's text: a string, or OpenAI's list of text parts joined; tool calls appended as JSON."""
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise error(f"{where}.content: only text parts ({{'type': 'text', 'text': ...}}) can be trained on")
        content = "\n".join(p["text"] for p in content)
    calls = [m[k] for k in ("tool_calls", "function_call") if m.get(k)]
    if not calls:
        return text_value(content, f"{where}.content", error)
    if content is not None and not isinstance(content, str):
        raise error(f"field '{where}.content' must be a string, got {json_kind(content)}")
    call_text = "\n".join(json.dumps(c, ensure_ascii=False) for c in calls)
    return f"{content}\n{call_text}" if content and content.strip() else call_text
