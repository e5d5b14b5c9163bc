"""Gradient checkpointing (train.gradient_checkpointing) and the GPU peak-memory figure (gpu_peak_mb).

Checkpointing must not change the maths: loss and every trainable gradient equal with and without it,
on the plain path and on the shared-prefix / virtual-token path that passes a KV cache to the layers.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch.utils.checkpoint import set_checkpoint_early_stop
from typer.testing import CliRunner

from conftest import PROJECT, make_texts, write_jsonl
from tunesmith import hardware
from tunesmith.cli import app
from tunesmith.config import TaskConfig, TrainConfig, load_config
from tunesmith.data.examples import Example
from tunesmith.errors import ConfigError
from tunesmith.evaluate.objective import judge
from tunesmith.models import estimate
from tunesmith.models.load import load_model, load_tokenizer
from tunesmith.tasks.prompts import build_format
from tunesmith.train import grad_checkpointing
from tunesmith.train.batching import collate, encode_for_training
from tunesmith.train.loss import supervised_loss
from tunesmith.train.methods import get_method
from tunesmith.train.trainer import fit

LABELS = ["alpha", "beta", "gamma"]


def _examples(n: int, seed: int) -> list[Example]:
    return [Example(r["text"], r["label"], "t") for r in make_texts(n, seed)]


def _batch(tok, prefix_len: int) -> dict[str, torch.Tensor]:
    fmt = build_format(TaskConfig(instruction="Classify."), LABELS, tok)
    encoded = encode_for_training(tok, fmt, _examples(4, 5))
    assert all(e.ids[:prefix_len] == encoded[0].ids[:prefix_len] for e in encoded)
    return collate(encoded, tok.pad_token_id, prefix_len)


def _model(path, method: str):
    """A tiny model with `method` applied, its adapter weights random (not the identity init), with dropout."""
    torch.manual_seed(0)
    cfg = TrainConfig(method=method, lora={"dropout": 0.1}, dropout=0.1)
    model = get_method(method).apply(load_model(path), cfg)
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_" in name:
            p.data.normal_(0, 0.3)
    return model.train()


def _loss_and_grads(model, batch, checkpointing: bool) -> tuple[float, dict[str, torch.Tensor], int]:
    """(loss, gradients of the trainable parameters, MLP calls) of one forward + backward.

    A pre-hook counts the calls, and early stopping is off while counting: by default a replay stops
    as soon as it has rebuilt the saved tensors backward needs (inside the MLP, or before it where only
    a layer's keys/values get gradients), which would make the count depend on the graph."""
    calls = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1))
             for layer in grad_checkpointing.decoder_layers(model)]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in both runs
    with grad_checkpointing.checkpointed(model, checkpointing), set_checkpoint_early_stop(False):
        loss, _ = supervised_loss(model, batch)
        loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, len(calls)


@pytest.mark.parametrize("method", ["lora", "full", "prompt_tuning", "prefix_tuning", "dora"])
@pytest.mark.parametrize("prefix_len", [0, 6])
def test_checkpointing_recomputes_and_keeps_loss_and_gradients(tiny_model, method, prefix_len):
    model, tok = _model(tiny_model, method), load_tokenizer(tiny_model)
    batch = _batch(tok, prefix_len)
    plain_loss, plain_grads, plain_calls = _loss_and_grads(model, batch, False)
    ckpt_loss, ckpt_grads, ckpt_calls = _loss_and_grads(model, batch, True)
    # Every layer ran a second time during backward: the activations were recomputed, not kept
    # (prompt learning and shared prefixes run the layers on the prefix too).
    assert plain_calls > 0 and ckpt_calls == 2 * plain_calls
    assert abs(plain_loss - ckpt_loss) < 1e-5
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads
    for name, g in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], g, atol=1e-5, rtol=1e-5, msg=name)
    assert any(g.abs().sum() > 0 for g in ckpt_grads.values())
    # Outside the block the layers run as before.
    assert _loss_and_grads(model, batch, False)[2] == plain_calls


def test_no_recompute_in_eval_mode(tiny_model):
    # Evaluation forwards (scoring, validation loss) keep today's path even inside the block.
    model, tok = _model(tiny_model, "lora"), load_tokenizer(tiny_model)
    model.eval()
    batch = _batch(tok, 6)
    plain_loss, plain_grads, plain_calls = _loss_and_grads(model, batch, False)
    loss, grads, calls = _loss_and_grads(model, batch, True)
    assert calls == plain_calls == 4 and loss == plain_loss  # (prefix + rows) x two layers, once each


