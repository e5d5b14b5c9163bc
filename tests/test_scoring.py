"""Label scoring with a shared KV cache, and the training loss with a shared prefix, must equal
the naive full-sequence computations."""

from __future__ import annotations

import torch

from tunesmith.config import TaskConfig
from tunesmith.data.examples import Example
from tunesmith.models.load import load_model, load_tokenizer
from tunesmith.tasks.classification import score_labels
from tunesmith.tasks.predict import encode_prompts
from tunesmith.tasks.prompts import build_format, encode_answer
from tunesmith.train.batching import collate, encode_for_training
from tunesmith.train.loss import supervised_loss

from conftest import make_texts

LABELS = ["alpha", "beta", "gamma", "alpha beta gamma red"]  # answers of different token lengths


def _setup(path, instruction="Classify."):
    tok, model = load_tokenizer(path), load_model(path)
    fmt = build_format(TaskConfig(instruction=instruction), LABELS, tok)
    rows = make_texts(7, 5)
    rows[2]["text"] += " and a much longer tail of words to vary the prompt length"
    return tok, model, fmt, [Example(r["text"], r["label"], "t") for r in rows]


def _naive_scores(model, prompts, answers):
    out = torch.zeros(len(prompts), len(answers))
    for i, p in enumerate(prompts):
        for j, a in enumerate(answers):
            ids = torch.tensor([p + a])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)  # (T, V)
            out[i, j] = sum(logp[len(p) - 1 + k, t] for k, t in enumerate(a))
    return out


def test_shared_cache_scores_equal_full_forward(tiny_model):
    tok, model, fmt, examples = _setup(tiny_model)
    prompts = encode_prompts(tok, fmt, examples)
    answers = [encode_answer(tok, fmt, lab) for lab in LABELS]
    assert len({len(a) for a in answers}) > 1 and len({len(p) for p in prompts}) > 1
    fast = score_labels(model, prompts, answers, tok.pad_token_id, batch_size=3, max_rows=5)
    with torch.no_grad():
        slow = _naive_scores(model, prompts, answers)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def test_scores_without_common_prefix(tiny_plain_model):
    tok, model, fmt, examples = _setup(tiny_plain_model, instruction="")
    prompts = [encode_prompts(tok, fmt, [ex])[0] for ex in examples]
    answers = [encode_answer(tok, fmt, lab) for lab in LABELS]
    fast = score_labels(model, prompts, answers, tok.pad_token_id, batch_size=4)
    with torch.no_grad():
        slow = _naive_scores(model, prompts, answers)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def test_prefix_shared_loss_and_gradients_equal_plain(tiny_model):
    tok, model, fmt, examples = _setup(tiny_model)
    encoded = encode_for_training(tok, fmt, examples[:4])
    prefix_len = 6
    assert all(e.ids[:prefix_len] == encoded[0].ids[:prefix_len] for e in encoded)
    results = []
    for p in (0, prefix_len):
        model.zero_grad()
        loss, n = supervised_loss(model, collate(encoded, tok.pad_token_id, p))
        loss.backward()
        results.append((loss.item(), n, model.model.embed_tokens.weight.grad.clone()))
    (l0, n0, g0), (l1, n1, g1) = results
    assert n0 == n1 == sum(len(e.ids) - e.n_prompt for e in encoded)
    assert abs(l0 - l1) < 1e-5
    torch.testing.assert_close(g0, g1, atol=1e-5, rtol=1e-4)


def test_loss_matches_transformers_loss(tiny_model):
    tok, model, fmt, examples = _setup(tiny_model)
    batch = collate(encode_for_training(tok, fmt, examples[:3]), tok.pad_token_id)
    ours, _ = supervised_loss(model, batch)
    theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert abs(ours.item() - theirs.item()) < 1e-5
