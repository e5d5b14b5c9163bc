"""Data parallelism under torchrun / accelerate launch: rank, world size and gradient averaging.

Each rank takes every world-th batch of the same global order (see batching.batch_stream) and
gradients are averaged across ranks after backward, before clipping and the optimiser step, so
N ranks with grad_accum=a compute what one process computes with grad_accum=N*a. Averaging is
an explicit all-reduce of one flat buffer rather than a DDP wrapper, because the loss reaches
into the decoder directly (label-only LM head, shared prefix) rather than through forward().
Rank 0 alone writes logs, checkpoints and the run directory.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def launched() -> bool:
    """True under a multi-process launcher (torchrun / accelerate launch)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> bool:
    """Join the process group when launched by torchrun/accelerate (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def average_gradients(params: list[torch.Tensor]) -> None:
    """Mean of each parameter's gradient over ranks (missing grads count as zero).

    Sharded (FSDP) parameters are skipped: their gradients were already averaged by the
    reduce-scatter that produced each rank's shard.
    """
    params = [p for p in params if not isinstance(p, DTensor)]
    if not active() or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Scale gradients so their global L2 norm is at most max_norm; returns the norm before.

    With sharded parameters each rank holds a slice of some gradients: their squared norms are
    summed across ranks, while replicated gradients (identical on every rank) count once.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    local = [g.to_local() for g in grads if isinstance(g, DTensor)]
    replicated = [g for g in grads if not isinstance(g, DTensor)]
    sharded_sq = sum((x.float().pow(2).sum() for x in local), torch.zeros((), device=local[0].device))
    dist.all_reduce(sharded_sq)
    total_sq = sharded_sq + sum((g.float().pow(2).sum() for g in replicated), torch.zeros_like(sharded_sq))
    norm = float(total_sq.sqrt())
    scale = max_norm / (norm + 1e-6)
    if scale < 1.0:
        for g in grads:
            g.mul_(scale)
    return norm


def mean_scalar(value: float) -> float:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def sum_int(value: int) -> int:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t)
    return int(t.item())


def _comm_device() -> torch.device:
    """NCCL reduces only CUDA tensors; gloo reduces CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if active():
        dist.barrier()
