"""task.chat_template: which chat template renders the conversations, and a pre-flight that checks it
against the rows before any training.

The chosen template is set on the tokenizer (`tokenizer.chat_template`) right after loading, so the
very same text reaches training, evaluation, the saved model folder, `serve` and every export. Templates
are rendered by transformers' `apply_chat_template` (a sandboxed Jinja environment), never by our own.

The pre-flight refuses, with the row's file:line, what users otherwise find after exporting a model:
a template that cannot render a row (a role it rejects), an answer that does not end with a token
generation stops at (EOS missing: the model never stops), and a generation prompt that is not what
preceded the answer in training (the served prompt differs from the trained one).
"""

from __future__ import annotations

import itertools
from pathlib import Path

from tunesmith.config import TaskConfig
from tunesmith.data.examples import Example
from tunesmith.errors import ConfigError, DataError
from tunesmith.models.tokens import UserText, stop_ids
from tunesmith.registry import CHAT_TEMPLATES
from tunesmith.tasks.prompts import (
    PromptFormat,
    TemplateMismatch,
    cuts_newest_first,
    render_prompt,
    rendered_answer,
    supervises_turns,
)

KEY = "task.chat_template"
# Rows checked: the first PREFLIGHT_ROWS, plus the first row of every other sequence of roles (a
# template fails on roles far more often than on words), so a large file stays a fast check.
PREFLIGHT_ROWS = 256
PREFLIGHT_TURNS = 16  # newest assistant turns of a row checked (see _check_row)
_PROBE = [{"role": "user", "content": "hi"}]


def template_text(task: TaskConfig, base_dir: Path) -> str | None:
    """The Jinja text task.chat_template names: None for `model` (keep the tokenizer's own), a built-in
    (registry.CHAT_TEMPLATES), or a .jinja file, relative to the project folder."""
    name = task.chat_template
    if name == "model":
        return None
    if name in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name]
    path = Path(name).expanduser()
    path = path if path.is_absolute() else base_dir / path
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the chat template file {path} ({type(e).__name__})", KEY,
                          "give a readable UTF-8 .jinja file, relative to the project file") from None
    if not text.strip():
        raise ConfigError(f"the chat template file {path} is empty", KEY, "write a Jinja chat template into it")
    return text


def use_chat_template(tokenizer, task: TaskConfig, base_dir: Path) -> None:
    """Put the chosen template on `tokenizer` (from here on it renders every prompt, and it is saved
    with the model); a template that does not even compile is a config error."""
    text = template_text(task, base_dir)
    if text is None:
        return
    try:
        tokenizer.apply_chat_template(_PROBE, chat_template=text, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - any failure of a user's template on a plain user turn is a config error
        raise ConfigError(f"the chat template '{task.chat_template}' does not render ({_reason(e)})", KEY,
                          "fix the Jinja template") from None
    tokenizer.chat_template = text


def check_chat_template(tokenizer, fmt: PromptFormat, examples: list[Example], name: str = "model") -> list[str]:
    """Raise a located error (DataError naming task.chat_template and the row) when the template cannot
    render a row, leaves the answer without an end-of-turn token, or has a generation prompt that is not
    what precedes the answer in training; return warnings. Classification rows get the render check
    only (label scoring needs no stop token; preflight warns about it)."""
    if fmt.task_type == "text":
        return []
    if not tokenizer.chat_template:
        return _plain_notes(tokenizer, fmt, examples)
    for ex in _sample(examples):
        _check_row(tokenizer, fmt, ex, name)
    return []


def _plain_notes(tokenizer, fmt: PromptFormat, examples: list[Example]) -> list[str]:
    turns = [ex for ex in examples if ex.messages and any(m["role"] == "assistant" for m in ex.messages)]
    if not turns or fmt.train_on != "all_assistant_turns":
        return []
    return [f"{len(turns)} conversations have several assistant turns but the tokenizer has no chat template, "
            "so only their last answer is trained (task.train_on: all_assistant_turns needs one: "
            "set task.chat_template, e.g. chatml)"]


def _sample(examples: list[Example]) -> list[Example]:
    seen: set[tuple[str, ...]] = set()
    out = []
    for i, ex in enumerate(examples):
        roles = tuple(m["role"] for m in ex.messages or ())
        if i < PREFLIGHT_ROWS or roles not in seen:
            out.append(ex)
        seen.add(roles)
    return out


def _check_row(tokenizer, fmt: PromptFormat, ex: Example, name: str) -> None:
    messages = fmt.messages(ex)
    user = UserText(tokenizer)
    target = user.mark(ex.target)  # a control-token string in the answer must not pass for the template's EOS
    try:
        answer = rendered_answer(tokenizer, messages, target)
        if answer is not None and supervises_turns(tokenizer, fmt, ex):
            # The newest turns only: each costs a render of the conversation up to it (all of a
            # 10,000-message row would take as long as its square).
            for _ in itertools.islice(cuts_newest_first(tokenizer, fmt, ex, render_prompt(tokenizer, fmt, ex)),
                                      PREFLIGHT_TURNS):
                pass
        same = _ignores_generation_prompt(tokenizer, messages)
    except TemplateMismatch as e:
        raise mismatch_error(ex, e, name) from None
    except Exception as e:  # noqa: BLE001 - Jinja errors, raise_exception(...) of the template, bad roles
        raise _row_error(ex, f"{KEY} '{name}' cannot render this row ({_reason(e)})",
                         "choose a template that accepts these roles (chatml renders any role), "
                         "or fix the row") from None
    if fmt.task_type == "classification":
        return
    if answer is None or same:
        raise _row_error(ex, f"{KEY} '{name}': the generation prompt (add_generation_prompt) is not what precedes "
                         "the answer in the rendered conversation, so the model would be served a different "
                         "prompt than it was trained on", "use a template whose generation prompt opens the "
                         "assistant turn exactly as the conversation renders it (chatml, llama3, zephyr)")
    ids = user.encode(answer)
    if not ids or ids[-1] not in stop_ids(tokenizer):
        raise _row_error(ex, f"{KEY} '{name}': the rendered answer does not end with an end-of-turn token the model "
                         f"stops at (EOS missing: it ends with {tokenizer.decode(ids[-1:])!r}), so "
                         "generated answers would never stop", "use a template whose turns end with a token of "
                         "the tokenizer's vocabulary that is its EOS (zephyr uses eos_token)")


def mismatch_error(ex: Example, e: TemplateMismatch, name: str | None = None) -> DataError:
    """The located error for a row whose earlier assistant turns the template rewrites (the pre-flight
    samples rows, and whether a template rewrites a turn depends on its text: e.g. a `</think>`)."""
    which = f" '{name}'" if name else ""
    return _row_error(ex, f"{KEY}{which}: {e}", "set task.train_on: last_turn, or use a template that "
                      "renders earlier turns the same way (chatml)")


def _ignores_generation_prompt(tokenizer, messages: list[dict]) -> bool:
    """Whether add_generation_prompt changes nothing: the assistant header would then be part of the
    trained answer, and a served model would write it into every reply."""
    with_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return with_prompt == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def _row_error(ex: Example, what: str, hint: str) -> DataError:
    if ex.file:
        return DataError(what, ex.file, ex.line or None, hint)
    return DataError(what, ex.source, None, hint)


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'}"
