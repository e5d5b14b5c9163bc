"""Shared-prefix KV caches, and small adapters over the transformers cache API (renamed in 5.x).

Every prompt of a task starts with the same system text (instruction and label list). Its keys
and values are computed once and shared by a whole batch, in training (gradients flow back
through the shared copy) and in scoring; the maths is the same as a full forward per row.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch


def common_prefix_len(seqs: list[list[int]]) -> int:
    """Length of the longest common prefix, leaving every sequence at least one token of its own."""
    if not seqs:
        return 0
    limit = min(len(s) for s in seqs) - 1
    first = seqs[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in seqs):
        n += 1
    return n


@lru_cache(maxsize=None)
def _cache_kwarg(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_kwargs(module, cache) -> dict:
    """`{name: cache}` with the keyword this module's forward takes."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return {_cache_kwarg(type(base).forward): cache}


def output_cache(out):
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values), each (B, H_kv, T, D)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def select_rows(tensors: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor):
    """A fresh DynamicCache holding batch rows `rows` of `tensors` (rows may repeat)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k.index_select(0, rows), v.index_select(0, rows)) for k, v in tensors])


def broadcast(tensors: list[tuple[torch.Tensor, torch.Tensor]], rows: int):
    """A DynamicCache showing a one-row cache to `rows` rows (views; autograd sums the gradients)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in tensors])


def prefix_tensors(module, prefix: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys/values of a (P,) prefix through `module` (a causal LM or its decoder)."""
    out = module(input_ids=prefix[None], use_cache=True, **_keep_one(module))
    return cache_tensors(output_cache(out))


def continue_after(prefix_len: int, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask (B, P+S) and positions (B, S) for padded rows (B, S) that follow a shared prefix."""
    ones = torch.ones((mask.shape[0], prefix_len), dtype=mask.dtype, device=mask.device)
    positions = prefix_len + (mask.cumsum(-1) - 1).clamp(min=0)
    return torch.cat([ones, mask], dim=1), positions


def _keep_one(module) -> dict:
    # Causal LMs accept logits_to_keep (skip the LM head on prefix positions); decoders have no head.
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(type(base).forward).parameters else {}
