"""Low-precision frozen weights: frozen base weights in bf16 while training under bf16 autocast,
trainable parameters and optimiser state in fp32, the loaded checkpoint's fp32 pages released."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_texts, toy_pairs
from tunesmith.config import TaskConfig, TrainConfig
from tunesmith.data.examples import Example
from tunesmith.models.load import load_model, load_tokenizer
from tunesmith.tasks.prompts import build_format
from tunesmith.train import precision, trainer
from tunesmith.train.methods import get_method
from tunesmith.train.precision import Compacted, compact_frozen


def _data(n, seed):
    return [Example(r["text"], r["label"], "t") for r in make_texts(n, seed)]


def _fit(path, monkeypatch, compact: bool = True, **train):
    """fit under bf16 autocast; returns (result, optimizer, dtypes of the frozen linear weights while training)."""
    seen = {}
    real_compact, real_optimizer = precision.compact_frozen, trainer.make_optimizer

    def spy_compact(model, checkpoint):
        names = real_compact(model, checkpoint) if compact else Compacted()
        if not compact:  # the one change compaction makes: input embeddings rounded to bf16
            weight = model.get_input_embeddings().weight
            weight.data = weight.data.to(torch.bfloat16).float()
        seen["frozen"] = {p.dtype for n, p in model.named_parameters() if not p.requires_grad and "proj" in n}
        return names

    def spy_optimizer(params, cfg):
        seen["optimizer"] = real_optimizer(params, cfg)
        return seen["optimizer"]

    monkeypatch.setattr(precision, "compact_frozen", spy_compact)
    monkeypatch.setattr(trainer, "make_optimizer", spy_optimizer)
    tok = load_tokenizer(path)
    fmt = build_format(TaskConfig(instruction="Classify."), ["alpha", "beta", "gamma"], tok)
    cfg = TrainConfig(**{"max_steps": 4, "eval_every": 2, "batch_size": 4, "learning_rate": 0.01,
                         "precision": "bf16", **train})
    result = trainer.fit(load_model(path), tok, fmt, _data(24, 1), _data(6, 2), cfg, "accuracy", progress=False)
    return result, seen


def test_frozen_weights_train_in_bf16_with_fp32_trainables_and_state_and_equal_results(tiny_model, monkeypatch):
    result, seen = _fit(tiny_model, monkeypatch)
    assert seen["frozen"] == {torch.bfloat16}
    optimizer = seen["optimizer"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert params and all(p.dtype == torch.float32 for p in params)
    state = [t for s in optimizer.state.values() for t in s.values() if t.is_floating_point() and t.dim() > 0]
    assert state and all(t.dtype == torch.float32 for t in state)
    # The returned model is the loaded fp32 model plus what trained, as with fp32 frozen weights.
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    # Training equals fp32-frozen training with the embedding rounded, and the fp32 embedding comes back.
    plain, _ = _fit(tiny_model, monkeypatch, compact=False)
    embedding = result.model.get_input_embeddings().weight
    for (name, a), (_, b) in zip(result.model.state_dict().items(), plain.model.state_dict().items()):
        if a.data_ptr() != embedding.data_ptr():
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(embedding, load_model(tiny_model).get_input_embeddings().weight, atol=0, rtol=0)


def test_dora_keeps_fp32_frozen_weights(tiny_model, monkeypatch):
    _, seen = _fit(tiny_model, monkeypatch, method="dora", max_steps=2)
    assert "frozen" not in seen  # compact_frozen is never called: registry low_precision_frozen=False


def _mapped(path) -> bool:
    """Whether this process maps any of the checkpoint's safetensors files."""
    with open("/proc/self/maps", encoding="ascii", errors="ignore") as f:
        return str(path.resolve()) in f.read()


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="Linux /proc only")
def test_compacting_releases_the_checkpoint_file_mapping(tiny_model, tmp_path):
    import gc
    import shutil

    # A private copy: models other tests keep alive in this process may map the shared fixture's files.
    tiny_model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    model = get_method("lora").apply(load_model(tiny_model), TrainConfig())
    gc.collect()
    if not _mapped(tiny_model):
        pytest.skip("this transformers version copies weights instead of mapping the checkpoint")
    done = compact_frozen(model, tiny_model)
    gc.collect()
    assert done.names and not _mapped(tiny_model)  # the fp32 pages of the cast weights are no longer resident
    norm = model.get_base_model().model.norm.weight  # kept fp32, in memory of its own
    torch.testing.assert_close(norm, load_model(tiny_model).model.norm.weight, atol=0, rtol=0)


