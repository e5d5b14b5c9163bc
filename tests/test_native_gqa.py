"""hardware.native_gqa: on a CPU, grouped-query attention runs without repeated K/V copies, and
computes what the repeated form computes (loss, gradients, generation)."""

from __future__ import annotations

import pytest
import torch

from tunesmith import hardware

ENV = hardware.NATIVE_GQA_ENV
# Before 2.9 PyTorch's CPU flash kernel had no grouped-query path (native_gqa stays off there).
RECENT = pytest.mark.skipif(not hardware.torch_at_least(hardware.NATIVE_GQA_TORCH),
                            reason="CPU flash attention with grouped-query K/V: torch 2.9+")


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def _batch():
    ids = torch.randint(1, 64, (3, 12), generator=torch.Generator().manual_seed(1))  # (B, T)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding on one row, so the call has a real mask (no is_causal shortcut)
    mask[1, :2] = 0
    return ids, mask


def _train_step(model, monkeypatch, native: bool):
    """(loss, gradients by name, bytes autograd saved for backward) with native GQA on or off."""
    monkeypatch.setenv(ENV, "1" if native else "0")
    ids, mask = _batch()
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, sum(saved)


@RECENT
def test_native_gqa_equals_repeated_heads_and_saves_less(monkeypatch):
    model = _model()
    loss_rep, grads_rep, saved_rep = _train_step(model, monkeypatch, native=False)
    loss_gqa, grads_gqa, saved_gqa = _train_step(model, monkeypatch, native=True)
    assert torch.allclose(loss_rep, loss_gqa, atol=1e-6)
    for name, g in grads_rep.items():
        assert torch.allclose(g, grads_gqa[name], atol=1e-5, rtol=1e-4), name
    # Per layer the repeated K and V (each as wide as Q) are saved; natively only the 2 K/V heads.
    B, T, D, layers = 3, 12, 48, 2
    kv_saving = layers * 2 * (D - D // 3) * B * T * 4
    assert saved_rep - saved_gqa >= kv_saving


def test_native_gqa_generates_the_same_tokens(monkeypatch):
    model = _model().eval()
    ids, mask = _batch()
    out = {}
    for native in (False, True):
        monkeypatch.setenv(ENV, "1" if native else "0")
        with torch.no_grad():
            out[native] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                         pad_token_id=0)
    assert torch.equal(out[False], out[True])


@RECENT
def test_native_gqa_only_on_cpu_and_never_over_the_users_choice(monkeypatch):
    monkeypatch.setenv(ENV, "")  # recorded, so teardown restores the session's value whatever is set below
    monkeypatch.delenv(ENV)
    assert hardware.native_gqa(torch.device("cuda")) is False  # masked GQA is the slow math kernel there
    assert ENV not in __import__("os").environ
    assert hardware.native_gqa(torch.device("cpu")) is True
    monkeypatch.setenv(ENV, "0")
    assert hardware.native_gqa(torch.device("cpu")) is False


@RECENT
def test_loading_a_model_turns_it_on_unless_the_user_said_no(monkeypatch, tiny_model):
    import os

    from tunesmith.models.load import load_model

    monkeypatch.setenv(ENV, "0")
    load_model(tiny_model)
    assert os.environ[ENV] == "0"
    monkeypatch.delenv(ENV)
    load_model(tiny_model)
    assert os.environ[ENV] == "1"


def test_torch_version_check():
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    assert hardware.torch_at_least((major, minor)) and hardware.torch_at_least((major - 1, 99))
    assert not hardware.torch_at_least((major, minor + 1)) and not hardware.torch_at_least((major + 1, 0))
