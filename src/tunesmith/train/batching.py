"""Encoding examples for training and length-grouped batching (little padding waste)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from tunesmith.data.examples import Example
from tunesmith.tasks.chat_template import mismatch_error
from tunesmith.tasks.predict import answer_budget
from tunesmith.tasks.prompts import (
    PromptFormat,
    TemplateMismatch,
    answer_head,
    encode_answer,
    encode_prompt,
    encode_turns,
    supervises_turns,
)
from tunesmith.train.packing import budget_batches

IGNORE = -100
# Row batches are padded to a multiple of this width. CPU matmuls (oneDNN) compile and cache a kernel
# per shape, so every distinct width costs compile time and cache memory; at most 7 masked tokens per
# row buy far fewer shapes (BENCHMARKS.md, "Quickstart host memory").
PAD_MULTIPLE = 8


@dataclass
class Encoded:
    """Prompt + answer ids; loss is taken on the answer tokens only, and on the [start, end) `spans`
    inside the prompt (a conversation's earlier assistant turns, task.train_on: all_assistant_turns)."""

    ids: list[int]
    n_prompt: int
    truncated: bool = False
    weight: float = 1.0
    spans: tuple[tuple[int, int], ...] = ()

    @property
    def start(self) -> int:
        """Index of the first supervised token (everything before it is context only)."""
        return min([self.n_prompt] + [a for a, _ in self.spans])

    def targets(self) -> list[tuple[int, int]]:
        """Every supervised [start, end) range: the earlier spans, then the answer."""
        return [*self.spans, (self.n_prompt, len(self.ids))]


def encode_for_training(tokenizer, fmt: PromptFormat, examples: list[Example]) -> list[Encoded]:
    budget = fmt.max_length - answer_budget(tokenizer, fmt)
    answers: dict[str, list[int]] = {}
    out = []
    for ex in examples:
        if supervises_turns(tokenizer, fmt, ex):
            prompt, spans, truncated = _encode_turns(tokenizer, fmt, ex, budget)
        else:
            (prompt, truncated), spans = encode_prompt(tokenizer, fmt, ex, budget), []
        if ex.target not in answers:
            answers[ex.target] = encode_answer(tokenizer, fmt, answer_head(tokenizer, ex.target, fmt.max_length))
        answer = answers[ex.target][: fmt.max_length - len(prompt)]
        out.append(Encoded(prompt + answer, len(prompt), truncated or len(answer) < len(answers[ex.target]),
                           ex.weight, tuple(spans)))
    return out


def _encode_turns(tokenizer, fmt: PromptFormat, ex: Example, budget: int):
    """`encode_turns`, its TemplateMismatch a located DataError: the pre-flight samples rows, and a
    template may rewrite an earlier turn only for some texts (one holding `</think>`, say)."""
    try:
        return encode_turns(tokenizer, fmt, ex, budget)
    except TemplateMismatch as e:
        raise mismatch_error(ex, e) from None


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


def collate(items: list[Encoded], pad_id: int, prefix_len: int = 0, multiple: int = 1,
            limit: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) input_ids, attention_mask and labels (IGNORE outside answers), T the longest
    row rounded up to a multiple of `multiple` but not past `limit` columns (a model's position limit).

    With `prefix_len` > 0 the first `prefix_len` tokens, identical in every item, go once into
    `prefix_ids` (P,) and the (B, T) tensors hold what follows them.
    """
    tails = [it.ids[prefix_len:] for it in items]
    longest = max(len(t) for t in tails)
    width = max(longest, min(-(-longest // multiple) * multiple, limit or longest + multiple))
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for i, (it, tail) in enumerate(zip(items, tails)):
        ids[i, : len(tail)] = torch.tensor(tail)
        mask[i, : len(tail)] = 1
        for a, b in it.targets():  # the shared prefix ends before the first target (see trainer.fit)
            labels[i, a - prefix_len: b - prefix_len] = ids[i, a - prefix_len: b - prefix_len]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(it.weight != 1.0 for it in items):
        batch["weights"] = torch.tensor([it.weight for it in items], dtype=torch.float32)  # (B,)
    if prefix_len:
        batch["prefix_ids"] = torch.tensor(items[0].ids[:prefix_len])
    return batch


def collate_packed(rows: list[list[Encoded]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows, several examples end to end in each: (B, T) input_ids, attention_mask (1 on real
    tokens, for token counts) and labels as in `collate`, plus position_ids (B, T) that restart at 0
    with every example and with the padding run at a row's end.

    The forward gets no 2D mask: transformers reads each restart as an example boundary and builds a
    block-diagonal causal mask (see `loss._hidden_states`), so no token sees another example. Packed
    rows hold whole sequences; they never share a prefix cache.
    """
    width = max(sum(len(e.ids) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)      # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)             # (B, T)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)   # (B, T)
    positions = torch.zeros((len(rows), width), dtype=torch.long)       # (B, T)
    for b, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.ids)
            ids[b, at:at + n] = torch.tensor(e.ids)
            mask[b, at:at + n] = 1
            positions[b, at:at + n] = torch.arange(n)
            for lo, hi in e.targets():
                # An example's first token is never a target: unpacked, nothing comes before it.
                labels[b, at + max(lo, 1):at + hi] = ids[b, at + max(lo, 1):at + hi]
            at += n
        positions[b, at:] = torch.arange(width - at)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": positions}
    if any(e.weight != 1.0 for row in rows for e in row):
        batch["weights"] = torch.tensor([row[0].weight for row in rows], dtype=torch.float32)  # (B,) one per row
    return batch


def epoch_batches(encoded: list[Encoded], cfg, epoch: int, row_tokens: int | None = None) -> list[list[list[int]]]:
    """One epoch's global batches as `batch_stream` collates them: batch -> rows -> example indices.

    By default each batch holds `cfg.batch_size` one-example rows (`length_grouped_batches`). With
    `cfg.batch_tokens` or `cfg.packing` the plan is `packing.budget_batches`; packing fills rows of
    `row_tokens` tokens (task.max_length), never more than the token budget.
    """
    lengths = [len(e.ids) for e in encoded]
    seed = cfg.seed + epoch
    if not _planned(cfg):
        return [[[i] for i in b] for b in length_grouped_batches(lengths, cfg.batch_size, seed, cfg.length_grouping)]
    if cfg.packing and row_tokens is None:
        raise ValueError("train.packing needs the row length (task.max_length)")
    capacity = min(row_tokens, cfg.batch_tokens or row_tokens) if cfg.packing else None
    return budget_batches(lengths, seed, cfg.length_grouping, cfg.batch_size, cfg.batch_tokens, capacity,
                          [e.weight for e in encoded])


def epoch_batch_counts(encoded: list[Encoded], cfg, world: int = 1, row_tokens: int | None = None) -> list[int] | None:
    """Global batches each epoch the run reaches takes across `world` ranks (the remainder dropped, as
    `batch_stream` does), for the step plan; None for the default row batches, whose count follows
    from the number of examples. Token budgets and packing vary it from epoch to epoch."""
    if not _planned(cfg):
        return None
    epochs = 1 if cfg.max_steps else math.ceil(cfg.epochs)
    return [_usable(len(epoch_batches(encoded, cfg, e, row_tokens)), world) for e in range(epochs)]


def _planned(cfg) -> bool:
    return bool(cfg.batch_tokens or cfg.packing)


def pad_multiple(cfg, dev: torch.device) -> int:
    """PAD_MULTIPLE for row batches on a CPU; 1 elsewhere: token-budget and packed batches stay exact,
    and on a GPU a batch without padding keeps no mask (attention's causal fast path)."""
    return PAD_MULTIPLE if dev.type == "cpu" and not _planned(cfg) else 1


def _usable(n_batches: int, world: int) -> int:
    """Every rank takes the same number of batches per epoch (the remainder is dropped)."""
    return n_batches - n_batches % world if n_batches >= world else n_batches


def batch_stream(encoded: list[Encoded], cfg, pad_id: int, prefix_len: int, rank: int = 0,
                 world: int = 1, skip: int = 0, row_tokens: int | None = None, multiple: int = 1):
    """Collated batches forever (`cfg` gives batch_size, batch_tokens, packing, seed and
    length_grouping): this rank's batches forever, one reshuffle per epoch seeded by the epoch, so a
    run is repeatable and a resumed run sees the same order. Global batch i goes to rank i % world;
    `skip` is the number of this rank's batches already consumed. Packed batches ignore `prefix_len`
    (their rows hold whole sequences); `row_tokens` is the packed row length (see `epoch_batches`) and
    caps row batches' width, which `multiple` rounds up (see `pad_multiple`)."""
    epoch, seen = 0, 0
    while True:
        order = epoch_batches(encoded, cfg, epoch, row_tokens)
        for rows in order[rank:_usable(len(order), world):world]:
            if seen >= skip:
                yield (collate_packed([[encoded[i] for i in row] for row in rows], pad_id) if cfg.packing
                       else collate([encoded[row[0]] for row in rows], pad_id, prefix_len, multiple,
                                    row_tokens - prefix_len if row_tokens else None))
            seen += 1
        epoch += 1
