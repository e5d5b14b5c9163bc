"""Fine-tuning methods by name: the facts about each (kind, default learning rate, ...) are in
tunesmith.registry.METHOD_SPECS; the module named there implements the `Method` protocol."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol, cast

from tunesmith.registry import METHOD_SPECS, METHODS, MethodSpec

__all__ = ["METHODS", "Method", "get_method", "spec"]


class Method(Protocol):
    """What a method module provides. It may also define `fit(...)` to replace the shared training
    loop (prompt optimisation searches instead of training)."""

    def apply(self, model: Any, cfg: Any) -> Any:
        """Wrap or prepare `model` for training under `cfg` (a TrainConfig); returns the model to train."""

    def save(self, model: Any, model_dir: Path) -> None:
        """Write what training changed into `model_dir` (safetensors only)."""

    def load(self, base_model: Any, model_dir: Path) -> Any:
        """Rebuild the fine-tuned model from `base_model` and a folder `save` wrote."""


def spec(name: str) -> MethodSpec:
    return METHOD_SPECS[name]


def get_method(name: str) -> Method:
    """Import the module implementing `name`."""
    module = METHOD_SPECS[name].module
    if module is None:
        raise KeyError(f"method '{name}' is estimated but not trainable")
    return cast(Method, importlib.import_module(module))
