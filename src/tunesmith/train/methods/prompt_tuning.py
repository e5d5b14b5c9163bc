"""Soft prompt tuning: a few learned input embeddings before the prompt; the model is frozen (PEFT)."""

from __future__ import annotations

from tunesmith.train.methods.peft_adapter import load, save  # noqa: F401


def apply(model, cfg):
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    # Starting from real token embeddings puts the soft prompt where the model expects inputs;
    # random vectors far from that region train much more slowly.
    init = PromptTuningInit.SAMPLE_VOCAB if cfg.prompt_tuning.init == "vocab" else PromptTuningInit.RANDOM
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.prompt_tuning.virtual_tokens,
                                prompt_tuning_init=init)
    return get_peft_model(model, config)
