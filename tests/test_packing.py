"""Token-budget batches and packing: the plan's invariants, exact loss/gradient parity, attention isolation."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import GEN_PROJECT, make_texts, write_jsonl
from tunesmith import hardware
from tunesmith.cli import app
from tunesmith.config import TaskConfig, TrainConfig
from tunesmith.config.schema import Project
from tunesmith.data.examples import Example
from tunesmith.models.load import load_model, load_tokenizer
from tunesmith.tasks.cache import common_prefix_len
from tunesmith.tasks.prompts import build_format
from tunesmith.train import loss as loss_module
from tunesmith.train.batching import (
    Encoded,
    batch_stream,
    collate,
    collate_packed,
    encode_for_training,
    epoch_batch_counts,
    epoch_batches,
)
from tunesmith.train.loss import supervised_loss
from tunesmith.train.packing import budget_batches, pack_rows
from tunesmith.train.trainer import fit, make_plan

runner = CliRunner()
PREFIX = [7, 8, 9, 10]  # shared system-text tokens, as real prompts have


def _items(weights=None) -> list[Encoded]:
    """Examples of mixed lengths sharing a prefix; answers start at n_prompt."""
    g = torch.Generator().manual_seed(0)
    shapes = [(9, 6), (5, 5), (12, 8), (6, 5), (7, 6), (10, 9)]
    weights = weights or [1.0] * len(shapes)
    return [Encoded(PREFIX + torch.randint(11, 300, (n - len(PREFIX),), generator=g).tolist(), k, weight=w)
            for (n, k), w in zip(shapes, weights)]


def _rows(items: list[Encoded]) -> list[list[Encoded]]:
    """The items packed three rows deep, equal weights together (as pack_rows keeps them)."""
    capacity = 20
    rows = pack_rows(list(range(len(items))), [len(e.ids) for e in items], capacity, [e.weight for e in items])
    assert len(rows) < len(items), "the test must really pack"
    return [[items[i] for i in row] for row in rows]


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, n = supervised_loss(model, batch)
    loss.backward()
    return loss.detach(), n, {k: p.grad.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("impl,weights,one_row", [
    ("sdpa", None, False), ("eager", None, False), ("sdpa", [1.0, 2.0, 1.0, 2.0, 0.5, 1.0], False),
    ("sdpa", None, True)])
def test_packed_loss_and_gradients_equal_unpacked(tiny_model, monkeypatch, impl, weights, one_row):
    """Same examples, same token-weighted mean: packed rows give the unpacked loss and gradients,
    unpacked with or without the shared-prefix cache. `one_row` runs the flash-attention layout
    (rows laid end to end) through SDPA."""
    monkeypatch.setattr(loss_module, "_one_row", lambda decoder: one_row)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=impl)
    items = _items(weights)
    plain = _loss_and_grads(model, collate(items, 3))
    shared = _loss_and_grads(model, collate(items, 3, prefix_len=common_prefix_len([e.ids for e in items])))
    packed = _loss_and_grads(model, collate_packed(_rows(items), 3))
    for other in (shared, packed):
        assert other[1] == plain[1]
        assert abs(other[0].item() - plain[0].item()) < 1e-4
        assert max((other[2][k] - plain[2][k]).abs().max().item() for k in plain[2]) < 1e-4


def test_a_packed_example_cannot_see_its_neighbour(tiny_model):
    """Changing example A (tokens and length) leaves the hidden states of example B, packed after it, unchanged."""
    model = load_model(tiny_model).eval()
    a, b = _items()[:2]
    other_a = Encoded([5] + [299 - t for t in a.ids[1:]] + [42, 43], a.n_prompt)
    with torch.no_grad():
        first = loss_module._hidden_states(model, collate_packed([[a, b]], 3))         # (1, T, H)
        second = loss_module._hidden_states(model, collate_packed([[other_a, b]], 3))  # (1, T + 2, H)
        alone = loss_module._hidden_states(model, collate([b], 3))                    # (1, len(b), H)
        # Without the position restarts the model attends across the boundary: the check can fail.
        leaky = model.get_decoder()(input_ids=collate_packed([[other_a, b]], 3)["input_ids"]).last_hidden_state
    n_a, n_b = len(a.ids), len(b.ids)
    assert (first[0, :n_a] - second[0, :n_a]).abs().max() > 1e-3, "A's change must show in A"
    assert torch.allclose(first[0, n_a:n_a + n_b], second[0, n_a + 2:], atol=1e-5)
    assert torch.allclose(first[0, n_a:n_a + n_b], alone[0], atol=1e-5)
    assert not torch.allclose(leaky[0, n_a + 2:], second[0, n_a + 2:], atol=1e-3)


@pytest.mark.parametrize("budget,row_tokens", [(64, None), (64, 32), (200, 64), (None, 48)])
def test_plans_keep_budgets_and_use_every_example_once(budget, row_tokens):
    rng = random.Random(3)
    lengths = [rng.randint(3, 32) for _ in range(301)]
    weights = [rng.choice([1.0, 2.0]) for _ in lengths]
    for seed in (0, 1):
        batches = budget_batches(lengths, seed, 4, 5, budget, row_tokens, weights)
        assert batches == budget_batches(lengths, seed, 4, 5, budget, row_tokens, weights)
        used = sorted(i for batch in batches for row in batch for i in row)
        assert used == list(range(len(lengths)))
        for batch in batches:
            sizes = [sum(lengths[i] for i in row) for row in batch]
            assert len(batch) * max(sizes) <= budget if budget else len(batch) <= 5
            assert all(len({weights[i] for i in row}) == 1 for row in batch)
            if row_tokens:
                assert max(sizes) <= row_tokens
    if row_tokens:
        fill = sum(lengths) / (sum(len(batch) for batch in batches) * row_tokens)
        assert fill > 0.75, "packing must fill rows (one example per row would fill about half)"


def _gen_setup(tiny_model, max_length=96):
    tok = load_tokenizer(tiny_model)
    fmt = build_format(TaskConfig(type="generation", instruction="Continue.", max_length=max_length), None, tok)
    rows = make_texts(40, 5)
    examples = [Example(r["text"], r["label"] * (1 + i % 4), f"train.jsonl:{i + 1}") for i, r in enumerate(rows)]
    return tok, fmt, examples


@pytest.mark.parametrize("packing", [False, True])
def test_stream_tensors_stay_in_budget_and_cover_the_epoch(tiny_model, packing):
    tok, fmt, examples = _gen_setup(tiny_model)
    encoded = encode_for_training(tok, fmt, examples)
    cfg = TrainConfig(batch_tokens=128, packing=packing, length_grouping=2, seed=1)
    plan = epoch_batches(encoded, cfg, 0, fmt.max_length)
    prefix_len = common_prefix_len([e.ids[: e.n_prompt] for e in encoded])
    assert prefix_len > 0
    stream = batch_stream(encoded, cfg, tok.pad_token_id, prefix_len, row_tokens=fmt.max_length)
    batches = [next(stream) for _ in plan]
    assert sum(hardware.count_tokens(b) for b in batches) == sum(len(e.ids) for e in encoded)
    # rows x longest row, counted over whole sequences (the shared prefix included)
    assert all(b["input_ids"].shape[0] * (b["input_ids"].shape[1] + len(b.get("prefix_ids", []))) <= 128
               for b in batches)
    assert all(("position_ids" in b) == packing and ("prefix_ids" in b) != packing for b in batches)
    counts = epoch_batch_counts(encoded, cfg.model_copy(update={"epochs": 2.5}), 1, fmt.max_length)
    assert counts == [len(epoch_batches(encoded, cfg, e, fmt.max_length)) for e in range(3)]


def test_default_config_plans_row_batches_as_before():
    cfg = TrainConfig(batch_size=4, epochs=1.5)
    encoded = [Encoded(list(range(n)), 1) for n in range(3, 40)]
    assert epoch_batch_counts(encoded, cfg) is None
    assert make_plan(len(encoded), cfg).total == round(10 * 1.5)
    plan = make_plan(len(encoded), cfg.model_copy(update={"grad_accum": 2}), 1, [9, 7])
    assert (plan.steps_per_epoch, plan.total) == (5, 5 + 2)


def test_packed_fit_trains_the_planned_steps_on_every_example_once(tiny_model):
    """One epoch of packed token-budget batches: the planned step count, and exactly each example's tokens seen."""
    tok, fmt, examples = _gen_setup(tiny_model)
    cfg = TrainConfig(method="lora", epochs=1.0, batch_tokens=192, packing=True, learning_rate=1e-3,
                      trackers=[], early_stopping=False, eval_every=1000)
    encoded = encode_for_training(tok, fmt, examples)
    result = fit(load_model(tiny_model), tok, fmt, examples, examples[:1], cfg, "exact_match", progress=False)
    assert result.stats.total_steps == result.stats.steps == len(epoch_batches(encoded, cfg, 0, fmt.max_length))
    assert result.stats.train_tokens == sum(len(e.ids) for e in encoded)


