"""Paraphrases of training inputs written by the project's own model (sampled, seeded)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from tunesmith.models.load import load_model, load_tokenizer
from tunesmith.models.resolve import resolve_model
from tunesmith.models.tokens import adds_bos, encode_chat, left_pad, stop_ids, text_ids

PROMPT = ("Rewrite the following text in different words, keeping its meaning. "
          "Reply with the rewritten text only.\n\n{text}")


@torch.inference_mode()
def paraphrase_with_model(model_name: str, texts: list[str], n: int, seed: int = 0, batch_size: int = 8,
                          progress: bool = True) -> list[list[str]]:
    """`n` sampled paraphrases per text (a paraphrase may come back empty if the model gives nothing)."""
    path = resolve_model(model_name)
    tokenizer, model = load_tokenizer(path), load_model(path).eval()
    torch.manual_seed(seed)
    stop = stop_ids(tokenizer)
    out: list[list[str]] = []
    for start in tqdm(range(0, len(texts), batch_size), desc="paraphrase", unit="batch", disable=not progress):
        chunk = texts[start:start + batch_size]
        ids, mask = left_pad([_prompt_ids(tokenizer, t) for t in chunk], tokenizer.pad_token_id)
        longest = max(len(text_ids(tokenizer, t)) for t in chunk)
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.9, top_p=0.95,
                             num_return_sequences=n, max_new_tokens=2 * longest + 8, eos_token_id=stop,
                             pad_token_id=tokenizer.pad_token_id)
        decoded = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in gen[:, ids.shape[1]:]]
        out += [decoded[i * n:(i + 1) * n] for i in range(len(chunk))]
    return out


def _prompt_ids(tokenizer, text: str) -> list[int]:
    # The row's text is literal: a control-token string in the training data stays text.
    message = PROMPT.format(text=text)
    if tokenizer.chat_template:
        return encode_chat(tokenizer, [{"role": "user", "content": message}])
    head = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    return head + text_ids(tokenizer, message + "\n\nRewritten: ")
