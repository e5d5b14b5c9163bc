"""Shared save/load for methods that train a PEFT adapter."""

from __future__ import annotations

from pathlib import Path


def load(base_model, model_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(model_dir), is_trainable=False)


def save(model, model_dir: Path) -> None:
    model.save_pretrained(str(model_dir), safe_serialization=True)

