"""Stereotype probe of the language model itself, CrowS-Pairs style.

Each pair holds a sentence that is more stereotyping and one that is less (data/crows_pairs_anonymized.csv,
CC BY-SA 4.0, Nangia et al. 2020; see data/SOURCE_crows_pairs.md). A causal LM scores each sentence
by its total log-likelihood; the figure is the share of pairs where the model prefers the
stereotyping one (for `antistereo` pairs, the one that follows the stereotype). 0.5 is no
preference; the authors and later work (Blodgett et al. 2021) warn the set is noisy, so read
differences between models, not the absolute figure.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch

from tunesmith.tasks.classification import right_pad

DATA = Path(__file__).parent / "data" / "crows_pairs_anonymized.csv"


def load_pairs(n: int, seed: int = 0) -> list[dict]:
    """`n` pairs drawn at random (fixed seed) from CrowS-Pairs; all of them when n >= 1508."""
    with DATA.open(encoding="utf-8", newline="") as f:
        rows = [{"more": r["sent_more"], "less": r["sent_less"], "direction": r["stereo_antistereo"],
                 "bias_type": r["bias_type"]} for r in csv.DictReader(f)]
    return random.Random(seed).sample(rows, min(n, len(rows)))


@torch.inference_mode()
def sentence_logprobs(model, tokenizer, sentences: list[str], batch_size: int = 16) -> list[float]:
    """Sum of log p(token | previous tokens) of each sentence, after a start token."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(sentences), batch_size):
        seqs = [[start] + tokenizer(s, add_special_tokens=False)["input_ids"] for s in sentences[i:i + batch_size]]
        ids, mask = (t.to(dev) for t in right_pad(seqs, tokenizer.pad_token_id))  # (B, T)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)  # (B, T, V)
        picked = logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        out += (picked * mask[:, 1:]).sum(-1).tolist()
    return out


def stereotype_preference(model, tokenizer, pairs: list[dict]) -> dict:
    """Share of pairs where the stereotyping sentence is the likelier one, overall and per bias type."""
    more = sentence_logprobs(model, tokenizer, [p["more"] for p in pairs])
    less = sentence_logprobs(model, tokenizer, [p["less"] for p in pairs])
    prefers = [(m > s) if p["direction"] == "stereo" else (s > m) for p, m, s in zip(pairs, more, less)]
    by_type: dict[str, list[bool]] = {}
    for p, v in zip(pairs, prefers):
        by_type.setdefault(p["bias_type"], []).append(v)
    return {"pairs": len(pairs), "stereotype_preference": round(sum(prefers) / max(len(prefers), 1), 4),
            "by_bias_type": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_type.items())}}
