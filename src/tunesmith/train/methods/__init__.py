"""Fine-tuning methods by name. Each module exposes `KIND` ("adapter", "full" or
"prompt"), `apply(model, cfg) -> model`, `save(model, model_dir)`, `load(base_model, model_dir) -> model`,
and optionally `fit(...)` to replace the shared training loop; this table is kept import-light (no torch) so the
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
    "prompt_tuning": "tunesmith.train.methods.prompt_tuning",
    "prefix_tuning": "tunesmith.train.methods.prefix_tuning",
    "prompt_optimization": "tunesmith.train.methods.prompt_optimization",
}

# Learning rates that train each technique well on small instruct models; soft prompts and
# scaling vectors need far larger steps than weight updates, full fine-tuning far smaller.
DEFAULT_LR: dict[str, float] = {"lora": 2e-4, "dora": 2e-4, "ia3": 3e-3, "full": 2e-5, "prompt_tuning": 3e-2,
                                "prefix_tuning": 1e-2, "prompt_optimization": 1e-4}


def get_method(name: str) -> ModuleType:
    """Import the module implementing `name`."""
    return importlib.import_module(METHODS[name])
