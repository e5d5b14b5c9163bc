"""Prompt formatting: instruction + input (+ label set) through the model's chat template."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tunesmith.data.examples import Example

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
    return tokenizer(answer_suffix(tokenizer, fmt, answer), add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer, fmt: PromptFormat, ex: Example, budget: int) -> tuple[list[int], bool]:
    """Token ids of the prompt, cutting the input text when the prompt exceeds `budget` tokens.

    Returns the ids and whether the input was truncated.
    """
    ids = _ids(tokenizer, render_prompt(tokenizer, fmt, ex))
    if len(ids) <= budget:
        return ids, False
    over = len(ids) - budget
    input_ids = _ids(tokenizer, ex.input)
    keep = max(1, len(input_ids) - over - 2)
    cut = Example(tokenizer.decode(input_ids[:keep]), ex.target, ex.source, _cut_last_user(ex, input_ids, keep, tokenizer))
    ids = _ids(tokenizer, render_prompt(tokenizer, fmt, cut))
    return ids[-budget:] if len(ids) > budget else ids, True


def _cut_last_user(ex: Example, input_ids: list[int], keep: int, tokenizer) -> list[dict] | None:
    if ex.messages is None:
        return None
    messages = [dict(m) for m in ex.messages]
    for m in reversed(messages):
        if m["role"] == "user":
            m["content"] = tokenizer.decode(input_ids[:keep])
            break
    return messages


def _ids(tokenizer, text: str) -> list[int]:
    # Chat templates already contain any BOS they need.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_format(task, labels: list[str] | None, tokenizer) -> PromptFormat:
    """Decide on the prompt format for a task; the label list goes in when it fits the context."""
    list_labels = bool(labels)
    if labels and task.list_labels == "auto":
        listing = "Answer with one of: " + ", ".join(labels) + "."
        list_labels = len(_ids(tokenizer, listing)) <= task.max_length // 3
    elif labels:
        list_labels = bool(task.list_labels)
    return PromptFormat(task.type, task.instruction, labels, list_labels, task.max_length,
                        label_scoring=task.label_scoring)
