"""Optimisation variants by name. Each module exposes `build(source, cfg, out_dir) -> dict` that
writes a loadable variant folder (see engines.py) and returns notes for variants.json, raising
`NotApplicable` when the run cannot have that variant. The table stays import-light (no torch) so
the config can validate `optimize.variants` cheaply.
"""

from __future__ import annotations

import importlib
from types import ModuleType

VARIANTS: dict[str, str] = {
    "merged": "tunesmith.optimize.variants.merged",
    "int8": "tunesmith.optimize.variants.int8",
    "int8_weights": "tunesmith.optimize.variants.int8_weights",
    "int4_weights": "tunesmith.optimize.variants.int4_weights",
    "bf16": "tunesmith.optimize.variants.bf16",
    "pruned": "tunesmith.optimize.variants.pruned",
    "pruned_layers": "tunesmith.optimize.variants.pruned_layers",
    "distilled": "tunesmith.optimize.variants.distilled",
    "distilled_minilm": "tunesmith.optimize.variants.distilled_minilm",
    "ct2": "tunesmith.optimize.variants.ct2",
    "onnx": "tunesmith.optimize.variants.onnx",
    "onnx_int8": "tunesmith.optimize.variants.onnx_int8",
}

# What `tunesmith optimize` builds when the config names nothing: every variant that needs no
# training (seconds to build); the pruned and distilled ones train for a while and are opt-in.
DEFAULT_VARIANTS = ["merged", "int8", "bf16"]


class NotApplicable(Exception):
    """This run cannot have this variant (e.g. no adapter to merge); the reason is reported."""


def get_variant(name: str) -> ModuleType:
    """Import the module building variant `name`."""
    return importlib.import_module(VARIANTS[name])
