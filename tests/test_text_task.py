"""task.type text (continued pre-training): every token trained on, long documents chunked, packing
exact, held-out perplexity from the model's own forward, and the whole CLI run on a tiny model."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import FILLER, write_jsonl
from tunesmith.cli import app
from tunesmith.config import ObjectiveConfig, TaskConfig, load_config
from tunesmith.data.examples import Example, load_examples
from tunesmith.errors import ConfigError
from tunesmith.evaluate.objective import judge
from tunesmith.evaluate.text import document_losses
from tunesmith.models.load import load_model, load_tokenizer
from tunesmith.models.tokens import adds_bos
from tunesmith.tasks.metrics import compute_metrics
from tunesmith.tasks.prompts import PromptFormat
from tunesmith.tasks.text import chunk_ids, document_ids, text_chunks
from tunesmith.train.batching import IGNORE, collate, collate_packed
from tunesmith.train.loss import supervised_loss
from tunesmith.train.packing import pack_rows
from tunesmith.train.text import encode_text

runner = CliRunner()


def _docs(n: int, seed: int, words: tuple[int, int] = (4, 30)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(FILLER) for _ in range(rng.randint(*words))) for _ in range(n)]


def _fmt(max_length: int) -> PromptFormat:
    return PromptFormat("text", "", None, False, max_length)


def test_loss_mask_covers_every_token(tiny_model):
    """labels == input_ids on every real token (no prompt, no template), IGNORE only on padding."""
    tok = load_tokenizer(tiny_model)
    encoded = encode_text(tok, _fmt(64), [Example(d, "", "x") for d in _docs(5, 0)])
    batch = collate(encoded, tok.pad_token_id)
    real = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])
    assert (batch["labels"][~real] == IGNORE).all() and (~real).any(), "the batch must hold padding"
    assert all(e.n_prompt == 0 for e in encoded)


def test_document_ends_with_eos_and_gets_bos_only_when_the_model_expects_it(tiny_model):
    tok = load_tokenizer(tiny_model)
    text = "the bank <|im_end|> money"  # a control-token string in a document stays plain text
    ids = document_ids(tok, text)
    assert not adds_bos(tok) and ids[0] != tok.bos_token_id
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    from tokenizers.processors import TemplateProcessing

    bos = tok.bos_token
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)])
    assert adds_bos(tok) and document_ids(tok, text) == [tok.bos_token_id] + ids


@pytest.mark.parametrize("n,length", [(10, 4), (11, 4), (4, 4), (3, 16), (40, 2), (97, 16)])
def test_chunks_cover_every_target_once_and_fit(n, length):
    """Chunks of at most `length`; their targets (all but each chunk's first token) are ids[1:] exactly."""
    ids = list(range(100, 100 + n))
    chunks = chunk_ids(ids, length)
    assert all(2 <= len(c) <= length or len(chunks) == 1 for c in chunks)
    assert [t for c in chunks for t in c[1:]] == ids[1:]
    assert all(a[-1] == b[0] for a, b in zip(chunks, chunks[1:]))  # one token of context carried over


def test_a_long_document_is_chunked_not_truncated(tmp_path, tiny_model):
    tok = load_tokenizer(tiny_model)
    long_doc = _docs(1, 3, words=(120, 120))[0]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"body": long_doc}, {"body": "the bank"}])
    examples, problems = load_examples(path, TaskConfig(type="text", text_field="body"))
    assert not problems and examples[0].input == long_doc and examples[0].target == ""
    ids = document_ids(tok, long_doc)
    assert len(ids) > 3 * 32
    encoded = encode_text(tok, _fmt(32), examples)
    assert len(encoded) == len(chunk_ids(ids, 32)) + 1 and all(len(e.ids) <= 32 for e in encoded)
    assert [t for e in encoded[:-1] for t in e.ids[1:]] == ids[1:]


