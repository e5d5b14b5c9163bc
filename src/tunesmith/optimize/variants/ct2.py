"""ct2: the merged model converted to CTranslate2 with int8 weights (see optimize/ct2.py), after
the same SmoothQuant smoothing as the int8 variant when `optimize.int8.smooth` is on.
Needs the `ctranslate2` package and an architecture it converts (Llama, Mistral, Qwen, Gemma, ...)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tunesmith.optimize.predictor import save_common
from tunesmith.optimize.variants import NotApplicable


def build(source, cfg, out_dir: Path) -> dict:
    from tunesmith.optimize import ct2
    from tunesmith.optimize.variants.int8 import smoothed

    if not ct2.available():
        raise NotApplicable("CTranslate2 is not installed (pip install ctranslate2)")
    model, notes = smoothed(source, cfg.int8)
    with tempfile.TemporaryDirectory(prefix="tunesmith-ct2-") as staging:  # the converter reads a checkpoint
        model.save_pretrained(staging, safe_serialization=True)
        source.tokenizer.save_pretrained(staging)
        try:
            ct2.convert(Path(staging), out_dir)
        except ValueError as e:  # no converter for this architecture
            raise NotApplicable(f"CTranslate2 cannot convert this model: {e}") from None
    save_common(source.tokenizer, source.fmt, out_dir, engine="ct2", quantization="int8")
    return {"scheme": "CTranslate2 int8 weights and matmuls", **notes}
