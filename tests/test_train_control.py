"""Overfitting watch, checkpoints and resume, trackers, pre-flight checks and regularisers."""

from __future__ import annotations

import json
import random
import shutil
import struct

import pytest
import torch

from conftest import make_texts
from tunesmith.config import TaskConfig, TrainConfig
from tunesmith.data.examples import Example
from tunesmith.errors import ConfigError, DataError, RunDirError
from tunesmith.models.load import load_model, load_tokenizer
from tunesmith.tasks.prompts import build_format
from tunesmith.train.batching import encode_for_training
from tunesmith.train.checkpoint import list_checkpoints
from tunesmith.train.loss import supervised_loss
from tunesmith.train.preflight import preflight
from tunesmith.train.regularize import neftune, set_dropout
from tunesmith.train.trainer import fit
from tunesmith.train.watch import overfitting_signals

LABELS = ["alpha", "beta", "gamma"]


def _data(n, seed):
    return [Example(r["text"], r["label"], f"train.jsonl:{i + 1}") for i, r in enumerate(make_texts(n, seed))]


def _setup(path, max_length=512):
    tok = load_tokenizer(path)
    return tok, build_format(TaskConfig(instruction="Classify.", max_length=max_length), LABELS, tok)


def _fit(path, out_dir=None, resume=False, train_n=24, **train):
    tok, fmt = _setup(path)
    cfg = TrainConfig(**{"max_steps": 8, "eval_every": 2, "batch_size": 4, "learning_rate": 0.01,
                         "trackers": [], **train})
    return fit(load_model(path), tok, fmt, _data(train_n, 1), _data(6, 2), cfg, "accuracy",
               out_dir=out_dir, progress=False, resume=resume)


