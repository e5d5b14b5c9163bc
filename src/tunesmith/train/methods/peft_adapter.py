"""Shared save/load for methods that train a PEFT adapter."""

from __future__ import annotations

from pathlib import Path

from tunesmith.errors import RunDirError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def load(base_model, model_dir: Path):
    """The adapter in `model_dir` on `base_model`. Only a folder holding both adapter files is passed to
    PEFT: given a folder without them, PEFT takes the path for a hub repository id and goes online."""
    from peft import PeftModel

    folder = Path(model_dir).absolute()
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        raise RunDirError(f"the adapter folder lacks {', '.join(missing)}", str(folder),
                          "restore it from a copy, or train the run again")
    return PeftModel.from_pretrained(base_model, str(folder), is_trainable=False)


def save(model, model_dir: Path) -> None:
    model.save_pretrained(str(model_dir), safe_serialization=True)

