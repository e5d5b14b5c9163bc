"""IA3: learned scaling vectors on attention keys/values and the MLP (PEFT)."""

from __future__ import annotations

from tunesmith.train.methods.peft_adapter import load, save  # noqa: F401


def apply(model, cfg):
    from peft import IA3Config, get_peft_model

    # PEFT knows the right key/value/feed-forward modules for common architectures.
    return get_peft_model(model, IA3Config(task_type="CAUSAL_LM"))
