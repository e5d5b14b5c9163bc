"""int4_weights: weight-only int4 for the decoder's linear layers, a scale and a zero point per group
of `optimize.int4.group_size` inputs (round to nearest); activations unquantized (bf16 where the
machine has it). About an eighth of the fp32 weights' size and traffic.

For an adapter run the base weights are quantized and the adapter's change is kept in fp32 at low
rank next to them (exact for LoRA): an int4 step is coarser than a fine-tuning update, and rounding
the merged weights was measured to erase the fine-tune (quickstart: 0.94 -> 0.34 accuracy).
"""

from __future__ import annotations

from pathlib import Path

from tunesmith import fsio
from tunesmith.optimize.engines import quantizable_linears, save_int8


def build(source, cfg, out_dir: Path) -> dict:
    model = source.plain()
    bases = base_weights(source, quantizable_linears(model)) if source.is_mergeable_adapter else None
    save_int8(model, source.tokenizer, source.fmt, out_dir, bits=4, group_size=cfg.int4.group_size, base_weights=bases)
    meta = fsio.read_json(out_dir / "variant.json")
    notes = {"quantized_layers": len(meta["quantized"]), "adapter_kept": bool(bases),
             "scheme": f"int4 weights, groups of {cfg.int4.group_size} inputs, activations unquantized"
                       + (", adapter change in fp32 at low rank" if bases else "")}
    if "delta_error" in meta:
        notes["delta_error"] = meta["delta_error"]
    return notes


def base_weights(source, linears: dict) -> dict:
    """The pre-fine-tuning weight of each adapted layer, by its name in the plain model."""
    wrapped = source.model.get_base_model()
    out = {}
    for name in linears:
        module = wrapped.get_submodule(name)
        if hasattr(module, "base_layer"):
            out[name] = module.base_layer.weight
    return out
