"""A checkpoint loaded with its linear layers quantized by bitsandbytes (QLoRA's frozen base).

`train.quantize: nf4` stores each decoder linear weight in 4 bits (NF4, one scale per 64 weights),
`int8` in 8 bits (LLM.int8()); the LM head, embeddings and norms stay in full precision. LoRA/DoRA
adapters train beside the quantized layers, so the saved adapter is the same kind of file as a plain
LoRA run's and loads on the full-precision base.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.errors import InputError, ModelError

QUANTIZE_KINDS = ("nf4", "int8")


def load_quantized(path: Path, kind: str, dev: torch.device, compute_bf16: bool):
    """The causal LM at `path` with its decoder's linear layers quantized (`kind`: nf4 or int8), on `dev`.

    compute_bf16: 4-bit layers dequantize to bf16 for their matmuls (else fp32).
    """
    from transformers import AutoModelForCausalLM

    from tunesmith import hardware

    hardware.native_gqa(dev)  # as models.load.load_model does
    config = _bnb_config(kind, torch.bfloat16 if compute_bf16 else torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=config, dtype=torch.float32,
                                                     device_map=_device_map(dev), trust_remote_code=False,
                                                     use_safetensors=True)
    except Exception as e:
        raise ModelError(f"cannot load {path} quantized to {kind}: {e}", "train.quantize",
                         "set train.quantize to none to train on the full-precision base") from None
    _no_cpu_repacking(model)
    return model.eval()


def _bnb_config(kind: str, compute_dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise InputError("train.quantize needs the bitsandbytes package", "train.quantize",
                         "pip install bitsandbytes, or set train.quantize to none") from None
    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise InputError(f"unknown quantization '{kind}'", "train.quantize", f"use one of: {', '.join(QUANTIZE_KINDS)}")


def _device_map(dev: torch.device) -> dict:
    # One device for the whole model: "" maps the root module.
    return {"": dev.index if dev.type == "cuda" and dev.index is not None else dev.type}


def _no_cpu_repacking(model) -> None:
    """Keep 4-bit weights in the layout training uses. On CPUs with AVX-512 BF16, bitsandbytes repacks a
    4-bit weight in place the first time it runs without gradients (validation), into a layout its
    training matmul then cannot read back, and the repacking fails on rows shorter than one block."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def quantized_layers(model) -> int:
    """How many linear layers of `model` hold bitsandbytes-quantized weights."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    return sum(isinstance(m, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt) for m in model.modules())
