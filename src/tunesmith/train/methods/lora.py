"""LoRA: low-rank updates to the linear layers (PEFT)."""

from __future__ import annotations

from tunesmith.train.methods.peft_adapter import load, save  # noqa: F401


def peft_config(cfg, use_dora: bool = False):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, use_dora=use_dora, task_type="CAUSAL_LM")


def apply(model, cfg):
    from peft import get_peft_model

    return get_peft_model(model, peft_config(cfg))
