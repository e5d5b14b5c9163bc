"""bf16: every weight in bfloat16, half the size; fast where the CPU has AVX-512 BF16 or AMX, or on GPUs."""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.optimize.engines import save_hf


def build(source, cfg, out_dir: Path) -> dict:
    save_hf(source.plain_copy().to(torch.bfloat16), source.tokenizer, source.fmt, out_dir)
    return {}
