"""Prompt formatting: instruction + input (+ label set) through the model's chat template."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from tunesmith.data.examples import Example
from tunesmith.models.tokens import UserText, text_ids

# Used when a tokenizer has no chat template (base models, tiny test models).
PLAIN_TEMPLATE = "{system}\n\n{shots}Input: {input}\nOutput:"
PLAIN_SHOT = "Input: {input}\nOutput: {output}\n\n"


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
    probe = Example("x", answer, "probe")
    messages = fmt.messages(probe)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        # Templates that rewrite earlier turns: fall back to answer + EOS.
        return answer + (tokenizer.eos_token or "")
    # Trailing newlines after the end-of-turn token are formatting, not something to learn.
    return full[len(prompt):].rstrip("\n")


def encode_answer(tokenizer, fmt: PromptFormat, answer: str) -> list[int]:
    """Token ids of the answer suffix; the answer (a label from the data) is literal text."""
    user = UserText(tokenizer)
    return user.encode(answer_suffix(tokenizer, _marked_format(fmt, user), user.mark(answer)))


def encode_prompt(tokenizer, fmt: PromptFormat, ex: Example, budget: int) -> tuple[list[int], bool]:
    """Token ids of the prompt, cutting the input text when the prompt exceeds `budget` tokens.

    Returns the ids and whether the input was truncated.
    """
    ids = _encode_rendered(tokenizer, fmt, ex)
    if len(ids) <= budget:
        return ids, False
    over = len(ids) - budget
    input_ids = text_ids(tokenizer, ex.input)
    keep = max(1, len(input_ids) - over - 2)
    cut = Example(tokenizer.decode(input_ids[:keep]), ex.target, ex.source,
                  _cut_last_user(ex, input_ids, keep, tokenizer))
    ids = _encode_rendered(tokenizer, fmt, cut)
    return ids[-budget:] if len(ids) > budget else ids, True


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


def _cut_last_user(ex: Example, input_ids: list[int], keep: int, tokenizer) -> list[dict] | None:
    if ex.messages is None:
        return None
    messages = [dict(m) for m in ex.messages]
    for m in reversed(messages):
        if m["role"] == "user":
            m["content"] = tokenizer.decode(input_ids[:keep])
            break
    return messages


def build_format(task, labels: list[str] | None, tokenizer) -> PromptFormat:
    """Decide on the prompt format for a task; the label list goes in when it fits the context."""
    list_labels = bool(labels)
    if labels and task.list_labels == "auto":
        listing = "Answer with one of: " + ", ".join(labels) + "."
        list_labels = len(text_ids(tokenizer, listing)) <= task.max_length // 3
    elif labels:
        list_labels = bool(task.list_labels)
    return PromptFormat(task.type, task.instruction, labels, list_labels, task.max_length,
                        label_scoring=task.label_scoring)
