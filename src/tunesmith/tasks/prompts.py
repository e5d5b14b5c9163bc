"""Prompt formatting: instruction + input (+ label set) through the model's chat template."""

from __future__ import annotations

import dataclasses
import json
import typing
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunesmith import fsio
from tunesmith.config import TaskConfig
from tunesmith.data.examples import Example
from tunesmith.errors import ConfigError
from tunesmith.models.tokens import UserText, longest_token_chars, text_ids

# Used when a tokenizer has no chat template (base models, tiny test models).
PLAIN_TEMPLATE = "{system}\n\n{shots}Input: {input}\nOutput:"
PLAIN_SHOT = "Input: {input}\nOutput: {output}\n\n"

# Label answers already encoded, per tokenizer (dropped with it) and then per format and tokenizer state;
# at most _FORMATS_PER_TOKENIZER formats each, the oldest forgotten first.
_LABEL_ANSWERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FORMATS_PER_TOKENIZER = 4


@dataclass
class PromptFormat:
    """Everything needed to rebuild a prompt exactly; saved next to the weights as prompt.json."""

    task_type: str
    instruction: str
    labels: list[str] | None
    list_labels: bool
    max_length: int
    # Worked examples shown before the input ({"input", "output"}), chosen by prompt_optimization.
    shots: list[dict] = field(default_factory=list)
    # How a label is scored: "sequence" (log-probability of all its tokens), "constrained" (the
    # probability that decoding restricted to the label set produces it; far fewer forwards) or
    # "constrained_pruned" (constrained, skipping label groups that cannot win).
    label_scoring: str = "sequence"
    # Which assistant turns of a conversation are targets (task.train_on): "all_assistant_turns" or "last_turn".
    train_on: str = "all_assistant_turns"

    def system_text(self) -> str:
        text = self.instruction.strip()
        if self.labels and self.list_labels:
            text += ("\n" if text else "") + "Answer with one of: " + ", ".join(self.labels) + "."
        return text

    def messages(self, ex: Example) -> list[dict]:
        """The conversation up to (not including) the answer."""
        system = self.system_text()
        shots = [m for s in self.shots for m in ({"role": "user", "content": s["input"]},
                                                 {"role": "assistant", "content": s["output"]})]
        if ex.messages is not None:
            if ex.messages and ex.messages[0]["role"] == "system":
                return ex.messages[:1] + shots + ex.messages[1:]
            head = [{"role": "system", "content": system}] if system else []
            return head + shots + ex.messages
        head = [{"role": "system", "content": system}] if system else []
        return head + shots + [{"role": "user", "content": ex.input}]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> PromptFormat:
        return cls(**d)


def read_prompt_format(path: Path) -> PromptFormat:
    """The prompt.json at `path` (a run's model folder), its fields checked: DamagedFile naming the
    file and the first field that is missing or not what `PromptFormat.to_json` writes (or the file itself:
    deleted, or a dangling link)."""
    if not Path(path).is_file():
        raise fsio.DamagedFile(Path(path), "the file is missing or not a regular file", what="not what tunesmith wrote")
    d = fsio.read_json(path, dict)
    if problem := _format_problem(d):
        raise fsio.DamagedFile(Path(path), problem, what="not what tunesmith wrote")
    return PromptFormat.from_json(d)


def _format_problem(d: dict) -> str | None:
    fields = {f.name: f for f in dataclasses.fields(PromptFormat)}
    if unknown := sorted(set(d) - set(fields)):
        return f"unknown field {unknown[0]!r}"
    if missing := [n for n, f in fields.items() if n not in d and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]:
        return f"no field {missing[0]!r}"
    task = TaskConfig.model_fields
    choices = {"task_type": task["type"], "label_scoring": task["label_scoring"], "train_on": task["train_on"]}
    for name, spec in choices.items():
        if name in d and d[name] not in typing.get_args(spec.annotation):
            return f"{name} {str(d[name])[:40]!r} is not one of {', '.join(typing.get_args(spec.annotation))}"
    checks = {"instruction": isinstance(d["instruction"], str),
              "labels": d["labels"] is None or (isinstance(d["labels"], list)
                                                and all(isinstance(x, str) for x in d["labels"])),
              "list_labels": isinstance(d["list_labels"], bool),
              "max_length": type(d["max_length"]) is int and d["max_length"] > 0,
              "shots": isinstance(d.get("shots", []), list) and all(
                  isinstance(s, dict) and set(s) == {"input", "output"} and all(isinstance(v, str) for v in s.values())
                  for s in d.get("shots", []))}
    if d.get("task_type") == "classification" and not d["labels"] and checks["labels"]:
        return "field 'labels' is empty: a classification run has its label list"
    return next((f"field {name!r} has the wrong type or value" for name, ok in checks.items() if not ok), None)


