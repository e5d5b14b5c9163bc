"""pruned_layers: structured pruning. The `optimize.prune.layers` share of decoder layers that turn
their input least (block influence on training prompts) is removed, then a short recovery fine-tune."""

from __future__ import annotations

from pathlib import Path

from tunesmith.optimize.engines import save_hf
from tunesmith.optimize.layers import keep_count, keep_layers, layer_influence
from tunesmith.optimize.recover import short_finetune


def build(source, cfg, out_dir: Path) -> dict:
    settings = cfg.prune
    model = source.plain_copy()
    influence = layer_influence(model, source.tokenizer, source.fmt, source.splits.train[:32])
    keep = sorted(sorted(range(len(influence)), key=lambda i: influence[i], reverse=True)[: keep_count(
        model, settings.layers)])
    removed = [i for i in range(len(influence)) if i not in keep]
    keep_layers(model, keep)
    losses = short_finetune(model, source.tokenizer, source.fmt, source.splits.train, settings.recovery_steps,
                            settings.learning_rate, seed=source.project.train.seed,
                            progress=source.bar("recover pruned_layers"))
    save_hf(model, source.tokenizer, source.fmt, out_dir)
    return {"removed_layers": removed, "layers": len(keep), "recovery_steps": len(losses),
            "influence": [round(x, 4) for x in influence]}
