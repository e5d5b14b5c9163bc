"""QLoRA: `train.quantize` loads the frozen base through bitsandbytes (its CPU backend), LoRA/DoRA train
on top, and the saved adapter loads on the full-precision base."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from conftest import make_texts
from tunesmith.config import TaskConfig, TrainConfig
from tunesmith.data.examples import Example
from tunesmith.models.load import load_model, load_tokenizer
from tunesmith.registry import METHOD_SPECS
from tunesmith.tasks.predict import predict
from tunesmith.tasks.prompts import build_format
from tunesmith.train.methods import METHODS, get_method
from tunesmith.train.trainer import fit

pytest.importorskip("bitsandbytes")


def _data(n, seed):
    return [Example(r["text"], r["label"], "t") for r in make_texts(n, seed)]


def _fit(path, **train):
    tok = load_tokenizer(path)
    fmt = build_format(TaskConfig(instruction="Classify."), ["alpha", "beta", "gamma"], tok)
    cfg = TrainConfig(**{"max_steps": 4, "eval_every": 2, "batch_size": 4, "learning_rate": 0.01, **train})
    return fit(load_model(path), tok, fmt, _data(24, 1), _data(6, 2), cfg, "accuracy", progress=False), tok, fmt


def _quantized(model) -> int:
    from tunesmith.models.quantize import quantized_layers

    return quantized_layers(model)


@pytest.mark.parametrize("kind,method", [("nf4", "lora"), ("int8", "lora"), ("nf4", "dora")])
def test_adapter_trained_on_a_quantized_base_loads_on_the_fp32_base(tiny_model, tmp_path, kind, method):
    result, tok, fmt = _fit(tiny_model, quantize=kind, method=method)
    assert _quantized(result.model) == 14  # 2 decoder layers x (q, k, v, o, gate, up, down); not the LM head
    trained = {n: p.detach().clone() for n, p in result.model.named_parameters() if p.requires_grad}
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    assert any(float(p.abs().sum()) > 0 for n, p in trained.items() if "lora_B" in n)  # B starts at zero
    get_method(method).save(result.model, tmp_path)
    reloaded = get_method(method).load(load_model(tiny_model), tmp_path)
    assert _quantized(reloaded) == 0
    loaded = dict(reloaded.named_parameters())
    for name, value in trained.items():
        torch.testing.assert_close(loaded[name], value, atol=0, rtol=0)
    preds = predict(reloaded, tok, fmt, _data(6, 3))
    assert len(preds.texts) == 6 and all(abs(sum(p.values()) - 1) < 1e-3 for p in preds.probabilities)


def test_quantize_is_refused_for_methods_that_would_train_the_quantized_weights():
    for method in METHODS:
        if METHOD_SPECS[method].quantizable:
            TrainConfig(method=method, quantize="nf4")
            continue
        # The reason fits the method: a preference method would train an adapter, not the quantized weights.
        why = "preference loop" if METHOD_SPECS[method].preference else "quantized weights themselves"
        with pytest.raises(ValidationError, match=f"train.quantize.*{why}"):
            TrainConfig(method=method, quantize="nf4")
    assert {m for m in METHODS if METHOD_SPECS[m].quantizable} == {"lora", "dora"}
    with pytest.raises(ValidationError, match="train.quantize"):
        TrainConfig(quantize="int8", fsdp=True)


def test_the_qlora_estimate_row_names_a_config_the_tool_trains():
    spec = METHOD_SPECS["qlora"]
    assert spec.module is None and spec.trains_as
    cfg = TrainConfig(**{key.removeprefix("train."): value for key, value in spec.trains_as})
    assert cfg.method in METHODS and cfg.quantize == "nf4"
    lora = METHOD_SPECS[cfg.method]
    assert (spec.kind, spec.trained_share, spec.learning_rate) == (lora.kind, lora.trained_share, lora.learning_rate)


def test_8bit_adamw_keeps_8bit_state_and_trains(tiny_model):
    result, _, _ = _fit(tiny_model, optimizer="adamw_8bit", max_steps=2)
    assert result.stats.steps == 2 and any(float(p.detach().abs().sum()) > 0 for n, p in result.model.named_parameters()
                                           if "lora_B" in n)


def test_8bit_adamw_state_is_uint8():
    from tunesmith.train.precision import make_optimizer

    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = make_optimizer([p], TrainConfig(optimizer="adamw_8bit"))
    (p ** 2).sum().backward()
    before = p.detach().clone()
    opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8 and not torch.equal(before, p.detach())
