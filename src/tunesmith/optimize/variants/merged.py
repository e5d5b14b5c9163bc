"""merged: the LoRA/DoRA/IA3 update folded into the base weights, one plain checkpoint.

The fold is checked here (largest logit difference on test prompts) and again by the stage
(predictions on the whole test split must agree with the adapter model's).
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.optimize.engines import save_hf
from tunesmith.optimize.parity import max_logit_diff
from tunesmith.optimize.variants import NotApplicable


def build(source, cfg, out_dir: Path) -> dict:
    if not source.is_mergeable_adapter:
        raise NotApplicable(f"a {source.project.train.method} run has no weight adapter to merge (its weights are "
                            "already plain, or what it trained is a soft prompt or a prompt)")
    merged = source.plain()
    diff = max_logit_diff(source.model, merged, source.tokenizer, source.fmt,
                          source.splits.test[: cfg.parity.samples])
    save_hf(merged, source.tokenizer, source.fmt, out_dir)
    return {"parity": "exact", "max_logit_diff": round(diff, 8)}