def test_auto_turns_on_only_when_the_estimate_does_not_fit(tiny_model):
    model = _model(tiny_model, "lora")
    rows = [40] * 8
    auto = TrainConfig(method="lora")
    # The estimate for any run includes the process overhead (estimate.OVERHEAD_MB): 1 GB never fits.
    assert grad_checkpointing.wanted(auto, model, rows, device_mb=1000.0)
    assert not grad_checkpointing.wanted(auto, model, rows, device_mb=1e7)
    bf16 = hardware.use_bf16(auto.precision, hardware.device())
    need = estimate.memory_mb(hardware.parameter_counts(model)[1] / 1e6, 2, 32, "lora", auto.batch_size, 40, bf16)
    assert not grad_checkpointing.wanted(auto, model, rows, device_mb=need / 0.9 + 1)
    assert grad_checkpointing.wanted(auto, model, rows, device_mb=need / 0.9 - 1)
    # Set explicitly, the estimate is not consulted.
    assert grad_checkpointing.wanted(TrainConfig(gradient_checkpointing=True), model, rows, device_mb=1e7)
    assert not grad_checkpointing.wanted(TrainConfig(gradient_checkpointing=False), model, rows, device_mb=1.0)


def test_auto_prices_the_reference_copy_of_full_fine_tuning_dpo_and_kto(tiny_model):
    # Where every weight trains, DPO and KTO hold a frozen copy of the model as their reference
    # (bf16 under bf16, fp32 otherwise); ORPO and SimPO use none, and a LoRA policy's reference is the
    # same model with its adapter switched off.
    model, rows = load_model(tiny_model), [40] * 8
    bf16 = hardware.use_bf16(TrainConfig().precision, hardware.device())
    params_m = hardware.parameter_counts(model)[1] / 1e6
    alone = estimate.memory_mb(params_m, 2, 32, "full", 4, 40, bf16)
    held = estimate.memory_mb(params_m, 2, 32, "full", 4, 40, bf16, reference_copy=True)
    assert held - alone == pytest.approx((2 if bf16 else 4) * params_m * 1e6 / 2**20)
    between = (alone + held) / 2 / 0.9
    for method, copy_held in (("dpo", True), ("kto", True), ("orpo", False), ("simpo", False)):
        cfg = TrainConfig(method=method, batch_size=4, learning_rate=1e-5, preference={"adapter": "full"})
        assert grad_checkpointing.wanted(cfg, model, rows, device_mb=between) is copy_held, method
    lora = get_method("lora").apply(load_model(tiny_model), TrainConfig(method="lora"))
    lora_m = hardware.parameter_counts(lora)[1] / 1e6
    need = estimate.memory_mb(lora_m, 2, 32, "lora", 4, 40, bf16)
    assert not grad_checkpointing.wanted(TrainConfig(method="dpo", batch_size=4), lora, rows, device_mb=need / 0.9 + 1)


def _fit(path, monkeypatch, device_mb: float, **train):
    monkeypatch.setattr(estimate, "device_memory_mb", lambda dev: device_mb)
    tok, model = load_tokenizer(path), load_model(path)
    fmt = build_format(TaskConfig(instruction="Classify."), LABELS, tok)
    cfg = TrainConfig(**{"max_steps": 3, "eval_every": 3, "batch_size": 4, "learning_rate": 0.01, **train})
    return fit(model, tok, fmt, _examples(16, 1), _examples(3, 2), cfg, "accuracy", progress=False)


