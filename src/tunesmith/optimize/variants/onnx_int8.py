"""onnx_int8: the ONNX export quantized by ONNX Runtime (int8 weights per output channel, activations
quantized per call), after the same SmoothQuant smoothing as the int8 variant when
`optimize.int8.smooth` is on: per-tensor activation scales need the outlier channels moved first.
The MLP output projections stay fp32 (see ort.FLOAT_MATMULS)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tunesmith.optimize.predictor import save_common
from tunesmith.optimize.variants import NotApplicable
from tunesmith.optimize.variants.onnx import exported


def build(source, cfg, out_dir: Path) -> dict:
    from tunesmith.optimize import ort
    from tunesmith.optimize.variants.int8 import smoothed

    if not ort.available():
        raise NotApplicable("ONNX Runtime is not installed (pip install onnx onnxruntime)")
    model, notes = smoothed(source, cfg.int8)
    with tempfile.TemporaryDirectory(prefix="tunesmith-onnx-") as tmp:  # the fp32 export, quantized from
        exported(model, Path(tmp))
        kept = ort.quantize(Path(tmp) / ort.GRAPH, out_dir / ort.GRAPH)
        shutil.copy(Path(tmp) / ort.HEAD, out_dir / ort.HEAD)
    save_common(source.tokenizer, source.fmt, out_dir, engine="onnx", quantization="int8")
    return {"scheme": "ONNX Runtime dynamic int8 (int8 weight matmuls, uint8 activations per call)",
            "float_matmuls": len(kept), **notes}
