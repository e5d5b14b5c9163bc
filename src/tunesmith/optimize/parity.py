"""Parity of two models on the same prompts: the largest next-token logit difference."""

from __future__ import annotations

import torch

from tunesmith.data.examples import Example
from tunesmith.models.tokens import left_pad
from tunesmith.tasks.predict import encode_prompts
from tunesmith.tasks.prompts import PromptFormat


@torch.inference_mode()
def prompt_logits(model, tokenizer, fmt: PromptFormat, examples: list[Example], batch_size: int = 8) -> torch.Tensor:
    """(N, V) float32 logits of the first answer token after each example's prompt."""
    prompts = encode_prompts(tokenizer, fmt, examples)
    dev = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start:start + batch_size], tokenizer.pad_token_id)  # (B, T)
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), logits_to_keep=1).logits  # (B, 1, V)
        out.append(logits[:, -1].float().cpu())
    return torch.cat(out)


def max_logit_diff(a, b, tokenizer, fmt: PromptFormat, examples: list[Example]) -> float:
    """max |logit_a - logit_b| over the vocabulary and the examples' prompts."""
    if not examples:
        return 0.0
    return float((prompt_logits(a, tokenizer, fmt, examples) - prompt_logits(b, tokenizer, fmt, examples)).abs().max())
