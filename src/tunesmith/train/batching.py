"""Encoding examples for training and length-grouped batching (little padding waste)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tunesmith.data.examples import Example
from tunesmith.tasks.predict import answer_budget
from tunesmith.tasks.prompts import PromptFormat, encode_answer, encode_prompt

IGNORE = -100


@dataclass
class Encoded:
    """Prompt + answer ids; loss is taken on the answer tokens only."""

    ids: list[int]
    n_prompt: int
    truncated: bool = False
    weight: float = 1.0


def encode_for_training(tokenizer, fmt: PromptFormat, examples: list[Example]) -> list[Encoded]:
    budget = fmt.max_length - answer_budget(tokenizer, fmt)
    answers: dict[str, list[int]] = {}
    out = []
    for ex in examples:
        prompt, truncated = encode_prompt(tokenizer, fmt, ex, budget)
        if ex.target not in answers:
            answers[ex.target] = encode_answer(tokenizer, fmt, ex.target)
        answer = answers[ex.target][: fmt.max_length - len(prompt)]
        out.append(Encoded(prompt + answer, len(prompt), truncated or len(answer) < len(answers[ex.target]),
                           ex.weight))
    return out


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, group: int = 32) -> list[list[int]]:
    """Shuffled batches of indices whose lengths are close, so padding stays small.

    Indices are shuffled, cut into mega-batches of `group` batches, sorted by length inside each,
    and the resulting batches are shuffled again; the same seed gives the same order. `group=1`
    gives plain random batches. Larger groups waste less padding but, where length goes with the
    label, make each batch's label mix less random (see BENCHMARKS.md).
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * group
    batches = []
    for start in range(0, len(order), mega):
        group = sorted(order[start:start + mega], key=lambda i: lengths[i], reverse=True)
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(items: list[Encoded], pad_id: int, prefix_len: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) input_ids, attention_mask and labels (IGNORE outside answers).

    With `prefix_len` > 0 the first `prefix_len` tokens, identical in every item, go once into
    `prefix_ids` (P,) and the (B, T) tensors hold what follows them.
    """
    tails = [it.ids[prefix_len:] for it in items]
    width = max(len(t) for t in tails)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for i, (it, tail) in enumerate(zip(items, tails)):
        ids[i, : len(tail)] = torch.tensor(tail)
        mask[i, : len(tail)] = 1
        labels[i, it.n_prompt - prefix_len: len(tail)] = ids[i, it.n_prompt - prefix_len: len(tail)]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(it.weight != 1.0 for it in items):
        batch["weights"] = torch.tensor([it.weight for it in items], dtype=torch.float32)  # (B,)
    if prefix_len:
        batch["prefix_ids"] = torch.tensor(items[0].ids[:prefix_len])
    return batch


def batch_stream(encoded: list[Encoded], cfg, pad_id: int, prefix_len: int, rank: int = 0,
                 world: int = 1, skip: int = 0):
    """Collated batches forever (`cfg` gives batch_size, seed and length_grouping): this rank's
    batches forever, one reshuffle per epoch seeded by the epoch, so a run is repeatable and a
    resumed run sees the same order. Global batch i goes to rank i % world; `skip` is the number of
    this rank's batches already consumed."""
    epoch, seen = 0, 0
    while True:
        order = length_grouped_batches([len(e.ids) for e in encoded], cfg.batch_size, cfg.seed + epoch,
                                       cfg.length_grouping)
        # Every rank takes the same number of batches per epoch (the remainder is dropped).
        usable = len(order) - len(order) % world if len(order) >= world else len(order)
        for idx in order[rank:usable:world]:
            if seen >= skip:
                yield collate([encoded[i] for i in idx], pad_id, prefix_len)
            seen += 1
        epoch += 1
