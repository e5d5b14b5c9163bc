"""Prefix tuning: learned keys/values before the prompt in every layer; the model is frozen (PEFT)."""

from __future__ import annotations

from tunesmith.train.methods.peft_adapter import load, save  # noqa: F401


def apply(model, cfg):
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.prefix_tuning.virtual_tokens,
                                prefix_projection=cfg.prefix_tuning.projection)
    return get_peft_model(model, config)