def _project(**train) -> dict:
    return {"name": "p", "task": {"type": "generation", "max_length": 256}, "data": {"train": "t.jsonl"},
            "objective": {"metric": "exact_match"}, "train": train}


@pytest.mark.parametrize("change,key", [
    ({"train": {"batch_tokens": 255}}, "train.batch_tokens"),
    ({"task": {"type": "classification"}, "objective": {"metric": "accuracy"}, "train": {"packing": True}},
     "train.packing"),
    ({"train": {"packing": True, "method": "prefix_tuning"}}, "train.packing.*virtual tokens"),
    ({"train": {"packing": True, "method": "dpo"}}, "train.packing.*chosen and rejected answers"),
    ({"train": {"packing": True, "method": "kto"}}, "train.packing.*for kto one answer and a label")])
def test_config_refuses_bad_budgets_and_packing(change, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.").replace(r"\.*", ".*")):
        Project.model_validate({**_project(), **change})
    assert Project.model_validate(_project(batch_tokens=256, packing=True)).train.packing


@pytest.mark.parametrize("extra,key", [("  packing: true\n", "(train.packing)"),
                                       ("  batch_tokens: 100\n", "(train.batch_tokens)")])
def test_cli_names_the_key(tmp_path, tiny_model, tiny_project, extra, key):
    text = tiny_project.read_text()
    tiny_project.write_text(text.replace("  batch_size: 4\n", "  batch_size: 4\n" + extra, 1))
    result = runner.invoke(app, ["train", str(tiny_project), "--out", str(tmp_path / "out")])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and lines[0].startswith("error: ") and key in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_cli_trains_a_packed_generation_project(tmp_path, tiny_model):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": r["text"], "completion": r["label"]} for r in make_texts(20, 1)])
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": r["text"], "completion": r["label"]} for r in make_texts(2, 2)])
    project = GEN_PROJECT.format(name="packed", model=tiny_model, method="lora", steps=2, new_tokens=2)
    project = project.replace("  batch_size: 4\n", "  batch_size: 4\n  packing: true\n  batch_tokens: 512\n")
    (tmp_path / "project.yaml").write_text(project)
    result = runner.invoke(app, ["train", str(tmp_path / "project.yaml"), "--out", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output


def test_packed_labels_and_positions_restart_with_each_example():
    """An example's first token is never a target (unpacked nothing precedes it), even with no prompt."""
    batch = collate_packed([[Encoded([1, 2, 3], 0), Encoded([4, 5], 0)], [Encoded([6, 7], 1)]], 0)
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, 7, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
