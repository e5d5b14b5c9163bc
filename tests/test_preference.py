"""Preference tuning: pair parsing, the losses against TRL's own, and training with each method."""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from conftest import toy_pairs
from tunesmith.config.schema import TrainConfig
from tunesmith.data.pairs import load_pairs, parse_pair
from tunesmith.errors import DataError
from tunesmith.train import preference as P

B, T = 4, 6


def _fixed_logps(seed: int = 0):
    """Per-token answer log-probs (2B, T-1) with a ragged answer mask: chosen rows first, then rejected."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i in range(2 * B):
        mask[i, 1 + i % 3:] = 1  # answers of 3-5 tokens after a 1-3 token prompt
    per_token = -torch.rand(2 * B, T - 1, generator=g) * 2 * mask[:, 1:]
    return per_token, mask


class _Accel:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    gather = gather_for_metrics


def _outputs(log_probs):
    zeros = torch.zeros_like(log_probs)
    return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _trainer_self(**kw):
    base = dict(model=SimpleNamespace(training=True), accelerator=_Accel(), aux_loss_enabled=False,
                precompute_ref_logps=True, _metrics=defaultdict(lambda: defaultdict(list)),
                _total_train_tokens=0, _tp_size=1)
    return SimpleNamespace(**{**base, **kw})


# ---- parsing ----------------------------------------------------------------------------------

def test_pair_formats_parse():
    plain = parse_pair({"prompt": "Q?", "chosen": "yes", "rejected": "no"})
    assert (plain.prompt, plain.chosen, plain.rejected, plain.messages) == ("Q?", "yes", "no", None)
    chat = parse_pair({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Q?"}],
                       "chosen": {"role": "assistant", "content": "yes"},
                       "rejected": [{"role": "assistant", "content": "no"}]})
    assert chat.prompt == "Q?" and chat.messages[0]["role"] == "system" and chat.rejected == "no"
    trl_style = parse_pair({"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant",
                                                                                         "content": "a"}],
                            "rejected": [{"role": "assistant", "content": "b"}]})
    assert trl_style.messages == [{"role": "user", "content": "Q?"}]
    kto = parse_pair({"prompt": "Q?", "completion": "yes", "label": False}, kto=True)
    assert kto.label is False and kto.rejected is None


def test_a_pair_prompt_takes_what_a_chat_row_takes():
    """Text parts, tool calls and a tool turn last are read as chat rows read them (data/row_text.py)."""
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    row = {"messages": [{"role": "developer", "content": [{"type": "text", "text": "be"}, {"type": "text",
                                                                                          "text": "brief"}]},
                        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
                        {"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "tool", "content": "sunny"}],
           "chosen": {"role": "assistant", "content": [{"type": "text", "text": "Sunny."}]}, "rejected": "Rain."}
    pair = parse_pair(row)
    assert pair.prompt == "Weather?" and pair.chosen == "Sunny." and [m["role"] for m in pair.messages] == [
        "system", "user", "assistant", "tool"]
    assert pair.messages[0]["content"] == "be\nbrief" and '"weather"' in pair.messages[2]["content"]


@pytest.mark.parametrize("row,reason", [
    ({"prompt": "Q?", "chosen": "yes"}, "missing field 'rejected'"),
    ({"prompt": [{"role": "system", "content": "s"}, {"role": "tool", "content": "t"}], "chosen": "a",
      "rejected": "b"}, "'prompt' needs a user message"),
    ({"prompt": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "chosen": "a",
      "rejected": "b"}, "prompt[0].content: only text parts"),
    ({"prompt": "Q?", "chosen": "yes", "rejected": "yes"}, "same answer"),
    ({"prompt": "Q?", "chosen": "yes", "rejected": "yes "}, "same answer"),   # whitespace at the end is no preference
    ({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "x"}],
      "chosen": "a", "rejected": "b"}, "must be the user's"),
    ({"prompt": "Q?", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "assistant's message"),
])
def test_bad_pair_rows_are_located(tmp_path, row, reason):
    path = tmp_path / "pairs.jsonl"
    good = {"prompt": "P", "chosen": "a", "rejected": "b"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert (e.value.path, e.value.lineno) == (str(path), 2) and reason in str(e.value)


def test_bad_kto_label_is_located(tmp_path):
    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps({"prompt": "P", "completion": "a", "label": "yes"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="true or false") as e:
        load_pairs(path, kto=True)
    assert e.value.lineno == 1


def test_kto_rows_from_a_csv_file_are_read_as_kto(tmp_path):
    """A CSV file can only write its labels as text: "true"/"false" (any case) is a KTO label there too,
    while another word in a `label` column beside a completion stays a plain generation row."""
    from tunesmith.config import TaskConfig
    from tunesmith.data.examples import load_examples

    path = tmp_path / "kto.csv"
    path.write_text("prompt,completion,label\nQ1,good,true\nQ2,bad, FALSE \nQ3,other,maybe\n", encoding="utf-8")
    examples, problems = load_examples(path, TaskConfig(type="generation"))
    assert not problems
    assert [e.desirable for e in examples] == [True, False, None]
    with pytest.raises(DataError, match="got 'maybe'") as e:
        load_pairs(path, kto=True)
    assert e.value.lineno == 4
    # A JSONL file writes booleans as booleans: its text label "false" is the row's own, not a KTO one
    jsonl = tmp_path / "sft.jsonl"
    jsonl.write_text(json.dumps({"prompt": "Q", "completion": "A", "label": "false"}) + "\n", encoding="utf-8")
    examples, problems = load_examples(jsonl, TaskConfig(type="generation"))
    assert not problems and examples[0].desirable is None and examples[0].target == "A"


# ---- the losses against TRL's -----------------------------------------------------------------

def test_dpo_loss_equals_trl():
    from trl.trainer.dpo_trainer import DPOTrainer

    per_token, mask = _fixed_logps(0)
    ref = _fixed_logps(1)[0].sum(1)
    beta = 0.3
    me = P.dpo_loss(per_token[:B].sum(1), per_token[B:].sum(1), ref[:B], ref[B:], beta)
    this = _trainer_self(beta=beta, ld_alpha=None, f_divergence_type="reverse_kl", loss_types=["sigmoid"],
                         loss_weights=[1.0], use_weighting=False, label_smoothing=0.0)
    inputs = {"input_ids": torch.ones(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T),
              "completion_mask": mask, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    theirs = DPOTrainer._compute_loss(this, lambda **kw: _outputs(per_token), inputs, return_outputs=False)
    assert abs(float(me) - float(theirs)) < 1e-5


def test_orpo_loss_equals_trl():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    per_token, mask = _fixed_logps(2)
    counts = mask[:, 1:].sum(1)
    mean = per_token.sum(1) / counts
    nll = -per_token[:B].sum() / counts[:B].sum()
    lam = 0.25
    me = P.orpo_loss(mean[:B], mean[B:], nll, lam)
    losses = ORPOTrainer.odds_ratio_loss(_trainer_self(beta=lam), mean[:B], mean[B:])[0]
    assert abs(float(me) - float(nll - losses.mean())) < 1e-5  # TRL: loss = policy_nll_loss - losses.mean()


def test_simpo_loss_equals_trl():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    per_token, mask = _fixed_logps(3)
    mean = per_token.sum(1) / mask[:, 1:].sum(1)
    beta, gamma = 2.0, 0.7
    me = P.simpo_loss(mean[:B], mean[B:], beta, gamma)
    this = _trainer_self(beta=beta, simpo_gamma=gamma, alpha=0.0, loss_type="simpo", label_smoothing=0.0)
    losses = CPOTrainer.cpo_loss(this, mean[:B], mean[B:])[0]
    assert abs(float(me) - float(losses.mean())) < 1e-5  # SimPO = CPO's simpo loss with cpo_alpha 0


def test_kto_loss_equals_trl():
    from trl.trainer.kto_trainer import KTOTrainer

    per_token, mask = _fixed_logps(4)  # first B rows: completions, last B: mismatched KL completions
    ref = _fixed_logps(5)[0].sum(1) - 3.0  # the policy above the reference: KL estimate > 0
    labels = torch.tensor([True, False, True, True])
    beta, wd, wu = 0.2, 1.5, 0.8
    logps = per_token.sum(1)
    kl = P.kto_kl(logps[B:], ref[B:])
    assert float(kl) > 0  # the fixed numbers exercise the KL term, not only its clamp
    me = P.kto_loss(logps[:B], ref[:B], labels, kl, beta, wd, wu)
    kl_ids = torch.ones(B, T, dtype=torch.long)

    def model(input_ids, **kw):
        return _outputs(per_token[B:] if input_ids is kl_ids else per_token[:B])

    this = _trainer_self(beta=beta, desirable_weight=wd, undesirable_weight=wu, calculate_KL=True, loss_type="kto")
    this._compute_kl_logps = lambda m, batch: KTOTrainer._compute_kl_logps(this, m, batch)
    inputs = {"input_ids": torch.ones(B, T, dtype=torch.long), "attention_mask": torch.ones(B, T),
              "completion_mask": mask[:B], "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones(B, T),
              "KL_completion_mask": mask[B:], "label": labels, "ref_logps": ref[:B], "ref_KL_logps": ref[B:]}
    theirs = KTOTrainer._compute_loss(this, model, inputs, return_outputs=False)
    assert abs(float(me) - float(theirs)) < 1e-5


def test_sequence_logps_counts_answer_tokens_only_and_equal_the_models_own_forward(tiny_model):
    from tunesmith.models.load import load_model

    model = load_model(tiny_model).eval()
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 2, -100, -100]])
    batch = {"input_ids": torch.tensor([[5, 6, 3, 4, 1], [7, 2, 2, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]), "labels": labels}
    with torch.no_grad():
        total, count = P.sequence_logps(model, batch)
        lsm = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().log_softmax(-1)
    want0 = lsm[0, 1, 3] + lsm[0, 2, 4] + lsm[0, 3, 1]
    want1 = lsm[1, 0, 2] + lsm[1, 1, 2]
    assert torch.allclose(total, torch.stack([want0, want1]), atol=1e-5) and count.tolist() == [3, 2]


def test_a_pair_batch_computes_its_shared_prompt_once_with_the_same_logps_and_gradients(tiny_model):
    """collate_pairs puts the prompt start every row shares (here the system text) into prefix_ids; the
    log-probs and the LoRA gradients equal those of the same rows collated without it."""
    from tunesmith.config.schema import TaskConfig
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.tasks.prompts import build_format
    from tunesmith.train.batching import collate
    from tunesmith.train.methods import get_method
    from tunesmith.train.preference_fit import collate_pairs, encode_pairs

    tok = load_tokenizer(tiny_model)
    fmt = build_format(TaskConfig(type="generation", instruction="Answer with one colour word, please."), None, tok)
    pairs = toy_pairs(3)
    encoded = encode_pairs(pairs, tok, fmt)
    shared = collate_pairs(encoded, pairs, tok.pad_token_id)
    plain = collate([e[0] for e in encoded] + [e[1] for e in encoded], tok.pad_token_id)
    assert len(shared["prefix_ids"]) >= 5 and shared["input_ids"].shape[1] < plain["input_ids"].shape[1]
    model = get_method("lora").apply(load_model(tiny_model), TrainConfig())
    lora = [p for p in model.parameters() if p.requires_grad]
    for p in lora:  # LoRA B starts at zero: random values so every adapter weight gets a gradient
        p.data.normal_(0, 0.1)
    got = []
    for batch in (shared, plain):
        logps, counts = P.sequence_logps(model, batch)  # (2B,), (2B,)
        grads = torch.autograd.grad(logps.sum(), lora)
        got.append((logps.detach(), counts, grads))
    (a, ca, ga), (b, cb, gb) = got
    assert torch.equal(ca, cb)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


# ---- training ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["dpo", "orpo", "simpo", "kto"])
def test_each_method_trains_the_adapter_only_and_learns(tiny_model, method):
    from dataclasses import replace

    from tunesmith.config.schema import TaskConfig
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.tasks.prompts import build_format
    from tunesmith.train.preference_fit import fit_pairs, pair_margins

    tokenizer = load_tokenizer(tiny_model)
    fmt = build_format(TaskConfig(type="generation"), None, tokenizer)
    pairs = toy_pairs(24)
    if method == "kto":  # each pair as a desirable and an undesirable row
        train = [r for p in pairs for r in (replace(p, rejected=None, label=True),
                                            replace(p, chosen=p.rejected, rejected=None, label=False))]
    else:
        train = pairs
    model = load_model(tiny_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base_margins = pair_margins(model, tokenizer, fmt, pairs)
    cfg = TrainConfig(method=method, max_steps=30, batch_size=8, learning_rate=5e-3, eval_every=30,
                      early_stopping=False, trackers=[], precision="fp32", beta=0.5)
    result = fit_pairs(model, tokenizer, fmt, train, train[:6] if method == "kto" else pairs, cfg, "preference_accuracy"
                       if method != "kto" else "exact_match", progress=False)
    tuned = result.model
    after = pair_margins(tuned, tokenizer, fmt, pairs)
    assert sum(after) / len(after) > sum(base_margins) / len(base_margins) + 0.1  # chosen became likelier
    assert sum(m > 0 for m in after) > sum(m > 0 for m in base_margins)
    # LoRA: the base weights are untouched, only lora_ parameters trained.
    assert all(p.requires_grad == ("lora_" in n) for n, p in tuned.named_parameters())
    with tuned.disable_adapter():
        for name, value in tuned.get_base_model().state_dict().items():
            key = name.replace("base_layer.", "")
            if key in before:
                assert torch.equal(value, before[key]), name


def test_a_multi_turn_pair_prompt_supervises_only_the_answer(tiny_model):
    """Earlier assistant turns of a pair's prompt are context, whatever task.train_on trains: ORPO,
    SimPO and KTO average over the answer tokens as TRL does."""
    from tunesmith.config.schema import TaskConfig
    from tunesmith.models.load import load_tokenizer
    from tunesmith.models.tokens import text_ids
    from tunesmith.tasks.prompts import build_format
    from tunesmith.train.batching import IGNORE
    from tunesmith.train.preference_fit import collate_pairs, encode_pairs

    tok = load_tokenizer(tiny_model)
    fmt = build_format(TaskConfig(type="chat", train_on="all_assistant_turns"), None, tok)
    pair = parse_pair({"messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "hello card bank"},
                                    {"role": "user", "content": "why"}], "chosen": "money", "rejected": "help"})
    batch = collate_pairs(encode_pairs([pair], tok, fmt), [pair], tok.pad_token_id)
    supervised = [[t for t, lab in zip(row, labels) if lab != IGNORE]
                  for row, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist())]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert supervised == [text_ids(tok, "money") + [end], text_ids(tok, "help") + [end]]


# ---- run-level training settings in the preference loop ---------------------------------------------

def _dpo_fit(path, tmp_path=None, **train):
    """Three DPO steps on toy pairs; `train` overrides the TrainConfig."""
    from tunesmith.config.schema import TaskConfig
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.tasks.prompts import build_format
    from tunesmith.train.preference_fit import fit_pairs

    tokenizer = load_tokenizer(path)
    fmt = build_format(TaskConfig(type="generation"), None, tokenizer)
    cfg = TrainConfig(**{"method": "dpo", "max_steps": 3, "batch_size": 4, "learning_rate": 5e-3, "eval_every": 3,
                         "early_stopping": False, "trackers": [], "precision": "fp32", **train})
    pairs = toy_pairs(12)
    if cfg.method == "kto":  # each pair as a desirable and an undesirable row; the pairs for the figures
        from dataclasses import replace

        rows = [r for p in pairs for r in (replace(p, rejected=None, label=True),
                                           replace(p, chosen=p.rejected, rejected=None, label=False))]
        return fit_pairs(load_model(path), tokenizer, fmt, rows, rows[:4], cfg, "preference_accuracy",
                         out_dir=tmp_path, progress=False, val_pairs=pairs[:4])
    return fit_pairs(load_model(path), tokenizer, fmt, pairs, pairs[:4], cfg, "preference_accuracy",
                     out_dir=tmp_path, progress=False)


def test_gradient_checkpointing_in_the_preference_loop_keeps_the_losses(tiny_model, monkeypatch):
    """train.gradient_checkpointing: true/false as set, auto from the memory estimate (2 x batch_size
    sequences a step), resolved by grad_checkpointing.wanted as in the supervised loop; same losses."""
    from tunesmith.models import estimate
    from tunesmith.train import grad_checkpointing

    calls = []
    real = grad_checkpointing.checkpoint
    monkeypatch.setattr(grad_checkpointing, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(estimate, "device_memory_mb", lambda dev: 1e7)  # auto: fits, no checkpointing
    off, large = _dpo_fit(tiny_model, gradient_checkpointing=False), _dpo_fit(tiny_model)
    assert not calls and not off.stats.gradient_checkpointing and not large.stats.gradient_checkpointing
    on = _dpo_fit(tiny_model, gradient_checkpointing=True)
    assert calls and on.stats.gradient_checkpointing
    monkeypatch.setattr(estimate, "device_memory_mb", lambda dev: 1000.0)  # auto: does not fit
    assert _dpo_fit(tiny_model).stats.gradient_checkpointing
    for key in ("train_loss", "val_loss", "preference_accuracy"):
        assert [h[key] for h in on.history] == pytest.approx([h[key] for h in off.history], abs=1e-5)
    # auto is sized for the pair batch (chosen and rejected rows in one forward) and priced as the
    # adapter train.preference.adapter trains.
    seen = []
    monkeypatch.setattr(grad_checkpointing, "fits_without",
                        lambda m, method, batch, *a: seen.append((method, batch)) or True)
    _dpo_fit(tiny_model, batch_size=3)
    _dpo_fit(tiny_model, batch_size=2, preference={"adapter": "full"}, learning_rate=1e-5)
    assert seen == [("lora", 6), ("full", 4)]


@pytest.mark.parametrize("setting", [{"neftune_alpha": 5.0}, {"dropout": 0.5}])
def test_neftune_and_dropout_act_on_the_policy_forward_only(tiny_model, tmp_path, setting):
    """At step 1 the LoRA policy equals its reference, so DPO's loss is exactly ln 2; NEFTune noise or
    dropout on the policy's training forward (never on the eval-mode reference) moves it off ln 2."""
    def first_loss(out, **train):
        _dpo_fit(tiny_model, out, **train)
        return json.loads((out / "train_log.jsonl").read_text().splitlines()[0])["loss"]

    assert first_loss(tmp_path / "plain") == pytest.approx(0.693147, abs=2e-6)
    assert abs(first_loss(tmp_path / "set", **setting) - 0.693147) > 1e-4


