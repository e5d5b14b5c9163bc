"""LoRA: low-rank updates to the linear layers (PEFT)."""

from __future__ import annotations

from tunesmith.train.methods.peft_adapter import load, save  # noqa: F401


def peft_config(cfg, use_dora: bool = False):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, use_dora=use_dora, task_type="CAUSAL_LM")


def apply(model, cfg):
    return attach(model, peft_config(cfg))


def attach(model, config):
    """get_peft_model, with target modules that name no layer of the model as a ConfigError."""
    from peft import get_peft_model

    from tunesmith.errors import ConfigError

    widest = _widest_layer(model)
    if widest and config.r > widest:  # an update's rank cannot exceed it: only memory (and time) would grow
        raise ConfigError(f"{config.r} is larger than the widest layer it would adapt ({widest} features)",
                          "train.lora.r", f"use at most {widest}; LoRA commonly uses 8 to 64")
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        if "not found in the base model" not in str(e) and type(e).__name__ != "NoMatchingPeftModuleError":
            raise
        raise ConfigError(f"names no layer of the model ({str(e)[:160]})", "train.lora.target_modules",
                          "name linear layers the model has (e.g. q_proj, v_proj), or use all-linear") from None


def _widest_layer(model) -> int:
    """The largest in or out size of the model's linear layers, the LM head left out (LoRA leaves it)."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return max((max(m.in_features, m.out_features) for m in model.modules()
                if isinstance(m, torch.nn.Linear) and m is not head), default=0)
