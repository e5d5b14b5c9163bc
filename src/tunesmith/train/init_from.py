"""train.init_from: start training from a finished run's fine-tuned model instead of the project's model.

The earlier run's adapter is merged into its base and the result saved under the new run's model folder
(model/base), which becomes this run's base: the new adapter trains on top of it, `disable_adapter()`
gives it back (DPO's reference is then the SFT model, no second copy), the eval stage's baseline is it,
and the run folder stays self-contained (tunesmith.json records base/ relative to the model folder).
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.train.finetuned import INIT_BASE, load_finetuned


def merged_init(init_run: Path, model_dir: Path) -> Path:
    """Save `init_run`'s fine-tuned model, adapter merged, as full weights in model_dir/base; return that folder."""
    model, tokenizer, _, _ = load_finetuned(Path(init_run) / "model", need_base=False)
    # peft's merge adds each adapter's delta into the base weights it wraps; full models have nothing to merge.
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    target = Path(model_dir) / INIT_BASE
    merged.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))
    return target
