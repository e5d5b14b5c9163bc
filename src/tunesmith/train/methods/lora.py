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

    try:
        return get_peft_model(model, config)
    except ValueError as e:
        if "not found in the base model" not in str(e) and type(e).__name__ != "NoMatchingPeftModuleError":
            raise
        raise ConfigError(f"names no layer of the model ({str(e)[:160]})", "train.lora.target_modules",
                          "name linear layers the model has (e.g. q_proj, v_proj), or use all-linear") from None
