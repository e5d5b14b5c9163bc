"""Atomic training checkpoints for resume: trainable weights, optimiser, schedule, RNG, loop state.

Weights go to safetensors; optimiser and scheduler state (plain tensors and numbers) go through
torch.save and come back with `weights_only=True`, which refuses arbitrary pickled objects.
Each checkpoint is written to a hidden temporary folder and renamed into place, so a kill at any
moment leaves either the previous complete checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunesmith import fsio

_NAME = re.compile(r"^step-(\d+)$")


def save_checkpoint(folder: Path, step: int, model, optimizer, schedule, loop: dict, watch_state: dict,
                    best_state: dict | None, keep: int) -> Path:
    """Write checkpoints/step-N atomically and keep only the newest `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:07d}"
    tmp = folder / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    trainable = {k: p.detach().contiguous().cpu() for k, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    if best_state:
        save_file({k: v.contiguous().cpu() for k, v in best_state.items()}, str(tmp / "best.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    fsio.write_json(tmp / "state.json", {"step": step, "loop": loop, "watch": watch_state})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, model, optimizer, schedule) -> tuple[dict, dict | None]:
    """Restore weights, optimiser, schedule and RNG in place; returns (state.json, best weights or None)."""
    dev = next(model.parameters()).device
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(str(path / "trainable.safetensors")).items():
            params[name].copy_(value.to(dev))
    extra = torch.load(path / "optimizer.pt", map_location=dev, weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    schedule.load_state_dict(extra["schedule"])
    torch.set_rng_state(extra["rng"].cpu())
    best = path / "best.safetensors"
    best_state = {k: v.to(dev) for k, v in load_file(str(best)).items()} if best.exists() else None
    return fsio.read_json(path / "state.json"), best_state
