"""The chunked head + cross-entropy (train/loss.py): the same loss and gradients as computing every
supervised position's logits at once, with the logits of one chunk alive at a time."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunesmith.train import loss as loss_module
from tunesmith.train.batching import Encoded, collate
from tunesmith.train.loss import supervised_loss


def _batch(weights: bool):
    g = torch.Generator().manual_seed(0)
    items = [Encoded(torch.randint(11, 300, (n,), generator=g).tolist(), k, weight=w)
             for n, k, w in ((14, 3, 1.0), (11, 2, 2.0), (16, 5, 0.5))]  # 11 + 9 + 11 = 31 supervised tokens
    batch = collate(items, 3)
    if not weights:
        batch.pop("weights", None)
    return batch


def _loss_and_grads(model, batch, smoothing: float):
    model.zero_grad(set_to_none=True)
    loss, n = supervised_loss(model, batch, label_smoothing=smoothing)
    loss.backward()
    return loss.detach(), n, {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("weights,smoothing", [(False, 0.0), (True, 0.0), (False, 0.1)])
def test_chunked_loss_and_gradients_equal_the_whole_logits(tiny_model, monkeypatch, weights, smoothing):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    batch = _batch(weights)
    whole = _loss_and_grads(model, batch, smoothing)
    chunks = []
    real = loss_module._chunk_ce
    monkeypatch.setattr(loss_module, "_chunk_ce", lambda *a: chunks.append(len(a[2])) or real(*a))
    monkeypatch.setattr(loss_module, "CE_CHUNK", 4)
    chunked = _loss_and_grads(model, batch, smoothing)
    # 31 positions in chunks of 4: 8 chunks forward, recomputed once more in backward.
    assert chunks[:8] == [4] * 7 + [3] and len(chunks) == 16
    assert whole[1] == chunked[1] == 31
    torch.testing.assert_close(chunked[0], whole[0], atol=1e-6, rtol=1e-6)
    assert whole[2].keys() == chunked[2].keys() and whole[2]
    for name, grad in whole[2].items():
        torch.testing.assert_close(chunked[2][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_a_batch_within_one_chunk_takes_the_plain_path(tiny_model, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    monkeypatch.setattr(loss_module, "_chunk_ce", lambda *a: pytest.fail("chunked path taken"))
    loss, n = supervised_loss(model, _batch(False))
    assert n == 31 and torch.isfinite(loss)
