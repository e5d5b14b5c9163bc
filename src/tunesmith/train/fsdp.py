"""Fully sharded data parallelism (FSDP2) for models too large to train whole on each GPU.

With `train.fsdp: true` under torchrun / accelerate launch, every decoder layer is sharded with
`torch.distributed.fsdp.fully_shard`: each rank keeps 1/world of the layer's parameters, gradients
and optimiser state, and gathers a layer's full weights only while it runs. The embeddings, final
norm and LM head stay replicated (the loss calls them directly, outside any wrapped forward) and
their gradients go through distributed.average_gradients like plain data parallelism.

Training happens on a sharded copy; at the end its trained weights are gathered back into the
unsharded model, which is what the rest of the pipeline (saving, evaluation) uses on rank 0.
Checkpoints hold full (gathered) weights, written by rank 0, plus one optimiser shard per rank, so
a sharded run resumes with the same number of processes.
"""

from __future__ import annotations

import copy

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from tunesmith.config import TrainConfig
from tunesmith.tasks.cache import unwrap
from tunesmith.train import distributed


def enabled(cfg: TrainConfig) -> bool:
    """Sharding applies only when asked for and launched with more than one process."""
    return cfg.fsdp and distributed.active()


def sharded_copy(model, dev: torch.device):
    """A copy of `model` (method already applied) with each decoder layer sharded across ranks."""
    mesh = init_device_mesh(dev.type, (distributed.world_size(),))
    twin = copy.deepcopy(model)
    for layer in unwrap(twin).get_decoder().layers:
        fully_shard(layer, mesh=mesh, )
    return twin.to(dev)


def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor; for a shard this is a collective every rank must call."""
    return t.full_tensor() if is_sharded(t) else t


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor) laid out like `param`: sharded the same way when param is sharded."""
    value = value.to(param.device)
    if is_sharded(param) and not is_sharded(value):
        return distribute_tensor(value, param.device_mesh, param.placements)
    return value


@torch.no_grad()
def gather_into(target, sharded) -> None:
    """Copy the trainable weights of the sharded copy into the unsharded `target` (collective)."""
    params = dict(target.named_parameters())
    for name, p in sharded.named_parameters():
        if p.requires_grad:
            params[name].copy_(full(p).to(params[name].device))


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser state with each shard's tensors as plain local tensors (loadable weights_only)."""
    state = optimizer.state_dict()
    state["state"] = {k: {n: v.to_local() if is_sharded(v) else v for n, v in s.items()}
                      for k, s in state["state"].items()}
    return state


def load_local_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of local_optimizer_state: local tensors become shards of their parameter again."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_sharded(p):
                continue
            slots = optimizer.state.get(p, {})
            for name, v in slots.items():
                if torch.is_tensor(v) and not is_sharded(v) and v.shape == p.to_local().shape and v.dim() > 0:
                    slots[name] = DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                                                     shape=p.shape, stride=p.stride())