def test_the_preference_loop_writes_to_the_trackers(tiny_model, tmp_path):
    _dpo_fit(tiny_model, tmp_path, trackers=["tensorboard"])
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("key,value", [("batch_tokens", 1024), ("label_smoothing", 0.1), ("checkpoint_every", 2),
                                       ("keep_checkpoints", 3), ("batch_size", 1)])
def test_train_keys_the_preference_loop_lacks_are_refused_by_name(tmp_path, key, value):
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError

    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": "b", "label": true}\n', encoding="utf-8")
    base = "name: demo\ntask:\n  type: generation\nobjective:\n  metric: exact_match\ndata:\n  train: train.jsonl\n"
    method = "kto" if key == "batch_size" else "dpo"  # batch_size 1: KTO's KL estimate needs another row
    (tmp_path / "project.yaml").write_text(base + f"train:\n  method: {method}\n  {key}: {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "project.yaml")
    line = info.value.line()
    assert line.startswith("error: ") and f"(train.{key})" in line and "project.yaml:10 " in line, line
    # The same value with a supervised method (or batch_size 1 with DPO) is accepted.
    (tmp_path / "project.yaml").write_text(base + f"train:\n  method: {'dpo' if method == 'kto' else 'lora'}\n"
                                           f"  {key}: {value}\n")
    assert getattr(load_config(tmp_path / "project.yaml").train, key) == value


@pytest.mark.parametrize("lines,key", [("  beta: 0.2\n", "train.beta"),
                                       ("  preference:\n    adapter: full\n", "train.preference.adapter"),
                                       ("  preference:\n    simpo_gamma: 1.0\n", "train.preference.simpo_gamma")])
def test_preference_settings_under_a_supervised_method_are_refused_by_name(tmp_path, lines, key):
    """They would be ignored: the config most likely meant a preference method. Their defaults pass (a saved
    config.yaml spells them out), and the same lines train with a preference method."""
    from tunesmith.config import derive, load_config
    from tunesmith.errors import ConfigError

    base = "name: demo\ntask:\n  type: generation\nobjective:\n  metric: exact_match\ndata:\n  train: train.jsonl\n"
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n', encoding="utf-8")
    (tmp_path / "project.yaml").write_text(base + "train:\n  method: lora\n" + lines)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "project.yaml")
    line = info.value.line()
    assert line.startswith(f"error: {key} is read only by the preference methods") and f"({key})" in line, line
    assert f"project.yaml:{9 + lines.count(chr(10))} " in line, line
    defaults = "  beta: 0.1\n  preference:\n    adapter: lora\n    simpo_gamma: 0.5\n"
    (tmp_path / "project.yaml").write_text(base + "train:\n  method: lora\n" + defaults)
    assert load_config(tmp_path / "project.yaml").train.method == "lora"
    (tmp_path / "project.yaml").write_text(base + "train:\n  method: simpo\n" + lines)
    assert load_config(tmp_path / "project.yaml").train.method == "simpo"
    # A run's saved config.yaml (read without check_files) from before the check still loads, and compare
    # may derive a supervised method from a preference config that sets them.
    (tmp_path / "project.yaml").write_text(base + "train:\n  method: lora\n" + lines)
    assert load_config(tmp_path / "project.yaml", check_files=False).train.method == "lora"
    (tmp_path / "project.yaml").write_text(base + "train:\n  method: dpo\n" + lines)
    assert derive(load_config(tmp_path / "project.yaml"), {"train.method": "lora"}).train.method == "lora"