def test_fit_on_a_small_device_checkpoints_with_the_same_losses(tiny_model, monkeypatch):
    small = _fit(tiny_model, monkeypatch, 1000.0)            # auto, a device the estimate does not fit
    large = _fit(tiny_model, monkeypatch, 1e7)               # auto, fits
    off = _fit(tiny_model, monkeypatch, 1000.0, gradient_checkpointing=False)
    assert small.stats.gradient_checkpointing and not large.stats.gradient_checkpointing
    assert not off.stats.gradient_checkpointing
    assert [h["train_loss"] for h in small.history] == pytest.approx([h["train_loss"] for h in off.history],
                                                                      abs=1e-5)
    assert [h["val_loss"] for h in small.history] == pytest.approx([h["val_loss"] for h in large.history], abs=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the figure is measured where CUDA is present")
def test_gpu_peak_is_not_measured_without_cuda():
    hardware.reset_gpu_peak()  # a no-op, not an error
    assert hardware.gpu_peak_mb() is None


def test_gpu_peak_constraint_without_a_gpu_is_not_met(tmp_path, tiny_model):
    write_jsonl(tmp_path / "train.jsonl", make_texts(30, 1))
    write_jsonl(tmp_path / "test.jsonl", make_texts(9, 2))
    text = PROJECT.format(model=tiny_model, method="lora").replace(
        "  target: 0.0\n", "  target: 0.0\n  constraints:\n    gpu_peak_mb: {max: 100000}\n").replace(
        "  learning_rate: 0.01\n", "  learning_rate: 0.01\n  gradient_checkpointing: true\n")
    (tmp_path / "project.yaml").write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(tmp_path / "project.yaml"), "--out", str(out), "--quiet"])
    assert result.exit_code in (0, 3), result.output
    stats = json.loads((out / "train.json").read_text())["stats"]
    assert stats["gradient_checkpointing"] is True
    assert list(stats).index("gpu_peak_mb") == list(stats).index("peak_rss_mb") + 1
    finetuned = json.loads((out / "metrics.json").read_text())["finetuned"]
    assert "gpu_peak_mb" in finetuned
    criteria = {c["name"]: c for c in json.loads((out / "summary.json").read_text())["objective"]["criteria"]}
    if torch.cuda.is_available():
        assert finetuned["gpu_peak_mb"] > 0 and criteria["gpu_peak_mb"]["met"]
    else:  # not measured: the constraint fails rather than passing silently
        assert stats["gpu_peak_mb"] is None and finetuned["gpu_peak_mb"] is None
        assert criteria["gpu_peak_mb"]["value"] is None and not criteria["gpu_peak_mb"]["met"]
        assert result.exit_code == 3


def test_gpu_peak_constraint_judged_from_the_figure():
    from tunesmith.config.schema import ObjectiveConfig

    objective = ObjectiveConfig(metric="accuracy", constraints={"gpu_peak_mb": {"max": 8000}})
    assert judge(objective, {}, {"gpu_peak_mb": 7000.0}).met
    assert not judge(objective, {}, {"gpu_peak_mb": 9000.0}).met
    assert not judge(objective, {}, {"gpu_peak_mb": None}).met


def test_config_key_values_and_error(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "x"}\n', encoding="utf-8")
    base = "name: demo\ndata:\n  train: train.jsonl\n"
    for value, expected in (("auto", "auto"), ("true", True), ("false", False)):
        (tmp_path / "project.yaml").write_text(base + f"train:\n  gradient_checkpointing: {value}\n")
        assert load_config(tmp_path / "project.yaml").train.gradient_checkpointing == expected
    assert TrainConfig().gradient_checkpointing == "auto"
    (tmp_path / "project.yaml").write_text(base + "train:\n  gradient_checkpointing: sometimes\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "project.yaml")
    assert info.value.line().startswith("error: ") and "(train.gradient_checkpointing)" in info.value.line()
    (tmp_path / "project.yaml").write_text(base + "objective:\n  constraints:\n    gpu_peak_mb: {max: 8000}\n")
    assert load_config(tmp_path / "project.yaml").objective.constraints["gpu_peak_mb"].max == 8000


def test_fsdp_sharded_layers_with_checkpointing_match_one_process(tmp_path, tiny_model):
    # The checkpointed layers are the FSDP2-sharded ones: the replay must gather their weights again.
    from test_distributed import _assert_same_weights, _project, _torchrun, _train

    single = _project(tmp_path, tiny_model, grad_accum=2, extra_train="  precision: fp32\n")
    _train([sys.executable, "-m", "tunesmith", "train", str(single), "--out", str(tmp_path / "one"), "-q"])
    sharded = "  precision: fp32\n  fsdp: true\n  gradient_checkpointing: true\n"
    _torchrun(_project(tmp_path, tiny_model, grad_accum=1, extra_train=sharded), tmp_path / "two", 29527)
    _assert_same_weights(tmp_path / "one", tmp_path / "two", "adapter_model.safetensors", "lora_B")
    stats = json.loads((tmp_path / "two" / "train.json").read_text())["stats"]
    assert stats["world_size"] == 2 and stats["gradient_checkpointing"] is True
