"""Variant folders and how to load them. Each folder holds `variant.json`, whose `engine` says how:

- `run-model`: the run's own model folder (adapter or full weights), loaded as the eval stage does;
  the folder has no variant.json (it is the fp32 reference).
- `hf`: a plain Hugging Face checkpoint (safetensors) with `dtype` float32 or bfloat16.
- `hf-int8`: a Hugging Face config plus the decoder's linear weights as int8 with one scale per
  output channel; rebuilt into torch dynamic-quantized linear layers (int8 matmuls on CPU), or with
  `activations: none` into weight-only int8 layers (int8 weights, bf16/fp32 activations).
- `hf-int4`: the same with int4 weights in groups of `group_size` inputs (two per byte), rebuilt into
  weight-only int4 layers (torch's CPU int4-weight matmul).
- `minilm`: an all-MiniLM-L6-v2 encoder with a linear head over the labels (classification only).
- `ct2`: a CTranslate2 model (int8), run by CTranslate2's own runtime (see ct2.py).
- `onnx`: an ONNX graph of the decoder plus the LM head, run by ONNX Runtime, fp32 or int8 (see ort.py).

Tokenizer files and `prompt.json` sit next to the weights, so a variant folder is self-contained.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith import fsio, hardware
from tunesmith.data.examples import Example
from tunesmith.errors import ModelError, RunDirError
from tunesmith.optimize.predictor import VARIANT_FILE, Predictor, save_common
from tunesmith.tasks.predict import Predictions, predict
from tunesmith.tasks.prompts import PromptFormat, read_prompt_format


def load_variant(path: Path, max_new_tokens: int = 64) -> Predictor:
    """Load a variant folder (or a run's `model/` folder) for inference."""
    path = Path(path)
    if not (path / VARIANT_FILE).is_file():
        if (path / "tunesmith.json").is_file():
            from tunesmith.train.finetuned import load_finetuned

            model, tokenizer, fmt, _ = load_finetuned(path, need_base=False)
            return lm_predictor(model, tokenizer, fmt, max_new_tokens)
        raise RunDirError(f"not a variant folder (no {VARIANT_FILE})", str(path), "run `tunesmith optimize RUN_DIR`")
    meta = fsio.read_json(path / VARIANT_FILE)
    if meta["engine"] == "minilm":
        from tunesmith.optimize.minilm import load_classifier

        return load_classifier(path)
    if meta["engine"] == "ct2":
        from tunesmith.optimize.ct2 import load_ct2

        return load_ct2(path, max_new_tokens)
    if meta["engine"] == "onnx":
        from tunesmith.optimize.ort import load_ort

        return load_ort(path, max_new_tokens)
    from tunesmith.models.load import load_model, load_tokenizer

    fmt = read_prompt_format(path / "prompt.json")
    if meta["engine"] in ("hf-int8", "hf-int4"):
        model = load_int8(path)
    else:
        model = load_model(path, dtype=getattr(torch, meta.get("dtype", "float32")))
    return lm_predictor(model, load_tokenizer(path), fmt, max_new_tokens)


def lm_predictor(model, tokenizer, fmt: PromptFormat, max_new_tokens: int) -> Predictor:
    model.eval()

    def run(examples: list[Example], batch_size: int) -> Predictions:
        return predict(model, tokenizer, fmt, examples, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return Predictor(run, model, fmt, tokenizer)


def save_hf(model, tokenizer, fmt: PromptFormat, out_dir: Path, **meta) -> None:
    """A plain checkpoint in its own dtype, with tokenizer, prompt format and variant.json."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    save_common(tokenizer, fmt, out_dir, engine="hf", dtype=str(next(model.parameters()).dtype).split(".")[-1],
                **meta)


# -- int8 ----------------------------------------------------------------------------------------
def quantizable_linears(model) -> dict[str, torch.nn.Linear]:
    """The decoder's linear layers; the LM head stays fp32 (it is tied to the embeddings)."""
    decoder = model.get_decoder()
    prefix = next(name for name, m in model.named_modules() if m is decoder)
    return {f"{prefix}.{name}": m for name, m in decoder.named_modules() if type(m) is torch.nn.Linear}


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 (O, I), float32 scales (O,)), weight ~ int8 * scale."""
    scale = weight.detach().abs().amax(dim=1).clamp(min=1e-12) / 127.0   # (O,)
    q = torch.round(weight.detach() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.float()


class Int8Linear(torch.nn.Module):
    """A linear layer with int8 weights whose input is quantized to 8 bits per call (torch's
    quantized dynamic linear kernel). Full 8-bit activations where the CPU sums int8 products in
    32 bits (AVX-512 VNNI, AVX-VNNI, AMX); 7 bits elsewhere, where 8 could saturate the 16-bit sums
    of plain AVX2 kernels (torch's own DynamicQuantizedLinear always uses 7)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(len(scale), dtype=torch.long),
                                                           0)
        self.packed = torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float())
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.reduce_range = not hardware.int8_full_range()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, reduce_range=self.reduce_range).to(x.dtype)


