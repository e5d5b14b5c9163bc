"""Full fine-tuning: every weight trains; the whole model is saved."""

from __future__ import annotations

from pathlib import Path


def apply(model, cfg):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save(model, model_dir: Path) -> None:
    model.save_pretrained(str(model_dir), safe_serialization=True)


def load(base_model, model_dir: Path):
    from tunesmith.models.load import load_model

    return load_model(model_dir)
