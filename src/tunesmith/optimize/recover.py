"""A short fine-tune after pruning or for distillation: the one small loop both share, taking the
trainer's own optimisation step (train.trainer.train_step)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from tunesmith import hardware
from tunesmith.config import TrainConfig
from tunesmith.data.examples import Example
from tunesmith.train.batching import batch_stream, encode_for_training
from tunesmith.train.trainer import train_step

MAX_GRAD_NORM = 1.0


def short_finetune(model, tokenizer, fmt, train: list[Example], steps: int, learning_rate: float,
                   batch_size: int = 8, seed: int = 0, loss_fn: Callable | None = None,
                   after_step: Callable[[], None] | None = None, progress: str | None = None) -> list[float]:
    """Train every parameter of `model` for `steps` steps of AdamW on the answer tokens.

    Args:
        loss_fn: `loss_fn(model, batch) -> scalar`; default the supervised cross-entropy.
        after_step: called after each optimiser step (e.g. to re-apply a pruning mask).
        progress: label of a progress bar, or None.

    Returns:
        The loss of each step.
    """
    encoded = encode_for_training(tokenizer, fmt, train)
    # Only the batching settings matter here; the rest of the config keeps its validated defaults.
    order = TrainConfig.model_validate({"batch_size": batch_size, "seed": seed, "length_grouping": 32})
    batches = batch_stream(encoded, order, tokenizer.pad_token_id, 0)
    params = list(model.parameters())
    for p in params:  # a merged PEFT model comes back with its base weights frozen
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    dev = next(model.parameters()).device
    bf16 = hardware.use_bf16("auto", dev)
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc=progress, unit="step", disable=progress is None, dynamic_ncols=True):
        done = train_step(model, batches, optimizer, params=params, dev=dev, loss_fn=loss_fn, bf16=bf16,
                          max_grad_norm=MAX_GRAD_NORM)
        if after_step:
            after_step()
        losses.append(done.loss)
    model.eval()
    return losses
