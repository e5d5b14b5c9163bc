"""Optimisation variants by name (the table is tunesmith.registry.VARIANTS). Each module implements
the `VariantBuilder` protocol: `build(source, cfg, out_dir) -> dict` writes a loadable variant folder
(see engines.py) and returns notes for variants.json, raising `NotApplicable` when the run cannot have
that variant.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol, cast

from tunesmith.registry import DEFAULT_VARIANTS, VARIANTS

__all__ = ["DEFAULT_VARIANTS", "VARIANTS", "NotApplicable", "VariantBuilder", "get_variant"]


class NotApplicable(Exception):
    """This run cannot have this variant (e.g. no adapter to merge); the reason is reported."""


class VariantBuilder(Protocol):
    def build(self, source: Any, cfg: Any, out_dir: Path) -> dict:
        """Write the variant into `out_dir` from `source` (the fine-tuned run) under `cfg` (OptimizeConfig)."""


def get_variant(name: str) -> VariantBuilder:
    """Import the module building variant `name`."""
    return cast(VariantBuilder, importlib.import_module(VARIANTS[name]))
