"""train.compile: the decoder layers run through torch.compile while training, with the same losses,
and run plain again afterwards."""

from __future__ import annotations

import copy

import pytest
import torch

from test_gradient_checkpointing import _fit
from tunesmith.models.load import load_model
from tunesmith.train import compiled as compiled_module
from tunesmith.train import precision
from tunesmith.train.grad_checkpointing import decoder_layers


def test_compiled_training_has_the_same_losses_and_leaves_plain_layers(tiny_model, monkeypatch):
    calls = []
    real_compile = torch.compile

    def counting_compile(fn, **kwargs):  # the compiled function must be the one that runs
        compiled_fn = real_compile(fn, **kwargs)

        def run(*args, **kw):
            calls.append(fn.__qualname__)
            return compiled_fn(*args, **kw)
        return run

    monkeypatch.setattr(compiled_module.torch, "compile", counting_compile)
    plain = _fit(tiny_model, monkeypatch, 1e7, gradient_checkpointing=False)
    assert not calls
    fast = _fit(tiny_model, monkeypatch, 1e7, gradient_checkpointing=False, compile=True)
    assert calls and all(name.endswith("DecoderLayer.forward") for name in calls)
    assert [h["train_loss"] for h in fast.history] == pytest.approx([h["train_loss"] for h in plain.history], abs=1e-4)
    # Validation follows the training steps, whose fused kernels round differently from eager ones (on a
    # CPU with AVX-512/AMX: 3e-4 on a loss of 5.7, 5e-5 of it); a wrong compiled layer is far off that.
    assert [h["val_loss"] for h in fast.history] == pytest.approx([h["val_loss"] for h in plain.history],
                                                                   rel=2e-4, abs=1e-4)
    assert all("forward" not in vars(layer) for layer in decoder_layers(fast.model))  # plain again


def test_a_deep_copy_of_a_compiled_model_runs_its_own_layers(tiny_model):
    model = load_model(tiny_model)
    ids = torch.tensor([[1, 5, 7, 9]])
    with compiled_module.compiled(model):
        twin = copy.deepcopy(model)
        for p in twin.parameters():
            p.data.zero_()
        with torch.no_grad():
            mine, theirs = model(input_ids=ids).logits, twin(input_ids=ids).logits
    assert not torch.allclose(mine, theirs)  # the copy's zeroed weights, not the original's, ran
    assert all("forward" not in vars(layer) for layer in decoder_layers(model))


def test_compile_is_skipped_with_gradient_checkpointing_and_casts_are_shared_then(tiny_model, monkeypatch):
    """Layers that do not run compiled share their bf16 input casts as in any plain run (train/precision.py)."""
    monkeypatch.setattr(compiled_module.torch, "compile", lambda *a, **k: pytest.fail("compiled"))
    shared, share = [], precision.share_input_casts
    monkeypatch.setattr(precision, "share_input_casts", lambda model, done: shared.append(share(model, done)))
    result = _fit(tiny_model, monkeypatch, 1e7, gradient_checkpointing=True, compile=True, precision="bf16")
    assert result.stats.gradient_checkpointing and shared
