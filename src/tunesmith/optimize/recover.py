"""A short fine-tune after pruning or for distillation: the one small loop both share."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

from tunesmith import hardware
from tunesmith.data.examples import Example
from tunesmith.train.batching import batch_stream, encode_for_training
from tunesmith.train.loss import supervised_loss


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
    loss_fn = loss_fn or (lambda m, b: supervised_loss(m, b)[0])
    encoded = encode_for_training(tokenizer, fmt, train)
    batches = batch_stream(encoded, SimpleNamespace(batch_size=batch_size, seed=seed, length_grouping=32),
                           tokenizer.pad_token_id, 0)
    params = list(model.parameters())
    for p in params:  # a merged PEFT model comes back with its base weights frozen
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    dev = next(model.parameters()).device
    bf16 = hardware.use_bf16("auto", dev)
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc=progress, unit="step", disable=progress is None, dynamic_ncols=True):
        batch = {k: v.to(dev) for k, v in next(batches).items()}
        with hardware.autocast(bf16, dev):
            loss = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step:
            after_step()
        losses.append(float(loss))
    model.eval()
    return losses
