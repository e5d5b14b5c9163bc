"""The training loss, computed once here: cross-entropy over supervised tokens only.

The LM head runs on the supervised positions alone; a (B, T, V) logits tensor over a 49k
vocabulary would cost more than the rest of a small model's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.tasks.cache import broadcast, cache_kwargs, continue_after, prefix_tensors
from tunesmith.train.batching import IGNORE


def unwrap(model):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supervised_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean token cross-entropy over positions whose label is not IGNORE.

    Returns:
        (loss, number of supervised tokens). The mean is over tokens, not examples, so long
        answers weigh by their length, as in standard causal-LM training.
    """
    lm = unwrap(model)
    decoder = lm.get_decoder()
    hidden = _hidden_states(decoder, batch)     # (B, T, H)
    targets = batch["labels"][:, 1:]            # (B, T-1): token t+1 is predicted at t
    selected = targets != IGNORE                # (B, T-1)
    h = hidden[:, :-1][selected]                # (N, H)
    logits = lm.get_output_embeddings()(h)      # (N, V)
    n = int(selected.sum())
    loss = F.cross_entropy(logits.float(), targets[selected], reduction="sum") / max(n, 1)
    return loss, n


def _hidden_states(decoder, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states (B, T, H) of the batch rows, after the shared prefix when there is one."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    prefix = batch.get("prefix_ids")
    if prefix is None:
        return decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    # Every supervised token lies after the prefix, so the prefix needs no hidden states of its own.
    cache = broadcast(prefix_tensors(decoder, prefix), ids.shape[0])
    full_mask, positions = continue_after(len(prefix), mask)
    return decoder(input_ids=ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
                   **cache_kwargs(decoder, cache)).last_hidden_state
