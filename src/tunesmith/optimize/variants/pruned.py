"""pruned: unstructured magnitude pruning of the decoder's linear weights at `optimize.prune.sparsity`
(per layer, the smallest weights set to zero), then a short recovery fine-tune that keeps them zero.

Zeros do not make dense CPU matmuls faster; this variant shows what sparsity costs in quality, and a
sparse kernel or compressed storage can then use it. pruned_layers is the one that runs faster.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.optimize.engines import quantizable_linears, save_hf
from tunesmith.optimize.recover import short_finetune


def magnitude_masks(model, sparsity: float) -> dict[str, torch.Tensor]:
    """Per linear layer, a bool mask that is False on the `sparsity` share of smallest |w|."""
    masks = {}
    for name, layer in quantizable_linears(model).items():
        w = layer.weight.detach().abs().flatten()
        k = int(len(w) * sparsity)
        threshold = w.kthvalue(k).values if k > 0 else w.new_tensor(-1.0)
        masks[name] = layer.weight.detach().abs() > threshold
    return masks


def apply_masks(model, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, layer in quantizable_linears(model).items():
            layer.weight.mul_(masks[name])


def build(source, cfg, out_dir: Path) -> dict:
    settings = cfg.prune
    model = source.plain_copy()
    masks = magnitude_masks(model, settings.sparsity)
    apply_masks(model, masks)
    losses = short_finetune(model, source.tokenizer, source.fmt, source.splits.train, settings.recovery_steps,
                            settings.learning_rate, seed=source.project.train.seed,
                            after_step=lambda: apply_masks(model, masks), progress=source.bar("recover pruned"))
    zeros = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    save_hf(model, source.tokenizer, source.fmt, out_dir)
    return {"sparsity": round(zeros / total, 4), "recovery_steps": len(losses),
            "recovery_loss": round(losses[-1], 4) if losses else None}
