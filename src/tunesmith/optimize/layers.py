"""Structured pruning of whole decoder layers: which layers matter least, and removing them."""

from __future__ import annotations

import torch

from tunesmith.data.examples import Example
from tunesmith.tasks.classification import right_pad
from tunesmith.train.batching import encode_for_training


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.get_decoder().layers


def keep_count(model, share_removed: float) -> int:
    """How many layers stay when `share_removed` of them go (at least one goes, at least one stays)."""
    n = len(decoder_layers(model))
    return min(n - 1, max(1, n - max(1, round(n * share_removed))))


@torch.inference_mode()
def layer_influence(model, tokenizer, fmt, examples: list[Example]) -> list[float]:
    """1 - cosine(input, output) of each layer's hidden states, averaged over real tokens.

    A layer that barely turns its input (influence near 0) can go with the least harm
    ("block influence", as in ShortGPT).
    """
    seqs = [e.ids for e in encode_for_training(tokenizer, fmt, examples)]
    ids, mask = right_pad(seqs, tokenizer.pad_token_id)  # (B, T)
    states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states  # L+1 x (B, T, H)
    real = mask.bool()
    return [float(1 - torch.cosine_similarity(states[i][real], states[i + 1][real], dim=-1).mean())
            for i in range(len(states) - 1)]


def keep_layers(model, keep: list[int]):
    """Remove every decoder layer not in `keep` (in place) and fix the config and cache indices."""
    layers = decoder_layers(model)
    kept = torch.nn.ModuleList(layers[i] for i in sorted(keep))
    for new_index, layer in enumerate(kept):
        # The KV cache is indexed by layer_idx; it must follow the new numbering.
        layer.self_attn.layer_idx = new_index
    model.get_decoder().layers = kept
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in sorted(keep)]
    config.num_hidden_layers = len(kept)
    return model


def evenly_spaced(n: int, keep: int) -> list[int]:
    """`keep` of n layer indices spread evenly, always keeping the first and the last."""
    if keep == 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (keep - 1)) for i in range(keep)})
