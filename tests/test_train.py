"""Training loop invariants on the tiny model."""

from __future__ import annotations

import pytest
import torch

from conftest import make_texts
from tunesmith.config import TaskConfig, TrainConfig
from tunesmith.data.examples import Example
from tunesmith.models.load import load_model, load_tokenizer
from tunesmith.registry import METHOD_SPECS
from tunesmith.tasks.predict import predict
from tunesmith.tasks.prompts import build_format
from tunesmith.train.batching import length_grouped_batches
from tunesmith.train.methods import METHODS, get_method
from tunesmith.train.trainer import fit, train_step


def _data(n, seed):
    return [Example(r["text"], r["label"], "t") for r in make_texts(n, seed)]


def _fit(path, **train):
    tok, model = load_tokenizer(path), load_model(path)
    fmt = build_format(TaskConfig(instruction="Classify."), ["alpha", "beta", "gamma"], tok)
    cfg = TrainConfig(**{"max_steps": 4, "eval_every": 2, "batch_size": 4, "learning_rate": 0.01, **train})
    fitter = getattr(get_method(cfg.method), "fit", fit)
    result = fitter(model, tok, fmt, _data(24, 1), _data(6, 2), cfg, "accuracy", progress=False)
    return result, tok, result.fmt or fmt


def test_lora_changes_only_adapter_parameters(tiny_model):
    before = {k: v.clone() for k, v in load_model(tiny_model).state_dict().items()}
    result, _, _ = _fit(tiny_model, method="lora")
    after = result.model.state_dict()
    changed = {k for k, v in after.items() if "lora_" in k}
    assert changed, "no LoRA parameters found"
    for key, value in after.items():
        if "lora_" in key:
            continue
        base_key = key.replace("base_model.model.", "").replace(".base_layer", "")
        torch.testing.assert_close(value.cpu(), before[base_key], msg=f"{key} changed")
    lora_b = [v for k, v in after.items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b), "LoRA B matrices never moved from zero"


# Preference methods train on pairs, not on this classification data: tests/test_preference.py.
@pytest.mark.parametrize("method", sorted(m for m in METHODS if not METHOD_SPECS[m].preference))
def test_every_method_trains_saves_and_reloads(tiny_model, tmp_path, method):
    result, tok, fmt = _fit(tiny_model, method=method)
    module = get_method(method)
    if METHOD_SPECS[method].kind == "prompt":
        assert result.stats.trainable_params == 0 and result.stats.candidates == len(result.history) > 1
    else:
        assert result.stats.steps == 4 and result.stats.train_tokens > 0
        assert 0 < result.stats.trainable_params <= result.stats.total_params
    module.save(result.model, tmp_path)
    reloaded = module.load(load_model(tiny_model), tmp_path)
    examples = _data(6, 3)
    a = predict(result.model, tok, fmt, examples)
    b = predict(reloaded, tok, fmt, examples)
    assert a.texts == b.texts
    for pa, pb in zip(a.probabilities, b.probabilities):
        assert all(abs(pa[k] - pb[k]) < 1e-5 for k in pa)


def test_early_stopping_restores_best(tiny_model):
    # A vanishing learning rate cannot improve the metric: patience runs out after 1 + patience evals.
    result, _, _ = _fit(tiny_model, learning_rate=1e-12, max_steps=20, eval_every=1, patience=2)
    assert result.stopped_early and result.stats.steps == 3
    assert result.best["step"] == 1


def test_training_reduces_loss(tiny_model):
    result, _, _ = _fit(tiny_model, max_steps=30, eval_every=10, learning_rate=0.02)
    val_losses = [h["val_loss"] for h in result.history]
    assert val_losses[-1] < val_losses[0]


def test_length_grouped_batches_cover_each_index_once():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 11]
    batches = length_grouped_batches(lengths, 3, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches == length_grouped_batches(lengths, 3, seed=0)
    assert batches != length_grouped_batches(lengths, 3, seed=1)


def test_length_grouping_sorts_within_groups_only():
    lengths = list(range(60))
    grouped = length_grouped_batches(lengths, 4, seed=0, group=15)  # one group: every batch a length slice
    assert all(max(b) - min(b) <= 3 for b in grouped)
    plain = length_grouped_batches(lengths, 4, seed=0, group=1)
    assert sorted(i for b in plain for i in b) == lengths
    assert sum(max(b) - min(b) for b in plain) > 5 * sum(max(b) - min(b) for b in grouped)


def test_train_step_accumulates_micro_batches_clips_and_steps():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    xs = [torch.randn(2, 3) for _ in range(3)]
    batches = iter([{"x": x, "attention_mask": torch.ones(2, 4, dtype=torch.long)} for x in xs])

    def loss_fn(m, batch):
        return m(batch["x"]).pow(2).mean()
    w = model.weight.detach().clone().requires_grad_(True)
    losses = [(x @ w.T).pow(2).mean() for x in xs[:2]]
    grad, = torch.autograd.grad((losses[0] + losses[1]) / 2, w)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    params = list(model.parameters())
    done = train_step(model, batches, optimizer, params=params, dev=torch.device("cpu"), loss_fn=loss_fn,
                      grad_accum=2, schedule=schedule)
    assert done.loss == pytest.approx((losses[0] + losses[1]).item() / 2) and done.tokens == 16
    # The mean gradient of both micro-batches, at the rate the schedule gave before its step (0.5).
    torch.testing.assert_close(model.weight.detach(), w.detach() - 0.5 * grad)
    assert schedule.last_epoch == 1 and model.weight.grad is None
    before = model.weight.detach().clone()
    train_step(model, batches, optimizer, params=params, dev=torch.device("cpu"), loss_fn=loss_fn,
               max_grad_norm=1e-3)
    # Rate 0.5 times a gradient clipped to norm 1e-3 (it was far larger).
    assert (model.weight.detach() - before).norm() == pytest.approx(0.5e-3, rel=1e-3)
