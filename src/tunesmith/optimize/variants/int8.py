"""int8: the decoder's linear layers with int8 weights (one scale per output channel) and
activations quantized on the fly (torch dynamic quantization, int8 matmuls on x86 CPUs).

Activations are quantized per tensor, which language models' outlier channels make lossy; with
`optimize.int8.smooth` the outliers are first moved into the weights (SmoothQuant, see smooth.py),
calibrated on training rows. Smoothing must not change what the model computes: it is checked on
test prompts and dropped (noted) if the logits move.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.optimize.engines import quantizable_linears, save_int8
from tunesmith.optimize.parity import max_logit_diff

SMOOTH_TOLERANCE = 1e-2


def build(source, cfg, out_dir: Path) -> dict:
    model, notes = smoothed(source, cfg.int8)
    save_int8(model, source.tokenizer, source.fmt, out_dir)
    return {"quantized_layers": len(quantizable_linears(model)),
            "scheme": "int8 weights per output channel, dynamic int8 activations", **notes}


def smoothed(source, settings) -> tuple[object, dict]:
    """The plain model, SmoothQuant-smoothed when `settings.smooth` and the logits stay put; and notes."""
    model, notes = source.plain(), {"smoothquant": False}
    if settings.smooth:
        from tunesmith.optimize.smooth import smooth

        candidate = source.plain_copy()
        layers = smooth(candidate, source.tokenizer, source.fmt, source.splits.train[: settings.calibration_examples],
                        settings.alpha)
        drift = max_logit_diff(model, candidate, source.tokenizer, source.fmt, source.splits.test[:8])
        notes["smoothing_logit_diff"] = round(drift, 6)
        if drift <= SMOOTH_TOLERANCE:
            model, notes["smoothquant"] = candidate, {"alpha": settings.alpha, "layers": layers}
    return model, notes