def render_prompt(tokenizer, fmt: PromptFormat, ex: Example) -> str:
    """Prompt text ending where the model's answer starts."""
    messages = fmt.messages(ex)
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    n_shot = 2 * len(fmt.shots)
    shots = "".join(PLAIN_SHOT.format(**s) for s in fmt.shots)
    rest = [m for m in messages if m["role"] != "system"][n_shot:]
    turns = "\n".join(m["content"] for m in rest)
    return PLAIN_TEMPLATE.format(system=system, shots=shots, input=turns).lstrip()


def answer_suffix(tokenizer, fmt: PromptFormat, answer: str) -> str:
    """The text the model must produce after the prompt: the answer and its end-of-turn marker."""
    if not tokenizer.chat_template:
        return " " + answer + (tokenizer.eos_token or "")
    rendered = rendered_answer(tokenizer, fmt.messages(Example("x", answer, "probe")), answer)
    # Templates that rewrite earlier turns: fall back to answer + EOS (the chat pre-flight refuses
    # such templates for generation, see tasks/chat_template.py).
    return answer + (tokenizer.eos_token or "") if rendered is None else rendered


def rendered_answer(tokenizer, messages: list[dict], answer: str) -> str | None:
    """What the chat template writes after its generation prompt for `messages` when the assistant
    answers `answer` (the answer and its end-of-turn token); None when the generation prompt is not
    a prefix of the conversation rendered with the answer."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        return None
    # Trailing newlines after the end-of-turn token are formatting, not something to learn.
    return full[len(prompt):].rstrip("\n")


class TemplateMismatch(ValueError):
    """The chat template renders an earlier assistant turn differently once the conversation goes on,
    so that turn cannot be supervised as the model will see it (task.train_on: all_assistant_turns)."""


def supervises_turns(tokenizer, fmt: PromptFormat, ex: Example) -> bool:
    """Whether `ex`'s earlier assistant turns are targets too: task.train_on all_assistant_turns, a
    chat template (the plain prompt has no turns) and an assistant turn before the answer."""
    return (fmt.train_on == "all_assistant_turns" and bool(tokenizer.chat_template) and ex.messages is not None
            and any(m["role"] == "assistant" for m in ex.messages))


def encode_turns(tokenizer, fmt: PromptFormat, ex: Example,
                 budget: int) -> tuple[list[int], list[tuple[int, int]], bool]:
    """The prompt's token ids (as `encode_prompt`), the [start, end) spans in them of the row's earlier
    assistant turns (content and end-of-turn token: the other supervised tokens) and whether it was cut.

    Every message is literal text, as in `encode_prompt`. A prompt over `budget` tokens loses its
    oldest tokens (the spans move with it); the answer being learned stays whole.

    Raises:
        TemplateMismatch: the template rewrites an earlier turn (or tokenizes it differently in context).
    """
    user = UserText(tokenizer)
    mfmt = _marked_format(fmt, user)
    messages = [{**m, "content": user.mark(m["content"])} for m in ex.messages or []]
    marked = dataclasses.replace(ex, input=user.mark(ex.input), messages=messages)
    full = render_prompt(tokenizer, mfmt, marked)
    ids = user.encode(full)
    over = max(0, len(ids) - budget)
    # Newest turn first, stopping at the first that the cut drops whole: every turn costs a render and an
    # encoding of the conversation up to it, so a long conversation costs what its kept turns do, not
    # the square of its length.
    spans = []
    for a, b in cuts_newest_first(tokenizer, mfmt, marked, full):
        end = _tokens_before(user, ids, full[:b])
        if end <= over:
            break
        spans.append((max(_tokens_before(user, ids, full[:a]) - over, 0), end - over))
    return ids[over:], spans[::-1], over > 0


def cuts_newest_first(tokenizer, fmt: PromptFormat, ex: Example, full: str) -> Iterator[tuple[int, int]]:
    """[start, end) character ranges in the rendered prompt `full` of the assistant turns in `ex.messages`,
    the newest first, each computed only when asked for: where the template's generation prompt for
    that turn ends, and its end-of-turn token."""
    turns = [i for i, m in enumerate(ex.messages or []) if m["role"] == "assistant"]
    for number, i in reversed(list(enumerate(turns, 1))):
        head_ex = dataclasses.replace(ex, messages=ex.messages[:i])
        head = render_prompt(tokenizer, fmt, head_ex)
        answer = rendered_answer(tokenizer, fmt.messages(head_ex), ex.messages[i]["content"])
        if answer is None or not full.startswith(head + answer):
            raise TemplateMismatch(f"the chat template renders assistant turn {number} differently once the "
                                   "conversation goes on, so it cannot be trained as the model will see it")
        yield len(head), len(head) + len(answer)


def _tokens_before(user: UserText, ids: list[int], head: str) -> int:
    """How many of `ids` (the whole prompt's tokens) `head`, a prefix of the prompt text, takes."""
    part = user.encode(head)
    if ids[:len(part)] != part:
        raise TemplateMismatch("an assistant turn's tokens change once the conversation goes on "
                               "(the tokenizer merges across the turn boundary)")
    return len(part)


def encode_answer(tokenizer, fmt: PromptFormat, answer: str) -> list[int]:
    """Token ids of the answer suffix; the answer (a label from the data) is literal text."""
    user = UserText(tokenizer)
    return user.encode(answer_suffix(tokenizer, _marked_format(fmt, user), user.mark(answer)))


def label_answers(tokenizer, fmt: PromptFormat) -> list[list[int]]:
    """`encode_answer` of every label in `fmt.labels`, in order. Remembered per tokenizer and format: a
    served classifier needs them for every request (and several times in one), and rendering a
    77-label set through a chat template takes tens of milliseconds."""
    # The tokenizer's state enters the key: a pad or special token added later changes the encoding.
    # (A chat template may be a dict of named templates: keyed through json, which hashes.)
    # (A tokenizer-like vocabulary, as GGUF export checks read back, may have no len().)
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    key = json.dumps([asdict(fmt), size, getattr(tokenizer, "chat_template", None),
                      getattr(tokenizer, "eos_token", None)], sort_keys=True, default=str)
    try:
        known = _LABEL_ANSWERS.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer-like object that takes no weak reference: encode every time
        known = {}
    if key not in known:
        if len(known) >= _FORMATS_PER_TOKENIZER:
            known.pop(next(iter(known)))
        known[key] = [encode_answer(tokenizer, fmt, label) for label in fmt.labels or []]
    return [list(ids) for ids in known[key]]  # copies: a caller may change its lists


def encode_prompt(tokenizer, fmt: PromptFormat, ex: Example, budget: int) -> tuple[list[int], bool]:
    """Token ids of the prompt, cutting the input text when the prompt exceeds `budget` tokens.

    Returns the ids and whether the input was truncated.
    """
    ex, precut = _precut(tokenizer, ex, budget)
    ids = _encode_rendered(tokenizer, fmt, ex)
    if len(ids) <= budget:
        return ids, precut
    over = len(ids) - budget
    input_ids = text_ids(tokenizer, ex.input)
    keep = max(1, len(input_ids) - over - 4)
    shortened = _head_and_tail(tokenizer, input_ids, keep)
    cut = dataclasses.replace(ex, input=shortened, messages=_cut_last_user(ex, shortened))
    ids = _encode_rendered(tokenizer, fmt, cut)
    return ids[-budget:] if len(ids) > budget else ids, True


def _precut(tokenizer, ex: Example, budget: int) -> tuple[Example, bool]:
    """`ex` with the middle of an input far longer than `budget` tokens dropped before any tokenization
    (a 10 MB prompt took seconds to tokenize at every validation), and whether it was. The cuts fall on
    whitespace (no token spans one) and each kept end is checked to hold more than `budget` tokens, so
    `_head_and_tail` keeps the same tokens as from the whole input; else the input stays whole."""
    text, longest = ex.input, longest_token_chars(tokenizer)
    if longest is None or (ex.messages is not None and _last_user(ex.messages) != text):
        return ex, False
    side = 2 * budget * longest  # x2: normalizers may drop characters (accents)
    if len(text) <= 2 * side + 1:
        return ex, False
    head_end = max(text.rfind(c, side // 2, side) for c in " \n\t")
    tail_start = min((i for i in (text.find(c, len(text) - side, len(text) - side // 2) for c in " \n\t")
                      if i >= 0), default=-1)
    if head_end < 0 or tail_start < 0:  # no whitespace near a cut (a long unbroken run): tokenized whole
        return ex, False
    head, tail = text[:head_end], text[tail_start:]
    if min(len(text_ids(tokenizer, head)), len(text_ids(tokenizer, tail))) <= budget:  # folded by a normalizer
        return ex, False
    cut = head + tail
    return dataclasses.replace(ex, input=cut, messages=_cut_last_user(ex, cut)), True


def answer_head(tokenizer, answer: str, tokens: int) -> str:
    """The start of `answer` that holds its first `tokens` tokens, cut on whitespace and checked (the rest
    would be cut after tokenizing it whole): a 10 MB answer is not tokenized past what training keeps."""
    longest = longest_token_chars(tokenizer)
    side = 2 * tokens * (longest or 0)
    if longest is None or len(answer) <= side:
        return answer
    end = max(answer.rfind(c, side // 2, side) for c in " \n\t")
    return answer[:end] if end > 0 and len(text_ids(tokenizer, answer[:end])) > tokens else answer


def _last_user(messages: list[dict]) -> str | None:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)


def _head_and_tail(tokenizer, input_ids: list[int], keep: int) -> str:
    """The input cut to about `keep` tokens by dropping its middle: the start (what a document is about)
    and the end (where a question after a context sits) both survive. Head + tail truncation is also what
    Sun et al. 2019 ("How to Fine-Tune BERT for Text Classification?") found best for long texts."""
    head = (keep + 1) // 2
    tail = keep - head
    if tail <= 0:
        return tokenizer.decode(input_ids[:keep])
    return tokenizer.decode(input_ids[:head]).rstrip() + " … " + tokenizer.decode(input_ids[-tail:]).lstrip()


def _encode_rendered(tokenizer, fmt: PromptFormat, ex: Example) -> list[int]:
    """The prompt's token ids, with every user-supplied string (input, chat turns, worked examples,
    labels, instruction) tokenized as literal text, never as control tokens (models/tokens.py)."""
    user = UserText(tokenizer)
    messages = None if ex.messages is None else [{**m, "content": user.mark(m["content"])} for m in ex.messages]
    marked = dataclasses.replace(ex, input=user.mark(ex.input), messages=messages)
    return user.encode(render_prompt(tokenizer, _marked_format(fmt, user), marked))


def _marked_format(fmt: PromptFormat, user: UserText) -> PromptFormat:
    """`fmt` with its user-supplied strings marked for literal tokenization."""
    return dataclasses.replace(
        fmt, instruction=user.mark(fmt.instruction),
        labels=None if fmt.labels is None else [user.mark(lab) for lab in fmt.labels],
        shots=[{k: user.mark(v) for k, v in shot.items()} for shot in fmt.shots])


def _cut_last_user(ex: Example, shortened: str) -> list[dict] | None:
    if ex.messages is None:
        return None
    messages = [dict(m) for m in ex.messages]
    for m in reversed(messages):
        if m["role"] == "user":
            m["content"] = shortened
            break
    return messages


def answer_only(fmt: PromptFormat) -> PromptFormat:
    """`fmt` supervising the final answer alone: what a pair's log-probability and an answer's
    perplexity score, whatever task.train_on trains (earlier assistant turns are then prompt)."""
    return dataclasses.replace(fmt, train_on="last_turn")


def build_format(task, labels: list[str] | None, tokenizer) -> PromptFormat:
    """Decide on the prompt format for a task; the label list goes in when it fits the context."""
    list_labels = bool(labels)
    if labels and task.list_labels == "auto":
        listing = "Answer with one of: " + ", ".join(labels) + "."
        list_labels = len(text_ids(tokenizer, listing)) <= task.max_length // 3
    elif labels:
        list_labels = bool(task.list_labels)
    fmt = PromptFormat(task.type, task.instruction, labels, list_labels, task.max_length,
                       label_scoring=task.label_scoring, train_on=task.train_on)
    if labels:
        _check_labels_fit(tokenizer, fmt)
    return fmt


def _check_labels_fit(tokenizer, fmt: PromptFormat) -> None:
    """ConfigError when the longest label fills task.max_length: the prompt's budget (max_length less
    the longest answer) would be empty or negative, and scoring a row would fail on an empty prompt.
    A small budget still works: prompts are cut to their last tokens, with a truncation warning."""
    lengths = {label: len(encode_answer(tokenizer, fmt, label)) for label in fmt.labels}
    longest = max(lengths, key=lengths.__getitem__)
    if lengths[longest] >= fmt.max_length:
        shown = longest if len(longest) <= 40 else longest[:40] + "..."
        raise ConfigError(f"the label '{shown}' is {lengths[longest]:,} tokens, leaving no room for a prompt in "
                          f"task.max_length ({fmt.max_length})", "task.max_length",
                          "shorten the label, or raise task.max_length")
