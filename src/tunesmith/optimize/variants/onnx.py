"""onnx: the plain model exported to ONNX and run by ONNX Runtime in fp32 (see optimize/ort.py).

It must compute what the model computes: the largest logit difference on test prompts is checked
like a merge's (`optimize.parity`). Needs the `onnx` and `onnxruntime` packages and a decoder laid
out as embeddings, rotary embedding, layers and a final norm (measured on Llama-architecture models;
another architecture with this layout is offered only if the parity check passes).
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.optimize.predictor import save_common
from tunesmith.optimize.variants import NotApplicable


def build(source, cfg, out_dir: Path) -> dict:
    from tunesmith.optimize import ort

    if not ort.available():
        raise NotApplicable("ONNX Runtime is not installed (pip install onnx onnxruntime)")
    model = source.plain()
    exported(model, out_dir)
    save_common(source.tokenizer, source.fmt, out_dir, engine="onnx", quantization="none")
    diff = ort.max_logit_diff(model, out_dir, source.tokenizer, source.fmt, source.splits.test[: cfg.parity.samples])
    return {"scheme": "ONNX Runtime, fp32", "parity": "exact", "max_logit_diff": round(diff, 8)}


def exported(model, out_dir: Path) -> None:
    """ort.export, with an architecture it cannot lay out reported as NotApplicable."""
    from tunesmith.optimize import ort

    try:
        ort.export(model, out_dir)
    except ValueError as e:
        raise NotApplicable(f"cannot export this model to ONNX: {e}") from None
