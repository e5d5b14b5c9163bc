"""One entry point for predictions, used by validation during training, eval and tests."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from tunesmith import hardware
from tunesmith.config import GenerationSettings
from tunesmith.data.examples import Example
from tunesmith.models.tokens import text_ids
from tunesmith.tasks.classification import predict_labels, score_labels, score_labels_constrained
from tunesmith.tasks.generation import generate
from tunesmith.tasks.prompts import PromptFormat, answer_head, encode_prompt, label_answers

# task.label_scoring -> scorer (see tasks/classification.py and tasks/label_trie.py)
LABEL_SCORERS = {"sequence": score_labels, "constrained": score_labels_constrained,
                 "constrained_pruned": partial(score_labels_constrained, prune=True)}


@dataclass
class Predictions:
    texts: list[str]
    probabilities: list[dict[str, float]] | None = None


def answer_budget(tokenizer, fmt: PromptFormat) -> int:
    """Tokens reserved for the answer: the longest label, or a fixed share for generation."""
    if fmt.labels:
        return max(len(ids) for ids in label_answers(tokenizer, fmt))
    return max(16, fmt.max_length // 4)


def reference_budget(tokenizer, answers: list[str], ceiling: int = 512) -> int:
    """New tokens enough for answers like `answers`: the longest one plus a quarter and a few tokens.

    Training-time validation decodes with this instead of a fixed 64: a model that has not yet learned
    to stop is cut near the length it should answer at, and long references are not cut short."""
    # Past the ceiling a length changes nothing: only a head that holds more tokens is tokenized.
    longest = max((len(text_ids(tokenizer, answer_head(tokenizer, a, ceiling))) for a in answers), default=0)
    return min(max(8, longest + longest // 4 + 4), ceiling)


def encode_prompts(tokenizer, fmt: PromptFormat, examples: list[Example]) -> list[list[int]]:
    budget = fmt.max_length - answer_budget(tokenizer, fmt)
    return [encode_prompt(tokenizer, fmt, ex, budget)[0] for ex in examples]


def predict(model, tokenizer, fmt: PromptFormat, examples: list[Example], batch_size: int = 16,
            max_new_tokens: int = 64, autocast: bool = False, progress: str | None = None,
            sampling: GenerationSettings | None = None) -> Predictions:
    """Predict every example: label scoring for classification, decoding otherwise (greedy unless
    `sampling` says otherwise; see tasks/sampling.py).

    `progress`, when given, is the label of a progress bar over the batches.
    """
    was_training = model.training
    model.eval()
    prompts = encode_prompts(tokenizer, fmt, examples)
    # Batches of similar lengths waste less compute on padding; results go back in input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    prompts = [prompts[i] for i in order]
    try:
        with hardware.autocast(autocast, next(model.parameters()).device):
            if fmt.labels:
                answers = label_answers(tokenizer, fmt)
                scores = LABEL_SCORERS[fmt.label_scoring](model, prompts, answers, tokenizer.pad_token_id,
                                batch_size=batch_size, progress=progress)
                scores = scores[torch.tensor(inverse(order))]
                return Predictions(*predict_labels(scores, fmt.labels))
            texts = generate(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size, progress=progress,
                             sampling=sampling)
            return Predictions([texts[i] for i in inverse(order)])
    finally:
        model.train(was_training)


def inverse(order: list[int]) -> list[int]:
    """The permutation that undoes `order` (out[order[k]] = k)."""
    out = [0] * len(order)
    for k, i in enumerate(order):
        out[i] = k
    return out