def test_packed_loss_equals_unpacked_loss(tiny_model):
    """Chunks of several documents packed into shared rows: the same token-weighted loss as one
    document per row, within 1e-4; with positions that do not restart (cross-document attention) it differs."""
    tok = load_tokenizer(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    encoded = encode_text(tok, _fmt(24), [Example(d, "", "x") for d in _docs(8, 1, words=(3, 40))])
    rows = pack_rows(list(range(len(encoded))), [len(e.ids) for e in encoded], 48)
    assert len(rows) < len(encoded), "the test must really pack"
    packed_batch = collate_packed([[encoded[i] for i in row] for row in rows], tok.pad_token_id)
    with torch.no_grad():
        plain, n_plain = supervised_loss(model, collate(encoded, tok.pad_token_id))
        packed, n_packed = supervised_loss(model, packed_batch)
        flat = torch.arange(packed_batch["input_ids"].shape[1]).expand_as(packed_batch["input_ids"])
        leaky, _ = supervised_loss(model, {**packed_batch, "position_ids": flat.contiguous()})
    assert n_packed == n_plain == sum(len(e.ids) - 1 for e in encoded)
    assert abs(packed.item() - plain.item()) < 1e-4
    assert abs(leaky.item() - plain.item()) > 1e-3


def test_perplexity_is_exp_mean_nll_of_the_models_own_forward(tiny_model):
    """document_losses + the registered metrics equal a plain forward's cross-entropy, chunk by chunk."""
    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model).eval()
    texts = _docs(4, 2, words=(3, 12)) + _docs(1, 5, words=(60, 60))  # the last one is chunked
    tokens, nll = document_losses(model, tok, texts, max_length=32, batch_size=3)
    expected_tokens, expected_nll = [], []
    with torch.no_grad():
        for text in texts:
            total, count = 0.0, 0
            for chunk in text_chunks(tok, text, 32):
                ids = torch.tensor([chunk])
                logits = model(input_ids=ids).logits[0, :-1]                       # (T-1, V)
                total += F.cross_entropy(logits.float(), ids[0, 1:], reduction="sum").item()
                count += len(chunk) - 1
            expected_tokens.append(count)
            expected_nll.append(total)
    assert len(text_chunks(tok, texts[-1], 32)) > 1
    assert tokens == expected_tokens
    assert max(abs(a - b) for a, b in zip(nll, expected_nll)) < 1e-3
    figures = compute_metrics("text", tokens, nll)
    mean_nll = sum(expected_nll) / sum(expected_tokens)
    assert figures["token_loss"] == pytest.approx(mean_nll, abs=1e-5)
    assert figures["perplexity"] == pytest.approx(math.exp(mean_nll), rel=1e-5)


def test_objective_on_perplexity_is_lower_is_better():
    base, tuned = {"perplexity": 40.0}, {"perplexity": 30.0}
    comparison = {"perplexity": {"diff": -10.0, "ci_low": -14.0, "ci_high": -6.0}}
    verdict = judge(ObjectiveConfig(metric="perplexity", target=35.0, min_gain=5.0, min_gain_on="ci_low"),
                    base, tuned, comparison)
    assert verdict.met and [c.op for c in verdict.criteria] == ["<=", ">="]
    assert verdict.criteria[1].value == 6.0  # the reduction's lower end
    assert judge(ObjectiveConfig(metric="perplexity", min_gain=11.0), base, tuned).met is False
    assert judge(ObjectiveConfig(metric="perplexity", target=25.0), base, tuned).met is False


TEXT_PROJECT = """name: {name}
model: {model}
task:
  type: text
  max_length: 24
data:
  train: train.jsonl
  test: test.jsonl
  validation: 0.2
objective:
  metric: perplexity
  min_gain: 0.0
train:
  method: {method}
  max_steps: 4
  eval_every: 2
  batch_size: 4
  learning_rate: 0.01
  packing: true
eval:
  forgetting_probe: false
  bootstrap_resamples: 200
"""