@pytest.mark.parametrize("method,adapter", [("dpo", "lora"), ("kto", "lora"), ("dpo", "full"), ("orpo", "dora")])
def test_preference_training_keeps_frozen_weights_in_bf16_with_the_same_results(tiny_model, monkeypatch, method,
                                                                                 adapter):
    """Under bf16 the frozen weights (the policy's, and a full fine-tuning reference copy whole) are bf16
    while training; DoRA keeps fp32. The run equals one with fp32 frozen weights whose input embedding was
    rounded to bf16 (the one change), and the returned model holds the loaded fp32 frozen weights."""
    from tunesmith.models.load import load_model
    from tunesmith.train import precision

    real = precision.compact_frozen

    def run(compact: bool):
        seen = []

        def spy(model, checkpoint):
            done = real(model, checkpoint) if compact else precision.Compacted()
            weight = model.get_input_embeddings().weight
            if not compact and not weight.requires_grad:
                weight.data = weight.data.to(torch.bfloat16).float()
            seen.append({p.dtype for n, p in model.named_parameters() if not p.requires_grad and "proj" in n})
            return done

        monkeypatch.setattr(precision, "compact_frozen", spy)
        result = _dpo_fit(tiny_model, method=method, precision="bf16", preference={"adapter": adapter})
        return result, seen

    compacted, seen = run(True)
    if adapter == "dora":
        assert seen == []  # DoRA normalises base + update itself: its frozen weights keep full precision
        return
    # LoRA: the policy's frozen base. Full: the reference copy, whole, then the policy (nothing frozen).
    assert seen == ([{torch.bfloat16}] if adapter == "lora" else [{torch.bfloat16}, set()])
    plain, _ = run(False)
    for key in ("train_loss", "val_loss", "preference_accuracy"):
        assert [h[key] for h in compacted.history] == pytest.approx([h[key] for h in plain.history], abs=1e-5)
    loaded = load_model(tiny_model).state_dict()
    for name, value in compacted.model.state_dict().items():
        assert value.dtype == torch.float32, name
        key = name.replace("base_model.model.", "").replace("base_layer.", "")
        if adapter == "lora" and "lora_" not in name and key in loaded:
            assert torch.equal(value, loaded[key]), name  # the frozen weights, back in fp32, bit for bit


def test_with_neftune_each_pair_row_embeds_its_whole_prompt(tiny_model):
    """NEFTune's noise is scaled by a row's whole length and drawn per row: training batches then carry
    no shared prefix (without it they do); scoring batches (eval mode, no noise) always may."""
    from tunesmith.config.schema import TaskConfig
    from tunesmith.models.load import load_tokenizer
    from tunesmith.tasks.prompts import build_format
    from tunesmith.train.preference_fit import pair_batches

    tok = load_tokenizer(tiny_model)
    fmt = build_format(TaskConfig(type="generation", instruction="Answer with one colour word."), None, tok)
    plain = next(pair_batches(toy_pairs(6), tok, fmt, TrainConfig(method="dpo", batch_size=3)))
    noisy = next(pair_batches(toy_pairs(6), tok, fmt, TrainConfig(method="dpo", batch_size=3, neftune_alpha=5.0)))
    assert "prefix_ids" in plain and "prefix_ids" not in noisy
    assert noisy["input_ids"].shape[1] == plain["input_ids"].shape[1] + len(plain["prefix_ids"])
