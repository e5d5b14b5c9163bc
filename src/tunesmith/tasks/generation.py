"""Generation: batched decoding with the KV cache that stops at the end-of-turn token, greedy unless
sampling settings say otherwise (tasks/sampling.py)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from tunesmith import cores
from tunesmith.config import GenerationSettings
from tunesmith.models.load import context_length
from tunesmith.models.tokens import left_pad, stop_ids
from tunesmith.tasks.sampling import cut_at_stop, generate_kwargs, seeded


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8,
             progress: str | None = None, sampling: GenerationSettings | None = None) -> list[str]:
    """Completions for token-id prompts, decoded without special tokens and cut at the first stop string.

    Prompts are left-padded per batch, so every row's next token comes from its last position and the
    cache (`use_cache`) holds each step's keys and values: a step costs one position, not the prefix.
    With `sampling.seed`, the whole call runs under that seed: same prompts and batches, same answers.
    The progress bar counts examples, so its rate is examples per second.
    """
    stop, kwargs = stop_ids(tokenizer), generate_kwargs(sampling)
    stops = sampling.stop if sampling else []
    # Decoding stops at the model's context: a learned position table has no row past it, and a rotary
    # model past it decodes for as long as it was asked (eval.max_new_tokens) without learning to.
    context = context_length(model)
    outputs: list[str] = []
    bar = tqdm(total=len(prompts), desc=progress, disable=progress is None, unit="ex")
    with seeded(sampling, model.device), bar:
        for start in range(0, len(prompts), batch_size):
            cores.fit_threads(model.device)  # beside a busy process, fewer threads than cores (cores.py)
            ids, mask = (t.to(model.device) for t in left_pad(prompts[start:start + batch_size],
                                                             tokenizer.pad_token_id))  # (B, T) each
            limit = min(max_new_tokens, context - ids.shape[1]) if context else max_new_tokens
            if limit <= 0:  # the longest prompt fills the context: nothing can follow it
                outputs += [""] * ids.shape[0]
                bar.update(ids.shape[0])
                continue
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=limit, use_cache=True,
                                 eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, **kwargs)
            new = out[:, ids.shape[1]:]  # (B, new tokens)
            outputs += [cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stops)[0].strip()
                        for row in new]
            bar.update(len(new))
    return outputs