def _trainable(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_signals_for_widening_gap_and_falling_metric():
    rows = [(1.0, 0.9, 0.5), (0.8, 0.6, 0.6), (0.85, 0.4, 0.55), (0.9, 0.2, 0.5), (0.95, 0.1, 0.45)]
    history = [{"step": i, "val_loss": v, "train_loss": t, "accuracy": a} for i, (v, t, a) in enumerate(rows)]
    assert overfitting_signals(history[:3], "accuracy", 3) == []
    kinds = {s["signal"] for s in overfitting_signals(history, "accuracy", 3)}
    assert kinds == {"widening_gap", "metric_falling"}
    steady = [{"step": i, "val_loss": 1 - i / 10, "train_loss": 1 - i / 9, "accuracy": i / 10} for i in range(6)]
    assert overfitting_signals(steady, "accuracy", 3) == []


def test_overfitting_run_is_flagged_stopped_and_best_restored(tiny_model):
    # 8 examples with random labels and many full fine-tuning steps: there is nothing to learn but
    # the examples themselves, so the model memorises them and the validation gap opens.
    tok, fmt = _setup(tiny_model)
    rng = random.Random(0)
    noisy = [Example(e.input, rng.choice(LABELS), e.source) for e in _data(8, 1)]
    cfg = TrainConfig(method="full", max_steps=300, eval_every=4, batch_size=2, learning_rate=0.003, patience=50,
                      overfit={"evals": 2}, trackers=[])
    result = fit(load_model(tiny_model), tok, fmt, noisy, _data(6, 2), cfg, "accuracy", progress=False)
    assert result.overfitting and result.stopped_early and result.stats.steps < 300
    assert result.overfitting[0]["signal"] == "widening_gap"
    assert "overfitting" in result.stop_reason
    assert result.best["step"] < result.stats.steps


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tiny_model, tmp_path):
    full = _fit(tiny_model, out_dir=tmp_path / "a", checkpoint_every=2, keep_checkpoints=10)
    saved = list_checkpoints(tmp_path / "a" / "checkpoints")
    assert [p.name for p in saved] == ["step-0000002", "step-0000004", "step-0000006"]
    # An "interrupted" copy: only the checkpoint of step 4 survived.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-0000006")
    resumed = _fit(tiny_model, out_dir=tmp_path / "b", resume=True, checkpoint_every=2, keep_checkpoints=10)
    assert resumed.stats.steps == full.stats.steps == 8
    assert resumed.history == full.history
    a, b = _trainable(full.model), _trainable(resumed.model)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    steps = [r["step"] for r in map(_json, (tmp_path / "b" / "train_log.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == list(range(1, 9)), "the resumed log must read as one run"


@pytest.mark.parametrize("edit,says", [(lambda s: s["loop"].update(step=1000), "its step is 1000, its folder's 2"),
                                       (lambda s: s["loop"].update(step="abc"), "its step is abc"),
                                       (lambda s: s.pop("loop"), "'loop' and 'watch' must be objects"),
                                       (lambda s: s["loop"].update(losses=[1.0]), "one finite loss per step"),
                                       (lambda s: s["watch"].update(best=3), "'watch' needs")])
def test_an_edited_checkpoint_state_is_refused_naming_it(tiny_model, tmp_path, edit, says):
    """An edited step resumed 2 real steps as 1,000 (exit 0, a run that said so); a missing or mistyped
    key was `internal error: KeyError/TypeError` (exit 1)."""
    _fit(tiny_model, out_dir=tmp_path, checkpoint_every=2, keep_checkpoints=10, max_steps=4)
    state_file = tmp_path / "checkpoints" / "step-0000002" / "state.json"
    shutil.rmtree(tmp_path / "checkpoints" / "step-0000004", ignore_errors=True)
    state = json.loads(state_file.read_text())
    edit(state)
    state_file.write_text(json.dumps(state))
    with pytest.raises(RunDirError) as info:
        _fit(tiny_model, out_dir=tmp_path, resume=True, checkpoint_every=2, keep_checkpoints=10, max_steps=4)
    assert says in info.value.line() and str(state_file) in info.value.line()


def test_a_checkpoint_is_read_without_unpickling_and_a_damaged_one_is_named(tiny_model, tmp_path):
    """The optimiser state went through torch.save and torch.load(weights_only=True), an unpickler (which
    had ways to run code before torch 2.6): now tensors in safetensors, the rest in JSON."""
    _fit(tiny_model, out_dir=tmp_path, checkpoint_every=2, keep_checkpoints=10, max_steps=4)
    shutil.rmtree(tmp_path / "checkpoints" / "step-0000004", ignore_errors=True)
    step = tmp_path / "checkpoints" / "step-0000002"
    assert sorted(p.name for p in step.iterdir() if p.name.startswith("optimizer")) == \
        ["optimizer.json", "optimizer.safetensors"]
    tree = json.loads((step / "optimizer.json").read_text())
    (step / "optimizer.json").write_text(json.dumps({"__dict__": [["optimizer", {"__pickle__": "x"}]]}))
    with pytest.raises(RunDirError) as info:
        _fit(tiny_model, out_dir=tmp_path, resume=True, checkpoint_every=2, keep_checkpoints=10, max_steps=4)
    assert "the checkpoint cannot be read (ValueError: an object that is none of" in info.value.line()
    assert str(step) in info.value.line()
    (step / "optimizer.json").unlink()  # a checkpoint of an earlier tunesmith: optimizer.pt, a pickle
    torch.save({"x": _Refused()}, step / "optimizer.pt")
    with pytest.raises(RunDirError, match="written by an earlier tunesmith"):
        _fit(tiny_model, out_dir=tmp_path, resume=True, checkpoint_every=2, keep_checkpoints=10, max_steps=4)
    (step / "optimizer.json").write_text(json.dumps(tree))
    _fit(tiny_model, out_dir=tmp_path, resume=True, checkpoint_every=2, keep_checkpoints=10, max_steps=4)


class _Refused:
    """Any object of a class `torch.load(weights_only=True)` does not allow."""


def test_keep_last_n_checkpoints(tiny_model, tmp_path):
    _fit(tiny_model, out_dir=tmp_path, checkpoint_every=1, keep_checkpoints=2)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-0000006", "step-0000007"]
    assert not list((tmp_path / "checkpoints").glob(".*")), "no temporary checkpoint left behind"


def test_tensorboard_mlflow_and_wandb_offline_receive_the_metrics(tiny_model, tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    _fit(tiny_model, out_dir=tmp_path, trackers=["tensorboard", "mlflow", "wandb"])
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and b"val_loss" in events[0].read_bytes()
    assert _tfrecord_count(events[0]) > 8
    import mlflow

    mlflow.set_tracking_uri((tmp_path / "mlruns").resolve().as_uri())
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1 and "metrics.val_loss" in runs.columns and runs["metrics.loss"].notna().all()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_preflight_names_examples_cut_off_and_truncated(tiny_model):
    tok, fmt = _setup(tiny_model, max_length=24)
    examples = _data(4, 1)
    examples[1] = Example(" ".join(["red blue green money"] * 40), "alpha", "train.jsonl:2")
    examples[2] = Example(" ".join(["red blue green money"] * 40), "alpha", "train.jsonl:3",
                          file="/runs/challenger/retrain/train.jsonl", line=3)  # read in this process: its path
    encoded = encode_for_training(tok, fmt, examples)
    notes = preflight(tok, fmt, examples, encoded, TrainConfig(batch_size=2))
    assert any("truncated" in n and "train.jsonl:2, /runs/challenger/retrain/train.jsonl:3" in n for n in notes)
    tok, fmt = _setup(tiny_model, max_length=16)
    with pytest.raises(DataError, match="no supervised tokens"):
        preflight(tok, fmt, examples, [type(e)(e.ids[: e.n_prompt], e.n_prompt) for e in encoded],
                  TrainConfig(batch_size=2))


def test_preflight_warns_on_learning_rate_and_batch_size(tiny_model):
    tok, fmt = _setup(tiny_model)
    examples = _data(4, 1)
    notes = preflight(tok, fmt, examples, encode_for_training(tok, fmt, examples),
                      TrainConfig(method="full", learning_rate=0.01, batch_size=8))
    assert any("train.learning_rate" in n for n in notes) and any("train.batch_size" in n for n in notes)


def test_preflight_says_when_fsdp_has_one_process_to_shard_across(tiny_model):
    """train.fsdp outside torchrun trains the whole model in one process: said, not silent."""
    tok, fmt = _setup(tiny_model)
    examples = _data(4, 1)
    encoded = encode_for_training(tok, fmt, examples)
    notes = preflight(tok, fmt, examples, encoded, TrainConfig(batch_size=2, fsdp=True))
    assert [n for n in notes if n.startswith("train.fsdp is on, but this is a single process")], notes
    assert not [n for n in preflight(tok, fmt, examples, encoded, TrainConfig(batch_size=2)) if "fsdp" in n]


def test_preflight_refuses_generation_answers_that_cannot_stop(tiny_model):
    tok = load_tokenizer(tiny_model)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    fmt = build_format(TaskConfig(type="generation", instruction="Answer."), None, tok)
    examples = [Example("2+2?", "4", "train.jsonl:1")]
    with pytest.raises(ConfigError, match="never stop"):
        preflight(tok, fmt, examples, encode_for_training(tok, fmt, examples), TrainConfig())


def test_label_smoothing_raises_the_loss_of_a_confident_model(tiny_model):
    tok, fmt = _setup(tiny_model)
    model = load_model(tiny_model).eval()
    from tunesmith.train.batching import collate

    batch = collate(encode_for_training(tok, fmt, _data(4, 1)), tok.pad_token_id)
    plain, _ = supervised_loss(model, batch)
    smooth, _ = supervised_loss(model, batch, label_smoothing=0.3)
    assert not torch.isclose(plain, smooth)


def test_neftune_adds_noise_only_while_training(tiny_model):
    model = load_model(tiny_model)
    ids = torch.tensor([[5, 6, 7, 8]])
    emb = model.get_input_embeddings()
    clean = emb(ids)
    with neftune(model, 5.0):
        model.train()
        noisy = emb(ids)
        model.eval()
        quiet = emb(ids)
    assert not torch.allclose(clean, noisy) and torch.equal(clean, quiet)
    bound = 5.0 / (4 * clean.shape[-1]) ** 0.5
    assert (noisy - clean).abs().max() <= bound + 1e-6
    assert torch.equal(emb(ids), clean), "the hook must be removed afterwards"


@pytest.mark.parametrize("alpha,shared", [(None, True), (5.0, False)])
def test_neftune_turns_off_the_shared_prompt_prefix(tiny_model, monkeypatch, alpha, shared):
    """NEFTune's noise is scaled by a row's whole length and drawn per row, so with it the supervised loop
    embeds every row's whole prompt (no shared prefix); without it the system text is shared."""
    from tunesmith.train import trainer

    seen = []
    real = trainer.batch_stream
    monkeypatch.setattr(trainer, "batch_stream", lambda enc, cfg, pad, prefix_len, *a: seen.append(prefix_len)
                        or real(enc, cfg, pad, prefix_len, *a))
    tok = load_tokenizer(tiny_model)
    fmt = build_format(TaskConfig(instruction="Classify the message."), ["alpha", "beta", "gamma"], tok)
    cfg = TrainConfig(max_steps=1, eval_every=1, batch_size=4, neftune_alpha=alpha, trackers=[])
    trainer.fit(load_model(tiny_model), tok, fmt, _data(8, 1), _data(4, 2), cfg, "accuracy", progress=False)
    assert (seen[0] > 0) == shared


def test_dropout_setting_reaches_attention(tiny_model):
    model = load_model(tiny_model)
    assert set_dropout(model, 0.2) == 2  # two attention layers in the tiny model
    assert all(layer.self_attn.attention_dropout == 0.2 for layer in model.model.layers)


def _json(line):
    import json

    return json.loads(line)


def _tfrecord_count(path) -> int:
    """Records in a TensorBoard event file (TFRecord framing: u64 length, u32 crc, data, u32 crc)."""
    data, count, pos = path.read_bytes(), 0, 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        pos += 12 + length + 4
        count += 1
    return count


def test_frozen_weights_in_bf16_change_no_autocast_result_and_restore_exactly(tiny_model):
    """The only change compaction makes under autocast is each input embedding rounded to bf16: the
    result equals the fp32 model with its embedding rounded, exactly; restoring gives the loaded model."""
    from tunesmith import hardware
    from tunesmith.train.methods import get_method
    from tunesmith.train.precision import compact_frozen, restore_frozen

    torch.manual_seed(0)
    plain = get_method("lora").apply(load_model(tiny_model), TrainConfig()).eval()
    loaded = {k: v.clone() for k, v in plain.state_dict().items()}
    torch.manual_seed(0)
    compact = get_method("lora").apply(load_model(tiny_model), TrainConfig()).eval()
    done = compact_frozen(compact, tiny_model)
    layers = dict(compact.get_base_model().named_modules())
    assert done.names and all(layers[n].weight.dtype == torch.bfloat16 for n in done.names)
    embedding = compact.get_input_embeddings()
    assert embedding.weight.dtype == torch.bfloat16 and done.hooks
    assert all(p.dtype == torch.float32 for p in compact.parameters() if p.requires_grad)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert embedding(ids).dtype == torch.float32  # the residual stream stays fp32
    rounded = plain.get_input_embeddings().weight
    rounded.data = rounded.data.to(torch.bfloat16).float()
    with torch.no_grad(), hardware.autocast(True, torch.device("cpu")):
        torch.testing.assert_close(plain(input_ids=ids).logits, compact(input_ids=ids).logits, atol=0, rtol=0)
    restore_frozen(compact, done, tiny_model)
    assert not embedding._forward_hooks
    for k, b in compact.state_dict().items():
        assert loaded[k].dtype == b.dtype and torch.equal(loaded[k], b), k
