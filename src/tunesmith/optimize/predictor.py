"""What every engine shares: the loaded-variant interface (`Predictor`), the name of a variant
folder's description file and the files every causal-LM variant folder holds.

It imports no engine: engines.py dispatches to ct2.py, minilm.py and ort.py, which all build
`Predictor`s, so these pieces live below all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith import fsio
from tunesmith.data.examples import Example
from tunesmith.tasks.predict import Predictions
from tunesmith.tasks.prompts import PromptFormat

VARIANT_FILE = "variant.json"


@dataclass
class Predictor:
    """A loaded variant: `predict(examples, batch_size)` and the module behind it."""

    predict: Callable[[list[Example], int], Predictions]
    module: torch.nn.Module | None  # the torch model; None when another runtime computes (ct2)
    fmt: PromptFormat | None = None
    tokenizer: object = None     # for causal LMs (generation, streaming); None for the MiniLM classifier
    # Greedy continuations (token ids) of token-id prompts with per-prompt limits, for engines
    # without a torch module; torch models generate through `module.generate`.
    complete: Callable[[list[list[int]], list[int]], list[list[int]]] | None = None


def save_common(tokenizer, fmt: PromptFormat, out_dir: Path, **meta) -> None:
    """Write the tokenizer, `prompt.json` and `variant.json` (`meta`) into a variant folder."""
    tokenizer.save_pretrained(str(out_dir))
    fsio.write_json(out_dir / "prompt.json", fmt.to_json())
    fsio.write_json(out_dir / VARIANT_FILE, meta)