def test_a_tied_head_of_an_embedding_that_stays_fp32_is_not_cast(tiny_model, tmp_path):
    """An embedding that is not a plain nn.Embedding (Gemma's scaled lookup) stays fp32, and so does the
    LM head tied to it, even when the checkpoint also stores the head under its own name."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    class ScaledEmbedding(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    model = get_method("lora").apply(load_model(folder), TrainConfig())
    lm = model.get_base_model()
    scaled = ScaledEmbedding(*lm.model.embed_tokens.weight.shape)
    scaled.weight = lm.model.embed_tokens.weight
    lm.model.embed_tokens = scaled
    assert lm.lm_head.weight is scaled.weight  # tied
    done = compact_frozen(model, folder)
    assert done.names and "lm_head" not in done.names and not done.hooks
    assert scaled.weight.dtype == torch.float32


class _Stop(Exception):
    pass


@pytest.mark.parametrize("method", ["lora", "dpo"])
def test_a_fit_stopped_by_an_exception_leaves_the_callers_model_in_fp32(tiny_model, method):
    """An error, Ctrl-C or a pruned search trial mid-training: the model the caller passed in (LoRA
    injected in place) has its fp32 frozen weights back and no lookup hook left on its embedding."""
    from tunesmith.train.preference_fit import fit_pairs

    def stop(record):
        raise _Stop

    model, tok = load_model(tiny_model), load_tokenizer(tiny_model)
    cfg = TrainConfig(method=method, max_steps=4, eval_every=1, batch_size=4, precision="bf16", trackers=[])
    with pytest.raises(_Stop):
        if method == "dpo":
            fmt = build_format(TaskConfig(type="generation"), None, tok)
            fit_pairs(model, tok, fmt, toy_pairs(8), toy_pairs(4), cfg, "preference_accuracy", progress=False,
                      on_validate=stop)
        else:
            fmt = build_format(TaskConfig(instruction="Classify."), ["alpha", "beta", "gamma"], tok)
            trainer.fit(model, tok, fmt, _data(16, 1), _data(4, 2), cfg, "accuracy", progress=False,
                        on_validate=stop)
    loaded = load_model(tiny_model).state_dict()
    for name, value in model.state_dict().items():
        assert value.dtype == torch.float32, name
        key = name.replace("base_layer.", "")
        if "lora_" not in name and key in loaded:
            assert torch.equal(value, loaded[key]), name
    assert not model.get_input_embeddings()._forward_hooks
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    # Nor a cast-sharing hook, and PEFT's own input cast is back on.
    assert layers and all(m.cast_input_dtype_enabled for m in layers)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_a_failed_restore_is_noted_on_the_exception_that_stopped_training(tiny_model, monkeypatch):
    """The exception that stopped training is the one raised (Ctrl-C keeps a resumable run, a pruned trial
    is skipped); a restore that fails as well is a note on it, not a replacement."""
    def broken(*args):
        raise RuntimeError("checkpoint gone")

    model = get_method("lora").apply(load_model(tiny_model), TrainConfig())
    monkeypatch.setattr(precision, "restore_frozen", broken)
    with pytest.raises(_Stop) as info:
        with precision.frozen_in_bf16(model, TrainConfig(precision="bf16"), True, tiny_model):
            raise _Stop
    assert info.value.__notes__ == ["restoring the fp32 frozen weights failed too: checkpoint gone"]


def _loss_grads_and_saved(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict, int]:
    """Loss, adapter gradients and the bytes autograd keeps for backward (each storage once, weights not
    counted) of one forward under bf16 autocast."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(kept.values())


def test_lora_layers_reading_one_input_keep_one_bf16_copy_of_it_with_unchanged_results(tiny_model):
    """q/k/v (and gate/up) read the same hidden states: one bf16 cast of them is kept for backward instead
    of one per layer, and the loss and every adapter gradient are exactly those without sharing."""
    model = get_method("lora").apply(load_model(tiny_model), TrainConfig())
    done = compact_frozen(model, tiny_model)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    loss, grads, kept = _loss_grads_and_saved(model, ids)
    before = len(done.hooks)  # the embedding's
    precision.share_input_casts(model, done)
    hooked = [m for m in model.modules() if m._forward_pre_hooks]
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    # One hook per A matrix, and PEFT's own input cast off on each layer that holds one.
    assert hooked and len(done.hooks) - before == len(hooked) + len(layers)
    assert len(layers) == len(hooked) and not any(m.cast_input_dtype_enabled for m in layers)
    shared_loss, shared_grads, shared_kept = _loss_grads_and_saved(model, ids)
    assert torch.equal(loss, shared_loss) and grads.keys() == shared_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=0, rtol=0, msg=name)
    # Per layer two (B, T, H) bf16 copies fewer for q/k/v, one for gate/up, and one for o_proj: its bf16
    # input shares memory with the attention output that SDPA keeps for its own backward, and without
    # PEFT's fp32 round trip it is no longer copied.
    cfg = model.config
    assert kept - shared_kept == 4 * cfg.num_hidden_layers * ids.numel() * cfg.hidden_size * 2, (kept, shared_kept)
    with torch.no_grad(), torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids)  # validation: inference tensors (no version counter) pass through unshared
    precision.restore_frozen(model, done, tiny_model)
    assert not any(m._forward_pre_hooks for m in hooked) and all(m.cast_input_dtype_enabled for m in layers)


def test_adapters_with_dropout_keep_their_own_input_casts(tiny_model):
    model = get_method("lora").apply(load_model(tiny_model), TrainConfig(lora={"dropout": 0.1}))
    done = compact_frozen(model, tiny_model)
    hooks = len(done.hooks)  # the embedding's
    precision.share_input_casts(model, done)
    assert done.names and len(done.hooks) == hooks


def test_training_compaction_shares_casts_unless_compiled_and_a_failure_leaves_fp32(tiny_model, monkeypatch):
    model = get_method("lora").apply(load_model(tiny_model), TrainConfig())
    # train.compile alone does not rule sharing out: only layers that will really run compiled do.
    for compiled, shared in ((False, True), (True, False)):
        done = precision.compact_for_training(model, TrainConfig(compile=True), True, tiny_model, compiled)
        assert done.names and any(m._forward_pre_hooks for m in model.modules()) == shared
        precision.restore_frozen(model, done, tiny_model)
    monkeypatch.setattr(precision, "share_input_casts", lambda model, done: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        precision.compact_for_training(model, TrainConfig(), True, tiny_model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
