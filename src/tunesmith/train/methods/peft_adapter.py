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
    model = PeftModel.from_pretrained(base_model, str(folder), is_trainable=False)
    _check_loaded(model, folder / ADAPTER_FILES[1])
    return model


def _check_loaded(model, weights: Path) -> None:
    """PEFT loads the tensors whose names it knows and skips the rest without a word: a renamed or partial
    file would leave the adapter untrained (the base model scored as the fine-tuned one). Every tensor the
    adapter saves must be in the file, nothing else, and finite (NaN weights answer one label for all)."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        saved = set(f.keys())
    loaded = get_peft_model_state_dict(model)  # the names and tensors save_pretrained writes
    missing, unknown = sorted(loaded.keys() - saved), sorted(saved - loaded.keys())
    if missing or unknown:
        what = (f"{len(missing)} of the adapter's {len(loaded)} tensors are missing (first: {missing[0]})" if missing
                else f"it holds {len(unknown)} tensors the adapter has no place for (first: {unknown[0][:120]})")
        raise RunDirError(f"the adapter weights do not match adapter_config.json: {what}", str(weights),
                          "restore it from a copy, or train the run again")
    bad = next((name for name, t in loaded.items() if not torch.isfinite(t).all()), None)
    if bad is not None:
        raise RunDirError(f"the adapter weights hold NaN or infinite values (first in {bad})", str(weights),
                          "restore it from a copy, or train the run again")


def save(model, model_dir: Path) -> None:
    model.save_pretrained(str(model_dir), safe_serialization=True)

