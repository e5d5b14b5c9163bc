"""Perplexity of the gold answers: exp of the mean token cross-entropy over answer tokens only,
the same loss (one function, train.loss.supervised_loss) that training minimises."""

from __future__ import annotations

import math

import torch

from tunesmith import hardware
from tunesmith.data.examples import Example
from tunesmith.tasks.prompts import PromptFormat, answer_only
from tunesmith.train.batching import collate, encode_for_training
from tunesmith.train.loss import supervised_loss


@torch.inference_mode()
def answer_perplexity(model, tokenizer, fmt: PromptFormat, examples: list[Example], batch_size: int = 8,
                      bf16: bool = False) -> float:
    """Token-weighted perplexity of each example's target given its prompt (earlier turns are prompt)."""
    encoded = encode_for_training(tokenizer, answer_only(fmt), examples)
    dev = next(model.parameters()).device
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            batch = {k: v.to(dev)
                     for k, v in collate(encoded[start:start + batch_size], tokenizer.pad_token_id).items()}
            with hardware.autocast(bf16, dev):
                loss, n = supervised_loss(model, batch)
            total += float(loss) * n
            tokens += n
    finally:
        model.train(was_training)
    return round(math.exp(total / tokens), 4) if tokens else float("nan")
