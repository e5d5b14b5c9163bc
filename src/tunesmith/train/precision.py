"""Frozen weights in bf16 while training under bf16 autocast.

Under autocast every linear layer casts its fp32 weight to bf16 before the matmul, so storing the
frozen ones in bf16 changes no result: it only drops the fp32 copy (and autocast's cached bf16 copy)
of ~80% of a small model's parameters. The input embedding (tied to the LM head in many models) and
norms stay fp32 so the residual stream keeps its precision. After training the fp32 values are read
back from the checkpoint, so the returned model is exactly the model that was loaded plus what trained.
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
    return cast


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
