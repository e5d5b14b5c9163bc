"""Fine-tuning methods by name. Each module exposes `apply(model, cfg) -> model` and
`load(base_model, model_dir) -> model`; this table is kept import-light (no torch) so the
config can validate `train.method` cheaply.
"""

from __future__ import annotations

import importlib
from types import ModuleType

METHODS: dict[str, str] = {
    "lora": "tunesmith.train.methods.lora",
    "dora": "tunesmith.train.methods.dora",
    "ia3": "tunesmith.train.methods.ia3",
    "full": "tunesmith.train.methods.full",
}


def get_method(name: str) -> ModuleType:
    """Import the module implementing `name`."""
    return importlib.import_module(METHODS[name])
