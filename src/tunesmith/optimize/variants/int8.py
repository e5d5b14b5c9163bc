"""int8: the decoder's linear layers with int8 weights (one scale per output channel) and
activations quantized on the fly (torch dynamic quantization, int8 matmuls on x86 CPUs)."""

from __future__ import annotations

from pathlib import Path

from tunesmith.optimize.engines import quantizable_linears, save_int8


def build(source, cfg, out_dir: Path) -> dict:
    model = source.plain()
    save_int8(model, source.tokenizer, source.fmt, out_dir)
    return {"quantized_layers": len(quantizable_linears(model)),
            "scheme": "int8 weights per output channel, dynamic int8 activations"}