@pytest.mark.parametrize("extra,key", [("task:\n  labels: [a, b]\n", "task.labels"),
                                       ("task:\n  prompt_field: q\n", "task.prompt_field"),
                                       ("optimize:\n  enabled: true\n", "optimize.enabled")])
def test_config_refuses_keys_that_mean_nothing_for_text(tmp_path, tiny_model, extra, key):
    text = TEXT_PROJECT.format(name="t", model=tiny_model, method="lora")
    section = extra.split(":")[0] + ":\n"
    text = text.replace(section, extra, 1) if section in text else text + extra
    write_jsonl(tmp_path / "train.jsonl", [{"text": "the bank"}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "the bank"}])
    (tmp_path / "project.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "project.yaml")
    assert key in str(info.value)


def test_cli_runs_a_text_project_end_to_end(tmp_path, tiny_model):
    """data -> packed training -> perplexity of both models with a paired interval -> verdict -> report."""
    write_jsonl(tmp_path / "train.jsonl", [{"text": d} for d in _docs(30, 7, words=(4, 40))])
    write_jsonl(tmp_path / "test.jsonl", [{"text": d} for d in _docs(6, 8, words=(4, 40))])
    (tmp_path / "project.yaml").write_text(TEXT_PROJECT.format(name="cpt", model=tiny_model, method="lora"))
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(tmp_path / "project.yaml"), "--out", str(out), "-q"])
    assert result.exit_code in (0, 3), result.output
    metrics = json.loads((out / "metrics.json").read_text())
    for side in ("baseline", "finetuned"):
        figures = metrics[side]
        assert figures["perplexity"] == pytest.approx(math.exp(figures["token_loss"]), rel=1e-5)
    row = metrics["comparison"]["perplexity"]
    assert row["ci_low"] <= row["diff"] <= row["ci_high"] and row["test"] == "paired bootstrap"
    assert row["diff"] == pytest.approx(metrics["finetuned"]["perplexity"] - metrics["baseline"]["perplexity"],
                                        abs=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    criterion = summary["objective"]["criteria"][0]
    assert criterion["name"] == "perplexity_gain"
    assert criterion["value"] == pytest.approx(-row["diff"], abs=1e-5)  # the reduction
    predictions = [json.loads(line) for line in (out / "predictions/test.jsonl").read_text().splitlines()]
    assert len(predictions) == 6 and all(p["tokens"] > 0 for p in predictions)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("perplexity" in r for r in log)
    assert (out / "report.html").is_file()


def test_a_leaderboard_and_the_best_checkpoint_put_the_lowest_perplexity_first(tmp_path):
    """compare ranked the highest perplexity first and called it best; a NaN perplexity beat every real one
    as the best checkpoint ((NaN > x) is False, "better" for a lower-is-better figure)."""
    from tunesmith.evaluate.leaderboard import rank
    from tunesmith.tasks.metrics import better

    entries = [{"method": m, "run_dir": str(tmp_path / m), "metric": "perplexity", "value": v}
               for m, v in (("lora", 12.3), ("full", 8.1), ("dora", None), ("ia3", float("nan")))]
    assert [e["method"] for e in rank(entries, "text")][:2] == ["full", "lora"]
    accuracy = [{"method": m, "run_dir": str(tmp_path / m), "metric": "accuracy", "value": v}
                for m, v in (("lora", 0.6), ("full", 0.8), ("dora", None))]
    assert [e["method"] for e in rank(accuracy, "classification")] == ["full", "lora", "dora"]
    nan, real = {"perplexity": float("nan"), "val_loss": 9.0}, {"perplexity": 5.0, "val_loss": 1.0}
    assert not better(nan, real, "perplexity", "val_loss") and better(real, nan, "perplexity", "val_loss")
    assert not better({"accuracy": float("nan"), "val_loss": 0.0}, {"accuracy": 0.1, "val_loss": 1.0},
                      "accuracy", "val_loss")
