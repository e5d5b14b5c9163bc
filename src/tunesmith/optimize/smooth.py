"""SmoothQuant (Xiao et al., 2023) for Llama-style decoder layers, before int8 quantization.

Language models have a few activation channels with huge values; quantizing activations per tensor
to 8 bits then rounds everything else to zero. Smoothing divides each input channel j of a linear
layer by s_j and multiplies the weight's column j by s_j (the same function), with
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), which moves the outliers into weights that are
quantized per output channel anyway. The division is folded into the op before the layer: the
RMSNorm gain for q/k/v and gate/up, the rows of up_proj for down_proj. o_proj is left as is.
"""

from __future__ import annotations

import torch

from tunesmith.data.examples import Example
from tunesmith.tasks.classification import right_pad
from tunesmith.train.batching import encode_for_training


@torch.inference_mode()
def input_absmax(model, tokenizer, fmt, examples: list[Example], names: list[str], batch_size: int = 8) -> dict:
    """{linear name: (in_features,) max |input| over the examples' real tokens}."""
    stats: dict[str, torch.Tensor] = {}
    hooks = []
    mask_holder: dict = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().float()                           # (B, T, in)
            m = mask_holder["mask"].bool()                          # (B, T)
            peak = x[m].abs().amax(dim=0)                           # (in,)
            stats[name] = torch.maximum(stats[name], peak) if name in stats else peak
        return record
    for name in names:
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
    try:
        seqs = [e.ids for e in encode_for_training(tokenizer, fmt, examples)]
        for start in range(0, len(seqs), batch_size):
            ids, mask = right_pad(seqs[start:start + batch_size], tokenizer.pad_token_id)  # (B, T)
            mask_holder["mask"] = mask
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return stats


def smooth(model, tokenizer, fmt, examples: list[Example], alpha: float = 0.5) -> int:
    """Smooth every decoder layer in place; returns the number of layers smoothed."""
    layers = model.get_decoder().layers
    prefix = next(n for n, m in model.named_modules() if m is layers)
    names = []
    for i, _ in enumerate(layers):
        names += [f"{prefix}.{i}.self_attn.q_proj", f"{prefix}.{i}.mlp.gate_proj", f"{prefix}.{i}.mlp.down_proj"]
    peaks = input_absmax(model, tokenizer, fmt, examples, names)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            _fold(peaks[f"{prefix}.{i}.self_attn.q_proj"], [attn.q_proj, attn.k_proj, attn.v_proj], alpha,
                  lambda s, norm=layer.input_layernorm: norm.weight.div_(s))
            _fold(peaks[f"{prefix}.{i}.mlp.gate_proj"], [mlp.gate_proj, mlp.up_proj], alpha,
                  lambda s, norm=layer.post_attention_layernorm: norm.weight.div_(s))
            _fold(peaks[f"{prefix}.{i}.mlp.down_proj"], [mlp.down_proj], alpha,
                  lambda s, up=mlp.up_proj: _scale_rows(up, s))
    return len(layers)


def _fold(act_peak: torch.Tensor, linears: list[torch.nn.Linear], alpha: float, divide_input) -> None:
    w_peak = torch.stack([lin.weight.abs().amax(dim=0) for lin in linears]).amax(dim=0)   # (in,)
    s = (act_peak.clamp(min=1e-5) ** alpha / w_peak.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)  # (in,)
    divide_input(s.to(linears[0].weight.dtype))
    for lin in linears:
        lin.weight.mul_(s[None, :])


def _scale_rows(linear: torch.nn.Linear, s: torch.Tensor) -> None:
    linear.weight.div_(s[:, None])
    if linear.bias is not None:
        linear.bias.div_(s)
