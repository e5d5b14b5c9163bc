"""Atomic training checkpoints for resume: trainable weights, optimiser, schedule, RNG, loop state.

Weights go to safetensors; optimiser and scheduler state (plain tensors and numbers) go through
torch.save and come back with `weights_only=True`, which refuses arbitrary pickled objects.
Each checkpoint is written to a hidden temporary folder and renamed into place, so a kill at any
moment leaves either the previous complete checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunesmith import fsio
from tunesmith.runs import CHECKPOINT_NAME, checkpoint_name
from tunesmith.train import distributed, fsdp


def save_checkpoint(folder: Path, step: int, model, optimizer, schedule, loop: dict, watch_state: dict,
                    best_state: dict | None, keep: int) -> Path:
    """Write checkpoints/step-N atomically and keep only the newest `keep`.

    Called on every rank: sharded (FSDP) weights are gathered first and each rank writes its own
    optimiser shard; rank 0 writes everything else and moves the folder into place.
    """
    rank, world = distributed.rank(), distributed.world_size()
    final = folder / checkpoint_name(step)
    tmp = folder / f".{checkpoint_name(step)}.tmp"
    trainable = {k: fsdp.full(p).detach().contiguous().cpu() for k, p in model.named_parameters() if p.requires_grad}
    best = {k: fsdp.full(v).contiguous().cpu() for k, v in (best_state or {}).items()}
    sharded = any(fsdp.is_sharded(p) for p in model.parameters())
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    distributed.barrier()
    if sharded or rank == 0:
        # Under FSDP each rank's optimiser state covers only its shards.
        name = f"optimizer-rank{rank}.pt" if sharded else "optimizer.pt"
        torch.save({"optimizer": fsdp.local_optimizer_state(optimizer), "schedule": schedule.state_dict(),
                    "rng": torch.get_rng_state()}, tmp / name)
    distributed.barrier()
    if rank == 0:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        if best:
            save_file(best, str(tmp / "best.safetensors"))
        fsio.write_json(tmp / "state.json", {"step": step, "loop": loop, "watch": watch_state,
                                             "world_size": world, "sharded": sharded})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, model, optimizer, schedule) -> tuple[dict, dict | None]:
    """Restore weights, optimiser, schedule and RNG in place; returns (state.json, best weights or None).

    Raises:
        RunDirError: a file of the checkpoint is missing, truncated or edited (named, with how to resume
            from the checkpoint before it).
    """
    from safetensors import SafetensorError

    from tunesmith.errors import RunDirError

    try:
        return _load(path, model, optimizer, schedule)
    except (OSError, EOFError, KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as e:
        if isinstance(e, (RunDirError, fsio.DamagedFile, torch.OutOfMemoryError)):  # named already, or no damage
            raise
        raise RunDirError(f"the checkpoint cannot be read ({type(e).__name__}: {str(e)[:160]})", str(path),
                          "delete this checkpoint folder to resume from the one before it (if every checkpoint "
                          "fails alike, they do not fit this model: was it changed since they were written?)") from e


def _load(path: Path, model, optimizer, schedule) -> tuple[dict, dict | None]:
    state = fsio.read_json(path / "state.json", dict)
    params = dict(model.named_parameters())
    sharded = any(fsdp.is_sharded(p) for p in params.values())
    if state.get("sharded", False) and (not sharded or state["world_size"] != distributed.world_size()):
        from tunesmith.errors import RunDirError

        raise RunDirError(f"checkpoint was written by {state['world_size']} sharded (train.fsdp) processes",
                          str(path),
                          f"resume with torchrun --nproc_per_node {state['world_size']} and train.fsdp: true")
    dev = next(model.parameters()).device
    with torch.no_grad():
        for name, value in load_file(str(path / "trainable.safetensors")).items():
            params[name].copy_(fsdp.like(params[name], value))
    name = f"optimizer-rank{distributed.rank()}.pt" if sharded else "optimizer.pt"
    extra = torch.load(path / name, map_location=dev, weights_only=True)
    fsdp.load_local_optimizer_state(optimizer, extra["optimizer"])
    schedule.load_state_dict(extra["schedule"])
    torch.set_rng_state(extra["rng"].cpu())
    best = path / "best.safetensors"
    best_state = ({k: fsdp.like(params[k], v) for k, v in load_file(str(best)).items()}
                  if best.exists() else None)
    return state, best_state
