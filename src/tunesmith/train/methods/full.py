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
    import torch

    from tunesmith.errors import RunDirError
    from tunesmith.models.load import load_model

    model = load_model(model_dir)
    # Training stops at a non-finite loss before saving, so NaN weights mean a damaged file.
    bad = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise RunDirError(f"the model's weights hold NaN or infinite values (first in {bad})", str(model_dir),
                          "restore it from a copy, or train the run again")
    return model
