"""Frozen weights in bf16 while training under bf16 autocast.

Under autocast every linear layer casts its fp32 weight to bf16 before the matmul, so storing the
frozen ones in bf16 changes no result: it only drops the fp32 copy (and autocast's cached bf16 copy)
of ~80% of a small model's parameters. The input embedding (tied to the LM head in many models) and
norms stay fp32 so the residual stream keeps its precision. After training the fp32 values are read
back from the checkpoint, so the returned model is exactly the model that was loaded plus what trained.

transformers maps a safetensors checkpoint into memory and uses it in place, so a cast alone frees
nothing: the fp32 file pages it read stay resident while any weight still points into the mapping
(SmolLM2-135M: 513 MB). The weights kept in fp32 therefore get memory of their own, which releases
the mapping: the fp32 copy of the cast weights is gone before training allocates anything.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.tasks.cache import unwrap


def compact_frozen(model) -> list[str]:
    """Cast frozen nn.Linear weights (not the tied embedding) to bf16; returns the module names cast."""
    lm = unwrap(model)
    embedding = lm.get_input_embeddings().weight
    cast = []
    for name, module in lm.named_modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, torch.nn.Linear) and weight is not None and not weight.requires_grad
                and weight is not embedding and weight.dtype == torch.float32):
            module.weight.data = weight.data.to(torch.bfloat16)
            cast.append(name)
    if cast:
        _own_memory(lm)
    return cast


def _own_memory(lm) -> None:
    """Copy the frozen fp32 parameters and the buffers into memory of their own, so no tensor points
    into the checkpoint's file mapping any more and the mapping (with every page read) is released.
    Trainable parameters are new tensors already; a tied weight is one Parameter, copied once."""
    for p in lm.parameters():  # each shared Parameter once
        if not p.requires_grad and p.dtype == torch.float32:
            p.data = p.data.clone()
    for module in lm.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = buffer.clone()


def restore_frozen(model, names: list[str], checkpoint: Path) -> None:
    """Put back the fp32 weights of modules `names` from the checkpoint's safetensors files."""
    if not names:
        return
    from safetensors import safe_open

    lm = unwrap(model)
    modules = dict(lm.named_modules())
    # Inside PEFT wrappers the original layer sits at <name>.base_layer; the checkpoint has <name>.
    wanted = {name.replace(".base_layer", "") + ".weight": name for name in names}
    for file in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in set(f.keys()) & set(wanted):
                module = modules[wanted.pop(key)]
                module.weight.data = f.get_tensor(key).to(module.weight.device, torch.float32)
    if wanted:
        raise RuntimeError(f"fp32 weights not found in {checkpoint}: {sorted(wanted)[:3]}")


def make_optimizer(params: list[torch.Tensor], cfg) -> torch.optim.Optimizer:
    """AdamW over `params` as `cfg.optimizer` (a TrainConfig) asks: torch's (fp32 state), or bitsandbytes'
    with 8-bit state ("adamw_8bit"; "paged_adamw_8bit" also pages that state out of GPU memory, and on
    a CPU bitsandbytes runs it unpaged)."""
    kwargs = {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError:
        from tunesmith.errors import InputError

        raise InputError(f"train.optimizer={cfg.optimizer} needs the bitsandbytes package", "train.optimizer",
                         "pip install bitsandbytes, or set train.optimizer to adamw") from None
    paged = cfg.optimizer == "paged_adamw_8bit"
    return (bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit)(params, **kwargs)
