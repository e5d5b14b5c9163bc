"""Generation: greedy decoding that stops at the end-of-turn token."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from tunesmith.models.tokens import left_pad, stop_ids


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8,
             progress: str | None = None) -> list[str]:
    """Greedy completions for token-id prompts, decoded without special tokens."""
    stop = stop_ids(tokenizer)
    outputs = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=progress, disable=progress is None, unit="batch"):
        ids, mask = (t.to(model.device) for t in left_pad(prompts[start:start + batch_size], tokenizer.pad_token_id))
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
        new = out[:, ids.shape[1]:]  # (B, new tokens)
        outputs += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    return outputs
