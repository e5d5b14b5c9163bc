"""Shared-prefix KV caches, and small adapters over the transformers cache API (renamed in 5.x).

Every prompt of a task starts with the same system text (instruction and label list). Its keys
and values are computed once and shared by a whole batch, in training (gradients flow back
through the shared copy) and in scoring; the maths is the same as a full forward per row.

Prompt-learning methods fit the same mould: a soft prompt is a run of learned input embeddings
and prefix tuning a run of learned keys/values, both placed before the shared text, so the
shared prefix is simply (virtual tokens + system text) and everything after it is unchanged.
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
    return {_cache_kwarg(type(unwrap(module)).forward): cache}


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


def full_cache():
    """An empty DynamicCache that keeps every position of every layer.

    A model left to build its own cache follows its config, where sliding-window layers (Mistral,
    Gemma 2 and 3) keep only the last window of keys. tunesmith reads positions off the cached tensors
    and reuses them for later tokens, so it needs them all; the attention masks still apply the window.
    """
    from transformers import DynamicCache

    return DynamicCache()


def unwrap(model):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def prompt_learning_type(model) -> str | None:
    """"PROMPT_TUNING" or "PREFIX_TUNING" for a PEFT prompt-learning model, else None."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return None
    return str(getattr(config.peft_type, "value", config.peft_type))


def prefix_tensors(model, prefix: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per-layer keys/values (1, H_kv, L, D) of the model's virtual tokens followed by `prefix` (P,).

    Args:
        model: a causal LM, plain or PEFT-wrapped (LoRA-style or prompt learning).
        prefix: shared prompt token ids, or None when prompts share nothing.

    Returns:
        The tensors, or None when there is nothing to share. L (see `cache_len`) counts the
        virtual tokens too; positions after the prefix continue from L.
    """
    kind = prompt_learning_type(model)
    if kind is None and (prefix is None or len(prefix) == 0):
        return None
    decoder = unwrap(model).get_decoder()
    ids = prefix[None] if prefix is not None and len(prefix) else None  # (1, P)
    if kind == "PROMPT_TUNING":
        embeds = model.get_prompt(1)  # (1, V, H) learned input embeddings
        if ids is not None:
            text = decoder.get_input_embeddings()(ids)  # (1, P, H)
            embeds = torch.cat([embeds.to(text.dtype), text], dim=1)
        out = decoder(inputs_embeds=embeds, use_cache=True, **cache_kwargs(decoder, full_cache()))
        return cache_tensors(output_cache(out))
    if kind == "PREFIX_TUNING":
        virtual = model.get_prompt(1)  # a cache of learned keys/values
        if ids is None:
            return cache_tensors(virtual)
        n_virtual = cache_len(cache_tensors(virtual))
        mask = torch.ones((1, n_virtual + ids.shape[1]), dtype=torch.long, device=ids.device)
        positions = torch.arange(n_virtual, n_virtual + ids.shape[1], device=ids.device)[None]
        out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                      **cache_kwargs(decoder, virtual))
        return cache_tensors(output_cache(out))
    return cache_tensors(output_cache(decoder(input_ids=ids, use_cache=True, **cache_kwargs(decoder, full_cache()))))


def cache_len(tensors: list[tuple[torch.Tensor, torch.Tensor]] | None) -> int:
    """Number of cached positions (0 for None)."""
    return 0 if tensors is None else tensors[0][0].shape[2]


def continue_after(prefix_len: int, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask (B, P+S) and positions (B, S) for padded rows (B, S) that follow a shared prefix."""
    ones = torch.ones((mask.shape[0], prefix_len), dtype=mask.dtype, device=mask.device)
    positions = prefix_len + (mask.cumsum(-1) - 1).clamp(min=0)
    return torch.cat([ones, mask], dim=1), positions