def dynamic_linear(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Module:
    """An int8 linear layer (int8 weights, activations quantized per call)."""
    return Int8Linear(q, scale, bias)


class WeightOnlyInt8Linear(torch.nn.Module):
    """Int8 weights (one scale per output channel) multiplied with unquantized activations, in bf16
    where the CPU or GPU has it (torch's int8-weight matmul kernel): the weights take a quarter of
    fp32's memory traffic, the activations keep their precision (no outlier problem to smooth)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        # aligned: a safetensors view may not be
        self.register_buffer("q", q.clone(memory_format=torch.contiguous_format))
        self.register_buffer("scale", scale.to(dtype))
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.in_features, self.out_features, self.dtype = q.shape[1], q.shape[0], dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., I) -> (..., O)
        flat = x.reshape(-1, self.in_features).to(self.dtype)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.q, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class WeightOnlyInt4Linear(torch.nn.Module):
    """Int4 weights in groups along the input (a scale and a zero point per group and output
    channel) multiplied with bf16/fp32 activations by torch's CPU int4-weight matmul kernel: an
    eighth of fp32's weight traffic, at the cost of a coarser weight grid."""

    def __init__(self, q: torch.Tensor, scale_zeros: torch.Tensor, group: int, bias: torch.Tensor | None,
                 dtype: torch.dtype, delta: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zeros", scale_zeros.to(dtype).contiguous())
        # The fine-tuned change to the weight, (O, k) @ (k, I), kept in float: an int4 step is far
        # coarser than what a LoRA update adds, so rounding the merged weight would erase it.
        self.delta = None if delta is None else tuple(torch.nn.Parameter(t.to(dtype), requires_grad=False)
                                                      for t in delta)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.in_features, self.out_features, self.group, self.dtype = q.shape[1], q.shape[0], group, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., I) -> (..., O)
        flat = x.reshape(-1, self.in_features).to(self.dtype)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scale_zeros)
        if self.delta is not None:
            up, down = self.delta
            out = out + (flat @ down.T) @ up.T                                # (M, k) -> (M, O)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group` inputs: (uint8 (O, I) in 0..15, float32 (I/group, O, 2)
    scale and zero), weight ~ (q - 8) * scale + zero (the kernel's convention)."""
    out_f, in_f = weight.shape
    w = weight.detach().float().reshape(out_f, in_f // group, group)         # (O, G, g)
    low, high = w.amin(-1), w.amax(-1)                                      # (O, G)
    scale = (high - low).clamp(min=1e-8) / 15
    q = ((w - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8).reshape(out_f, in_f)
    return q, torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous()


def low_rank(delta: torch.Tensor, max_rank: int = 64) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up (O, k), down (k, I), relative error) with up @ down ~ delta: its numerical rank, at most
    `max_rank` (a LoRA update of rank r comes back exactly at k <= r)."""
    u, s, vh = torch.linalg.svd(delta.detach().float(), full_matrices=False)
    k = max(1, min(max_rank, int((s > s[0] * 1e-5).sum())))
    up, down = u[:, :k] * s[:k], vh[:k]
    error = float((up @ down - delta).norm() / delta.norm().clamp(min=1e-12))
    return up.contiguous(), down.contiguous(), error


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(O, I) values 0..15 -> (O, I/2) bytes, two per byte (the file holds half a byte per weight)."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def save_int8(model, tokenizer, fmt: PromptFormat, out_dir: Path, bits: int = 8, group_size: int = 32,
              base_weights: dict[str, torch.Tensor] | None = None, **meta) -> None:
    """Config, fp32 non-linear weights and quantized linear weights + scales in one safetensors file:
    int8 per output channel, or (bits=4) int4 per group of `group_size` inputs, nibbles packed; a
    layer whose input size the group does not divide stays fp32. With `base_weights` (int4: the
    weights before fine-tuning, by layer name) the base is quantized and the change kept low-rank
    in fp32 (`.delta_up`, `.delta_down`)."""
    from safetensors.torch import save_file

    linears = quantizable_linears(model)
    if bits == 4:
        linears = {n: m for n, m in linears.items() if m.in_features % group_size == 0}
        meta["group_size"] = group_size
    tensors = {}
    for name, layer in linears.items():
        if bits == 4:
            base = (base_weights or {}).get(name, layer.weight)
            q, scale = quantize_int4(base, group_size)
            tensors[f"{name}.weight_int4"], tensors[f"{name}.weight_scale"] = pack_nibbles(q), scale
            if base is not layer.weight:
                up, down, error = low_rank(layer.weight.detach() - base.detach())
                tensors[f"{name}.delta_up"], tensors[f"{name}.delta_down"] = up, down
                meta["delta_error"] = max(meta.get("delta_error", 0.0), round(error, 8))
        else:
            tensors[f"{name}.weight_int8"], tensors[f"{name}.weight_scale"] = quantize_weight(layer.weight)
    skip = {f"{name}.weight" for name in linears}
    if model.config.tie_word_embeddings:
        skip.add("lm_head.weight")
    for key, value in model.state_dict().items():
        if key not in skip:
            tensors[key] = value.detach().contiguous().clone()
    save_file(tensors, str(out_dir / "model.safetensors"))
    model.config.save_pretrained(str(out_dir))
    save_common(tokenizer, fmt, out_dir, engine=f"hf-int{bits}", quantized=sorted(linears), **meta)


QUANTIZED_SUFFIXES = (".weight_int8", ".weight_int4", ".weight_scale", ".delta_up", ".delta_down")


def load_int8(path: Path):
    """An `hf-int8` or `hf-int4` folder as a transformers model with quantized linear layers."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    tensors = load_file(str(path / "model.safetensors"))
    meta = fsio.read_json(path / VARIANT_FILE)
    quantized = meta["quantized"]
    plain = {k: v for k, v in tensors.items() if not k.endswith(QUANTIZED_SUFFIXES)}
    result = model.load_state_dict(plain, strict=False)
    expected_missing = {f"{name}.weight" for name in quantized} | {"lm_head.weight"}
    if set(result.missing_keys) - expected_missing or result.unexpected_keys:
        raise ModelError(f"quantized variant weights do not match its config in {path}", "variant.json",
                         "rebuild the variant with `tunesmith optimize`")
    model.tie_weights()
    compute = torch.bfloat16 if hardware.bf16_supported(torch.device("cpu")) else torch.float32
    for name in quantized:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _quantized_layer(meta, tensors, name, getattr(parent, child).bias, compute))
    return model.eval()


def _quantized_layer(meta: dict, tensors: dict, name: str, bias, compute: torch.dtype) -> torch.nn.Module:
    scale = tensors[f"{name}.weight_scale"]
    if meta["engine"] == "hf-int4":
        q = unpack_nibbles(tensors[f"{name}.weight_int4"])
        delta = (tensors[f"{name}.delta_up"], tensors[f"{name}.delta_down"]) if f"{name}.delta_up" in tensors else None
        return WeightOnlyInt4Linear(q, scale, meta["group_size"], bias, compute, delta)
    q = tensors[f"{name}.weight_int8"]
    if meta.get("activations", "dynamic") == "dynamic":
        return dynamic_linear(q, scale, bias)
    return WeightOnlyInt8Linear(q, scale, bias, compute)
