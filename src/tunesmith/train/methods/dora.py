"""DoRA: LoRA with the weight's magnitude and direction learned separately (PEFT use_dora)."""

from __future__ import annotations

from tunesmith.train.methods.lora import attach, peft_config
from tunesmith.train.methods.peft_adapter import load, save  # noqa: F401


def apply(model, cfg):
    return attach(model, peft_config(cfg, use_dora=True))
