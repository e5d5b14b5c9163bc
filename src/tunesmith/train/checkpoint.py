"""Atomic training checkpoints for resume: trainable weights, optimiser, schedule, RNG, loop state.

Weights go to safetensors; optimiser and scheduler state and the RNG state go to a safetensors file and
a JSON file beside it (train/tensor_tree.py): nothing in a checkpoint is unpickled.
Each checkpoint is written to a hidden temporary folder and renamed into place, so a kill at any
moment leaves either the previous complete checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunesmith import fsio
from tunesmith.runs import CHECKPOINT_NAME, checkpoint_name
from tunesmith.train import distributed, fsdp
from tunesmith.train.tensor_tree import load_tree, save_tree


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
        name = f"optimizer-rank{rank}" if sharded else "optimizer"
        save_tree({"optimizer": fsdp.local_optimizer_state(optimizer), "schedule": schedule.state_dict(),
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


def _state_problem(state: dict, step: int) -> str | None:
    """Why a checkpoint's state.json is not one tunesmith wrote at `step` (its folder's name), or None: an
    edited step resumed 30 real steps as 1,000 and published a run that said so."""
    loop, watch = state.get("loop"), state.get("watch")
    if not isinstance(loop, dict) or not isinstance(watch, dict):
        return "'loop' and 'watch' must be objects"

    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if loop.get("step") != step or not count(loop.get("step")) or state.get("step") != step:
        return f"its step is {str(loop.get('step'))[:20]}, its folder's {step}"
    losses = loop.get("losses")
    if not (count(loop.get("tokens")) and number(loop.get("train_seconds")) and isinstance(losses, list)
            and len(losses) == step and all(number(x) for x in losses)):
        return "'loop' needs tokens, train_seconds and one finite loss per step"
    best = watch.get("best")
    if not (isinstance(watch.get("history"), list) and isinstance(watch.get("flags"), list)
            and count(watch.get("evals_without_gain")) and (best is None or isinstance(best, dict))):
        return "'watch' needs history, best, evals_without_gain and flags"
    return None


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
    if why := _state_problem(state, int(CHECKPOINT_NAME.match(path.name).group(1))):
        from tunesmith.errors import RunDirError

        raise RunDirError(f"not what tunesmith wrote ({why})", str(path / "state.json"),
                          "delete this checkpoint folder to resume from the one before it")
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
    name = f"optimizer-rank{distributed.rank()}" if sharded else "optimizer"
    if (path / f"{name}.pt").is_file() and not (path / f"{name}.json").is_file():
        from tunesmith.errors import RunDirError

        raise RunDirError(f"the checkpoint was written by an earlier tunesmith ({name}.pt, a pickle, which is no "
                          "longer read)", str(path), "train the run again, without --resume")
    extra = load_tree(path / name, dev)
    fsdp.load_local_optimizer_state(optimizer, extra["optimizer"])
    schedule.load_state_dict(extra["schedule"])
    torch.set_rng_state(extra["rng"].cpu())
    best = path / "best.safetensors"
    best_state = ({k: fsdp.like(params[k], v) for k, v in load_file(str(best)).items()}
                  if best.exists() else None)
    return state, best_state
