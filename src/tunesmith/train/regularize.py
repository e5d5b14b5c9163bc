"""Regularisers that act on the model rather than the loss: dropout and NEFTune noise."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from tunesmith.tasks.cache import unwrap


def set_dropout(model, p: float | None) -> int:
    """Set the base model's attention and hidden dropout to `p` (None keeps the model's own).

    LoRA's own dropout is `lora.dropout` and is left alone. Returns the number of places changed.
    """
    if p is None:
        return 0
    changed = 0
    for name, module in unwrap(model).named_modules():
        if "lora_dropout" in name:
            continue
        if isinstance(module, torch.nn.Dropout):
            module.p = p
            changed += 1
        elif isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p
            changed += 1
    return changed


def shares_prefix(cfg) -> bool:
    """Whether training batches may compute the prompt start all their rows share once (tasks/cache.py)
    for `cfg` (a TrainConfig): not with NEFTune, whose noise is scaled by the length of the batch's rows
    (as HF's and TRL's) and drawn for each row's own tokens; a shared prefix forward would scale it by the
    prefix's length and draw one noise for every row."""
    return not cfg.neftune_alpha


@contextmanager
def neftune(model, alpha: float | None):
    """NEFTune: uniform noise on the input embeddings while training (Jain et al., 2023).

    The noise scale alpha / sqrt(L * d) follows the paper, L the sequence length of the
    forward and d the embedding width; nothing is added in eval mode.
    """
    if not alpha:
        yield
        return
    embeddings = unwrap(model).get_input_embeddings()

    def add_noise(module, args, output):
        if not module.training:
            return output
        scale = alpha / (output.shape[-2] * output.shape[-1]) ** 0.5
        return output + torch.empty_like(output).uniform_(-scale, scale)

    handle = embeddings.register_forward_hook(add_noise)
    try:
        yield
    finally:
        handle.remove()
