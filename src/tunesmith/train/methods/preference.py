"""Preference tuning (dpo, orpo, simpo, kto): trains what train.preference.adapter names (a LoRA/DoRA
adapter or every weight) with the preference loop of train/preference_fit.py."""

from __future__ import annotations

from pathlib import Path

from tunesmith.train.methods import get_method


def apply(model, cfg):
    return get_method(cfg.preference.adapter).apply(model, cfg)


def fit(model, tokenizer, fmt, train, val, cfg, metric, out_dir=None, progress=True, resume=False, on_validate=None):
    """Train on the preference rows behind `train` (see train/preference_fit.fit)."""
    from tunesmith.train.preference_fit import fit as fit_preference

    return fit_preference(model, tokenizer, fmt, train, val, cfg, metric, out_dir, progress, resume, on_validate)


def save(model, model_dir: Path) -> None:
    model.save_pretrained(str(model_dir), safe_serialization=True)


def load(base_model, model_dir: Path):
    # An adapter folder has adapter_config.json; full fine-tuning saved the whole model.
    kind = "lora" if (Path(model_dir) / "adapter_config.json").exists() else "full"
    return get_method(kind).load(base_model, model_dir)
