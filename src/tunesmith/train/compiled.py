"""`train.compile`: the decoder layers run through torch.compile while training.

One compiled function, the layer class's own forward compiled with dynamic shapes (batch widths
change from step to step), serves every layer: each passes itself as the first argument. The layers
keep their modules and parameters as they are: state dicts, checkpoints, saved adapters and deep
copies see the same model, and leaving the block puts the plain forward back, so evaluation and
serving run uncompiled.

Measured on the quickstart's shape (BENCHMARKS.md, "torch.compile of the decoder layers").
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from tunesmith.train.grad_checkpointing import decoder_layers


@contextmanager
def compiled(model, enabled: bool = True) -> Iterator[None]:
    """Within the block, `model`'s decoder layers run compiled (when `enabled`)."""
    layers = decoder_layers(model) if enabled else []
    forwards: dict[type, object] = {}
    for layer in layers:
        cls = type(layer)
        if cls not in forwards:
            forwards[cls] = torch.compile(cls.forward, dynamic=True)
        # A partial over the layer (not a bound method): a deep copy of the model calls its own layers.
        layer.forward = functools.partial(forwards[cls], layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
