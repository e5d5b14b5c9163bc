"""Gradient (activation) checkpointing of the decoder layers: `train.gradient_checkpointing`.

With it on, each decoder layer runs under torch.utils.checkpoint (non-reentrant): the layer's
intermediate activations are dropped after the forward and recomputed, layer by layer, during the
backward, so activation memory falls from every layer's intermediates to each layer's input, for a
second forward pass (more compute; not measured here). Loss and gradients are unchanged (dropout replays
with the same random state).

transformers' own switch (`gradient_checkpointing_enable`) is not used: under it a layer drops the
KV cache it is given (`cache=None`), and tunesmith's training forward passes one: the shared prompt
prefix and the virtual tokens of prompt/prefix tuning ride in a cache (see train/loss.py,
tasks/cache.py), so those runs would attend to the wrong keys. Here the layer keeps its cache; the
replay in backward runs on a scratch copy of the layer's cache entry as it was before the forward, so
it appends the same keys/values once, reproduces the forward exactly and leaves the real cache as
the forward left it. Non-reentrant checkpointing
also needs no `enable_input_require_grads` for PEFT models: gradients reach adapters inside the
layer whether or not the layer's input requires grad.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

from tunesmith import hardware
from tunesmith.config import TrainConfig
from tunesmith.models import estimate
from tunesmith.registry import METHOD_SPECS
from tunesmith.tasks.cache import unwrap

_NO_RESTORE = object()  # a cache without per-layer entries to copy: such a call runs without checkpointing


def wanted(cfg: TrainConfig, model, row_lengths: list[int], device_mb: float | None = None) -> bool:
    """`train.gradient_checkpointing` resolved for a run: true/false as set; "auto": on only when the
    memory estimate (models/estimate.py) says training would not fit this device's memory without it.

    Args:
        model: the model about to train (method applied).
        row_lengths: token lengths of the training rows; the longest sets the activation peak.
        device_mb: the device's memory in MiB (default: measured, estimate.device_memory_mb).
    """
    if cfg.gradient_checkpointing != "auto":
        return bool(cfg.gradient_checkpointing)
    if device_mb is None:
        device_mb = estimate.device_memory_mb(hardware.device())
    bf16 = hardware.use_bf16(cfg.precision, hardware.device())
    # A preference method trains what train.preference.adapter names (LoRA, DoRA or every weight): priced
    # as that method, plus DPO/KTO's reference copy where no adapter can be switched off for it.
    spec = METHOD_SPECS[cfg.method]
    method = cfg.preference.adapter if spec.preference else cfg.method
    copy_held = spec.reference and METHOD_SPECS[method].kind == "full"
    return not fits_without(model, method, cfg.batch_size, max(row_lengths, default=0), device_mb, bf16, copy_held)


def fits_without(model, method: str, batch: int, row_tokens: int, device_mb: float, bf16: bool = False,
                 reference_copy: bool = False) -> bool:
    """Whether training `model` with `method` on batches of `batch` rows of `row_tokens` tokens fits
    `device_mb` MiB by the estimate, keeping every layer's activations (`bf16`: under bf16 autocast;
    `reference_copy`: a frozen copy of the model is held beside it)."""
    if METHOD_SPECS[method].trained_share is None:  # trains nothing (prompt search): no activations kept
        return True
    config = unwrap(model).config.get_text_config()
    params_m = hardware.parameter_counts(model)[1] / 1e6
    need = estimate.memory_mb(params_m, config.num_hidden_layers, config.hidden_size, method, batch, row_tokens, bf16,
                              reference_copy)
    return estimate.fits(need, device_mb)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder's layer stack (the modules whose activations checkpointing drops)."""
    layers = getattr(unwrap(model).get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        from tunesmith.errors import ConfigError

        raise ConfigError(f"{type(unwrap(model)).__name__} has no decoder layer list to checkpoint",
                          "train.gradient_checkpointing", "set it to false")
    return list(layers)


@contextmanager
def checkpointed(model, enabled: bool = True) -> Iterator[None]:
    """Within the block, `model`'s decoder layers recompute their activations in backward (when
    `enabled`); outside it, and always in eval mode or without gradients, they run as before."""
    layers = decoder_layers(model) if enabled else []
    for i, layer in enumerate(layers):
        # A partial over the layer itself (not its bound method), so a deep copy of the model keeps
        # calling its own layers.
        layer.forward = functools.partial(_forward, layer, getattr(getattr(layer, "self_attn", None), "layer_idx", i))
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _forward(layer: torch.nn.Module, cache_index: int, *args, **kwargs):
    """`layer`'s forward under non-reentrant checkpointing; the replay in backward writes into a scratch
    copy of the KV cache as it was before the forward, never into the real one."""
    forward = type(layer).forward
    key = next((k for k in ("cache", "past_key_values") if kwargs.get(k) is not None), None)
    before = _entry_state(kwargs[key], cache_index) if key else None
    if not (layer.training and torch.is_grad_enabled()) or before is _NO_RESTORE:
        return forward(layer, *args, **kwargs)
    replaying = False

    def run(*inputs):
        nonlocal replaying
        if not replaying:  # the forward itself, on the real cache
            replaying = True
            return forward(layer, *inputs, **kwargs)
        # The replay appends this layer's keys/values to the entry as it was, so it sees the same
        # keys as the forward and leaves the caller's cache as the forward left it.
        scratch = {key: _scratch(kwargs[key], cache_index, before)} if key else {}
        return forward(layer, *inputs, **{**kwargs, **scratch})
    return checkpoint(run, *args, use_reentrant=False)


def _entry_state(cache, index: int):
    """(number of cache entries, a shallow copy of entry `index`'s state or None where it is still to
    be created); _NO_RESTORE for a cache without per-layer entries."""
    entries = getattr(cache, "layers", None)
    if not isinstance(entries, list):
        return _NO_RESTORE
    return len(entries), (dict(vars(entries[index])) if index < len(entries) else None)


def _scratch(cache, index: int, before: tuple[int, dict | None]):
    """A shallow copy of `cache` whose entry `index` is in the state `before` recorded."""
    count, state = before
    scratch = copy.copy(cache)
    scratch.layers = list(cache.layers[:count])  # a lazily grown cache appends entry `index` again
    if state is not None:
        entry = object.__new__(type(cache.layers[index]))
        vars(entry).update(state)
        scratch.layers[index] = entry
    return scratch
