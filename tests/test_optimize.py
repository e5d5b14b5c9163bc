"""Optimisation variants: the maths of each (quantisation, pruning, layer removal, distillation
loss, selection) on tiny tensors, and `tunesmith optimize` end to end on tiny trained runs."""

from __future__ import annotations

import json
import mmap
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import PROJECT, make_texts, write_jsonl
from tunesmith.cli import app
from tunesmith.optimize.engines import dynamic_linear, load_variant, quantize_weight
from tunesmith.optimize.layers import evenly_spaced, keep_count, keep_layers
from tunesmith.optimize.result import OptimizeResult, SkippedVariant, VariantRow
from tunesmith.optimize.select import select_variant
from tunesmith.optimize.variants import VARIANTS
from tunesmith.optimize.variants.pruned import magnitude_masks
from tunesmith.train.loss import distillation_loss

runner = CliRunner()
ENTRY_KEYS = {"name", "path", "size_mb", "latency_p50_ms", "latency_p95_ms", "throughput_per_s", "peak_rss_mb",
              "metrics", "quality_delta", "parity_ok"}


def test_int8_weights_round_trip_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(24, 40)
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (24,)
    assert (q.float() * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-6
    assert q.abs().amax(dim=1).eq(127).all(), "each channel's largest weight maps to +-127"


def test_dynamic_int8_linear_matches_fp32():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    q, scale = quantize_weight(layer.weight)
    x = torch.randn(5, 64)
    out = dynamic_linear(q, scale, layer.bias)(x)
    assert F.cosine_similarity(out.flatten(), layer(x).detach().flatten(), dim=0) > 0.999


def test_magnitude_masks_zero_the_smallest_share(tiny_model):
    from tunesmith.models.load import load_model

    model = load_model(tiny_model)
    masks = magnitude_masks(model, 0.3)
    for name, mask in masks.items():
        w = model.get_submodule(name).weight.detach().abs()
        assert abs((~mask).float().mean().item() - 0.3) < 0.02
        assert w[~mask].max() <= w[mask].min()


def test_keep_layers_renumbers_and_still_runs(tiny_model):
    from tunesmith.models.load import load_model

    model = load_model(tiny_model)
    keep_layers(model, [1])
    assert model.config.num_hidden_layers == 1 and model.model.layers[0].self_attn.layer_idx == 0
    out = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    assert out.logits.shape[:2] == (1, 3)
    assert evenly_spaced(30, 15)[0] == 0 and evenly_spaced(30, 15)[-1] == 29 and len(evenly_spaced(30, 15)) == 15
    assert keep_count(load_model(tiny_model), 0.25) == 1  # 2 layers: at least one goes, one stays


def test_distillation_loss_limits():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    assert torch.allclose(distillation_loss(s, t, y, alpha=0.0), F.cross_entropy(s, y))
    assert distillation_loss(t, t, y, alpha=1.0).abs() < 1e-6
    kl = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="batchmean") * 4
    assert torch.allclose(distillation_loss(s, t, y, temperature=2.0, alpha=1.0), kl, atol=1e-6)


def _row(name, p50, ok=True, met=True, delta=0.0, **notes) -> VariantRow:
    return VariantRow(name, f"variants/{name}", "hf", 10.0, 0.5, p50, p50 * 2, 8.0, 16, 300.0, {"accuracy": 0.9},
                      delta, [delta - 0.1, delta + 0.1], 1.0, notes, ok, met, [])


def test_selection_takes_the_fastest_offered_variant():
    e = _row
    entries = [e("fp32", 100), e("int8", 50, delta=-0.01), e("pruned", 20, ok=False), e("bf16", 40, met=False)]
    name, reason = select_variant(entries)
    assert name == "int8" and "2.00x" in reason
    assert select_variant([e("fp32", 100), e("int8", 50, ok=False)])[0] == "fp32"
    assert select_variant([e("fp32", 100, met=False)])[0] is None


def test_a_variant_is_never_judged_on_the_fp32_models_calibration():
    """An int4 variant met `ece <= 0.05` with the fp32 model's ECE: its own was never measured."""
    from tunesmith.config.schema import Bound, ObjectiveConfig
    from tunesmith.optimize.select import variant_verdict

    objective = ObjectiveConfig(metric="accuracy", constraints={"ece": Bound(max=0.05)})
    finetuned = {"accuracy": 0.91, "ece": 0.02}
    assert variant_verdict(objective, {"accuracy": 0.5}, finetuned, _row("fp32", 100), {}).met
    quantized = variant_verdict(objective, {"accuracy": 0.5}, finetuned, _row("int4", 50), {})
    assert not quantized.met and next(c for c in quantized.criteria if c.name == "ece").value is None


def test_variant_rows_write_variants_json_and_optimize_json_in_their_order():
    row = _row("merged", 40.0, parity="exact", max_logit_diff=1e-6)
    assert list(row.to_json()) == ["name", "path", "engine", "size_mb", "load_seconds", "latency_p50_ms",
                                   "latency_p95_ms", "throughput_per_s", "throughput_batch_size", "peak_rss_mb",
                                   "metrics", "quality_delta", "quality_delta_ci", "agreement", "parity",
                                   "max_logit_diff", "parity_ok", "objective_met", "criteria"]
    assert row.to_json()["max_logit_diff"] == 1e-6 and row.to_json()["latency_p95_ms"] == 80.0
    result = OptimizeResult("accuracy", "merged", "fastest", "variants/merged",
                            [SkippedVariant("ct2", "no converter")], [_row("fp32", 100.0), row])
    assert result.to_json() == {"objective_metric": "accuracy", "selected": "merged", "reason": "fastest",
                                "selected_path": "variants/merged",
                                "skipped": [{"name": "ct2", "reason": "no converter"}]}


def test_examples_per_second_rounds_and_has_no_figure_without_time():
    from tunesmith import hardware

    assert hardware.examples_per_second(10, 3.0) == 3.33
    assert hardware.examples_per_second(7, 0.0) is None


def test_save_common_writes_a_self_contained_variant_folder(tiny_model, tmp_path):
    from tunesmith.config import TaskConfig
    from tunesmith.models.load import load_tokenizer
    from tunesmith.optimize.predictor import VARIANT_FILE, save_common
    from tunesmith.tasks.prompts import PromptFormat, build_format

    tok = load_tokenizer(tiny_model)
    fmt = build_format(TaskConfig(instruction="Classify."), ["alpha", "beta"], tok)
    save_common(tok, fmt, tmp_path, engine="onnx", quantization="none")
    assert json.loads((tmp_path / VARIANT_FILE).read_text()) == {"engine": "onnx", "quantization": "none"}
    assert PromptFormat.from_json(json.loads((tmp_path / "prompt.json").read_text())) == fmt
    assert load_tokenizer(tmp_path).encode("red alpha") == tok.encode("red alpha")


def _trained_run(tmp_path, tiny_model, method: str) -> str:
    write_jsonl(tmp_path / "train.jsonl", make_texts(30, 1))
    write_jsonl(tmp_path / "test.jsonl", make_texts(9, 2))
    extra = "optimize:\n  latency_samples: 3\n  prune: {recovery_steps: 2}\n  distill: {steps: 2, minilm_epochs: 1}\n"
    (tmp_path / "project.yaml").write_text(PROJECT.format(model=tiny_model, method=method) + extra, encoding="utf-8")
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(tmp_path / "project.yaml"), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return str(out)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model):
    return _trained_run(tmp_path_factory.mktemp("opt-lora"), tiny_model, "lora")


def test_every_variant_is_built_measured_and_loadable(lora_run):
    from pathlib import Path

    result = runner.invoke(app, ["optimize", lora_run, "--variants", ",".join(VARIANTS), "--quiet"])
    assert result.exit_code == 0, result.output
    run = Path(lora_run)
    entries = json.loads((run / "variants.json").read_text())
    assert [e["name"] for e in entries] == ["fp32", *VARIANTS]
    assert all(ENTRY_KEYS <= set(e) for e in entries)
    fp32, merged = entries[0], entries[1]
    assert fp32["path"] == "model" and fp32["quality_delta"] == 0 and fp32["agreement"] == 1
    # The merge computes the same function: same predictions on every test row, logits within 1e-3.
    assert merged["agreement"] == 1.0 and merged["max_logit_diff"] < 1e-3 and merged["parity_ok"]
    for e in entries[1:]:
        assert (run / e["path"] / "variant.json").is_file()
        predictor = load_variant(run / e["path"])
        from tunesmith.data.examples import Example

        rows = [json.loads(line) for line in (run / "data" / "test.jsonl").read_text().splitlines()]
        preds = predictor.predict([Example.from_json(r) for r in rows], 4).texts
        assert preds[:3] and set(preds) <= {"alpha", "beta", "gamma"}
        delta = e["metrics"]["accuracy"] - fp32["metrics"]["accuracy"]
        assert e["quality_delta"] == pytest.approx(delta, abs=1e-6)
        assert e["parity_ok"] == (e["name"] in ("merged", "onnx") or delta >= -0.02 - 1e-9)
    sizes = {e["name"]: e["size_mb"] for e in entries}
    assert sizes["int8"] < sizes["merged"] and sizes["bf16"] <= 0.55 * sizes["merged"]
    assert sizes["int8_weights"] == pytest.approx(sizes["int8"], rel=0.01)
    from safetensors.torch import load_file

    def quantized_bytes(name: str) -> int:
        tensors = load_file(str(run / f"variants/{name}/model.safetensors"))
        return sum(t.numel() for k, t in tensors.items() if k.endswith((".weight_int8", ".weight_int4")))
    assert quantized_bytes("int4_weights") * 2 == quantized_bytes("int8_weights")  # two weights per byte
    assert json.loads((run / "variants/int4_weights/variant.json").read_text())["group_size"] == 32
    by_name = {e["name"]: e for e in entries}
    # The LoRA change rides next to the int4 base, exactly (its rank is at most the adapter's).
    assert by_name["int4_weights"]["adapter_kept"] and by_name["int4_weights"]["delta_error"] < 1e-4
    assert by_name["distilled"]["student_layers"] == [1] and by_name["pruned_layers"]["layers"] == 1
    assert by_name["ct2"]["scheme"].startswith("CTranslate2") and 0 < sizes["ct2"] < sizes["merged"]
    # The ONNX export computes the same function (checked like a merge); ORT int8 runs integer matmuls.
    assert by_name["onnx"]["parity"] == "exact" and by_name["onnx"]["max_logit_diff"] < 1e-3
    assert by_name["onnx"]["agreement"] == 1.0 and by_name["onnx"]["parity_ok"] and sizes["onnx"] > 0
    import onnx

    ops = {n: {node.op_type for node in onnx.load(str(run / f"variants/{n}/model.onnx")).graph.node}
           for n in ("onnx", "onnx_int8")}
    assert "MatMulInteger" in ops["onnx_int8"] and "MatMulInteger" not in ops["onnx"]
    assert by_name["onnx_int8"]["float_matmuls"] == 2  # the tiny model's two MLP output projections
    optimize = json.loads((run / "optimize.json").read_text())
    assert optimize["selected"] in {e["name"] for e in entries if e["parity_ok"] and e["objective_met"]}
    assert "Inference variants" in (run / "report.html").read_text()
    assert "selected:" in result.output


def test_weight_only_int8_linear_matches_fp32():
    from tunesmith.optimize.engines import WeightOnlyInt8Linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(2, 5, 64)
    q, scale = quantize_weight(layer.weight)
    for dtype, tol in ((torch.float32, 0.02), (torch.bfloat16, 0.05)):
        out = WeightOnlyInt8Linear(q, scale, layer.bias, dtype)(x)
        assert out.shape == (2, 5, 32) and out.dtype == torch.float32
        assert (out - layer(x)).abs().max() < tol * layer(x).abs().max()


def test_weight_only_int4_linear_matches_fp32():
    from tunesmith.optimize.engines import WeightOnlyInt4Linear, pack_nibbles, quantize_int4, unpack_nibbles

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(2, 5, 64)
    q, scale_zeros = quantize_int4(layer.weight, 32)
    assert q.shape == (32, 64) and int(q.max()) <= 15 and scale_zeros.shape == (2, 32, 2)
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q) and pack_nibbles(q).shape == (32, 32)
    # The kernel's convention: weight ~ (q - 8) * scale + zero, within half a step of the grid.
    scale, zero = scale_zeros[..., 0].T.repeat_interleave(32, 1), scale_zeros[..., 1].T.repeat_interleave(32, 1)
    assert ((q.float() - 8) * scale + zero - layer.weight).abs().max() <= 0.5 * scale.max() + 1e-6
    reference = x @ ((q.float() - 8) * scale + zero).T + layer.bias
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.03)):
        out = WeightOnlyInt4Linear(q, scale_zeros, 32, layer.bias, dtype)(x)
        assert out.shape == (2, 5, 32) and out.dtype == torch.float32
        assert (out - reference).abs().max() < tol * reference.abs().max()
        assert (out - layer(x)).abs().max() < 0.15 * layer(x).abs().max()


def test_low_rank_recovers_a_lora_update_and_the_int4_layer_adds_it():
    from tunesmith.optimize.engines import WeightOnlyInt4Linear, low_rank, quantize_int4

    torch.manual_seed(0)
    base, a, b = torch.randn(48, 64), torch.randn(4, 64), torch.randn(48, 4)
    up, down, error = low_rank(b @ a * 0.01)
    assert up.shape == (48, 4) and down.shape == (4, 64) and error < 1e-5
    x = torch.randn(3, 64)
    q, sz = quantize_int4(base, 32)
    plain = WeightOnlyInt4Linear(q, sz, 32, None, torch.float32)(x)
    adapted = WeightOnlyInt4Linear(q, sz, 32, None, torch.float32, (up, down))(x)
    assert torch.allclose(adapted - plain, x @ (b @ a * 0.01).T, atol=1e-4)


def test_ct2_scores_labels_as_the_torch_model_does(tiny_model, tmp_path):
    """CTranslate2 in float32 must give tunesmith's own label log-probabilities (int8 only rounds)."""
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.optimize.ct2 import _generator, convert, generate_ct2, score_labels_ct2
    from tunesmith.tasks.classification import score_labels

    convert(tiny_model, tmp_path / "ct2", quantization="float32")
    model, tok = load_model(tiny_model).eval(), load_tokenizer(tiny_model)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("red card", "a blue sky today", "green")]
    answers = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in ("alpha", "beta", "gamma")]
    generator = _generator(tmp_path / "ct2")
    with torch.no_grad():
        expected = score_labels(model, prompts, answers, tok.pad_token_id, batch_size=2)
    got = score_labels_ct2(generator, tok, prompts, answers)
    # Its float32 kernels differ from torch's in the last digits (~2e-4 of a summed log-probability).
    assert got.shape == (3, 3) and torch.allclose(got, expected, rtol=1e-3, atol=1e-3)
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()
    # Greedy decoding agrees with transformers' too.
    ids = torch.tensor([prompts[1]])
    with torch.no_grad():
        hf = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=[], pad_token_id=tok.pad_token_id)
    assert generate_ct2(generator, tok, [prompts[1]], [5])[0][:5] == hf[0, ids.shape[1]:].tolist()[:5]


def test_onnx_export_scores_and_generates_as_the_torch_model_does(tiny_model, tmp_path):
    """ONNX Runtime on the export must give tunesmith's own label scores (both rules: the prompt and
    the label tree in one call) and transformers' greedy continuation."""
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.optimize.ort import OrtDecoder, export, generate_ort, score_constrained, score_sequence
    from tunesmith.tasks.classification import score_labels, score_labels_constrained

    model, tok = load_model(tiny_model).eval(), load_tokenizer(tiny_model)
    export(model, tmp_path)
    lm = OrtDecoder(tmp_path)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("red card", "a blue sky today", "green")]
    answers = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
               for a in ("alpha", "alphabet", "beta", "gamma")]
    with torch.no_grad():
        sequence = score_labels(model, prompts, answers, tok.pad_token_id, batch_size=2)
        constrained = score_labels_constrained(model, prompts, answers, tok.pad_token_id, batch_size=2)
    assert torch.allclose(score_sequence(lm, prompts, answers, tok.pad_token_id, 2), sequence, atol=1e-4)
    assert torch.allclose(score_constrained(lm, prompts, answers, tok.pad_token_id, 2), constrained, atol=1e-4)
    ids = torch.tensor([prompts[1]])
    with torch.no_grad():
        hf = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=[], pad_token_id=tok.pad_token_id)
    got = generate_ort(lm, tok, [prompts[1], prompts[0]], [5, 2])
    assert got[0] == hf[0, ids.shape[1]:].tolist()[: len(got[0])] and len(got[0]) >= 1 and len(got[1]) <= 2


def test_optimize_rejects_unknown_variants_and_unevaluated_runs(lora_run, tmp_path):
    bad = runner.invoke(app, ["optimize", lora_run, "--variants", "int4"])
    assert bad.exit_code == 2 and "error: unknown variant 'int4' (available: merged, " in bad.output
    assert "), --variants, name known variants, each once" in bad.output
    twice = runner.invoke(app, ["optimize", lora_run, "--variants", "merged,merged"])  # was built twice
    assert twice.exit_code == 2 and "error: list each variant once; " in twice.output
    missing = runner.invoke(app, ["optimize", str(tmp_path)])
    assert missing.exit_code == 2 and "error: not a trained run directory" in missing.output
    for command in ("optimize", "audit", "eval"):  # a typo is not "a run without config.yaml"
        typo = runner.invoke(app, [command, str(tmp_path / "nowhere")])
        assert typo.exit_code == 2 and f"error: not found, {tmp_path / 'nowhere'}" in typo.output, typo.output


def test_full_fine_tune_has_nothing_to_merge(tmp_path, tiny_model):
    run = _trained_run(tmp_path, tiny_model, "full")
    alone = runner.invoke(app, ["optimize", run, "--variants", "merged", "--quiet"])
    assert alone.exit_code == 0 and "merged            skipped" in alone.output, alone.output
    assert not (tmp_path / "run" / "variants").exists()  # its staging folder was all it held
    result = runner.invoke(app, ["optimize", run, "--variants", "merged,int8", "--quiet"])
    assert result.exit_code == 0, result.output
    optimize = json.loads((tmp_path / "run" / "optimize.json").read_text())
    assert [s["name"] for s in optimize["skipped"]] == ["merged"]
    assert optimize["skipped"][0]["reason"].startswith("a full run has no weight adapter to merge")
    assert [e["name"] for e in json.loads((tmp_path / "run" / "variants.json").read_text())] == ["fp32", "int8"]


def test_optimize_exits_3_when_no_variant_meets_the_objective(tmp_path, tiny_model):
    """As `run` does: the variants are built and measured, but a script must not read exit 0 as "a
    variant to serve" when none (fp32 included) meets the objective."""
    write_jsonl(tmp_path / "train.jsonl", make_texts(30, 1))
    write_jsonl(tmp_path / "test.jsonl", make_texts(9, 2))
    project = PROJECT.format(model=tiny_model, method="lora").replace(
        "  target: 0.0\n", "  target: 0.0\n  constraints:\n    model_size_mb: {max: 0.000001}\n")
    (tmp_path / "project.yaml").write_text(project, encoding="utf-8")
    run = tmp_path / "run"
    assert runner.invoke(app, ["run", str(tmp_path / "project.yaml"), "--out", str(run), "--quiet"]).exit_code == 3
    result = runner.invoke(app, ["optimize", str(run), "--variants", "bf16", "--quiet"])
    assert result.exit_code == 3, result.output
    assert "selected: none (no variant (fp32 included) meets the objective)" in result.output
    assert json.loads((run / "optimize.json").read_text())["selected"] is None


def test_an_interrupted_optimize_leaves_the_earlier_variants_and_figures_as_they_were(tmp_path, tiny_model,
                                                                                      monkeypatch):
    """Variants were replaced one by one as they were built: a Ctrl-C left new folders described by the
    old variants.json (or by none). They are built and measured aside and put in place at the end."""
    import hashlib

    from tunesmith.optimize import stage

    run = _trained_run(tmp_path, tiny_model, "full")
    assert runner.invoke(app, ["optimize", run, "--variants", "int8", "--quiet"]).exit_code == 0
    folder = tmp_path / "run"

    def state():
        files = [p for p in sorted(folder.rglob("*")) if p.is_file() and "variants" in p.parts or p.name in
                 ("variants.json", "optimize.json")]
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    before = state()

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(stage, "measure_variant", stopped)
    result = runner.invoke(app, ["optimize", run, "--variants", "int8,bf16", "--quiet"])
    assert result.exit_code == 130, result.output
    assert state() == before and not (folder / "variants" / stage.STAGING).exists()
    monkeypatch.undo()
    assert runner.invoke(app, ["optimize", run, "--variants", "int8,bf16", "--quiet"]).exit_code == 0
    rows = json.loads((folder / "variants.json").read_text())
    assert [(r["name"], r["path"]) for r in rows] == [("fp32", "model"), ("int8", "variants/int8"),
                                                      ("bf16", "variants/bf16")]
    assert (folder / "variants" / "bf16").is_dir() and not (folder / "variants" / stage.STAGING).exists()
    # Fewer variants the next time: the earlier one stays (it may have taken a training) but is not served,
    # nothing measures it any more.
    from tunesmith.errors import InputError
    from tunesmith.serve.service import _variant_path

    assert runner.invoke(app, ["optimize", run, "--variants", "bf16", "--quiet"]).exit_code == 0
    assert sorted(p.name for p in (folder / "variants").iterdir()) == ["bf16", "int8"]
    assert _variant_path(folder, "bf16") == ("bf16", folder / "variants" / "bf16")
    with pytest.raises(InputError, match="not among those the last optimize measured"):
        _variant_path(folder, "int8")
    # A variant's folder holding the user's own files, a file or a link as variants/: refused, untouched.
    (folder / "variants" / "bf16" / "variant.json").unlink()
    (folder / "variants" / "bf16" / "notes.txt").write_text("mine")
    refused = runner.invoke(app, ["optimize", run, "--variants", "bf16", "--quiet"])
    assert refused.exit_code == 2 and "optimize did not write" in refused.stderr and \
        str(folder / "variants" / "bf16") in refused.stderr, refused.output
    assert (folder / "variants" / "bf16" / "notes.txt").read_text() == "mine"
    shutil.rmtree(folder / "variants")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (folder / "variants").symlink_to(elsewhere)
    refused = runner.invoke(app, ["optimize", run, "--variants", "bf16", "--quiet"])
    assert refused.exit_code == 2 and str(folder / "variants") in refused.stderr and list(elsewhere.iterdir()) == []
    (folder / "variants").unlink()
    (folder / "variants").write_text("x")
    refused = runner.invoke(app, ["optimize", run, "--variants", "bf16", "--quiet"])
    assert refused.exit_code == 2 and f"{folder / 'variants'}, " in refused.stderr and ".partial" not in refused.stderr


def test_run_with_optimize_enabled_selects_a_variant(tmp_path, tiny_model):
    write_jsonl(tmp_path / "train.jsonl", make_texts(30, 1))
    write_jsonl(tmp_path / "test.jsonl", make_texts(9, 2))
    extra = "optimize:\n  enabled: true\n  variants: [int8]\n  latency_samples: 2\n"
    (tmp_path / "project.yaml").write_text(PROJECT.format(model=tiny_model, method="lora") + extra, encoding="utf-8")
    result = runner.invoke(app, ["run", str(tmp_path / "project.yaml"), "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    names = [e["name"] for e in json.loads((tmp_path / "run" / "variants.json").read_text())]
    assert names == ["fp32", "int8"] and (tmp_path / "run" / "variants" / "int8" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "optimize.json").read_text())["selected"] in names


def test_a_measured_child_reports_its_own_peak_memory():
    import subprocess
    import sys

    from tunesmith import hardware

    ballast = bytearray(os.urandom(1024)) * (400 * 1024)  # ~400 MB touched in this process
    child = subprocess.run([sys.executable, "-c", "from tunesmith import hardware; print(hardware.peak_rss_mb())"],
                           capture_output=True, text=True, check=True)
    assert hardware.peak_rss_mb() > 400 and float(child.stdout) < 350, child.stdout
    del ballast


def test_peak_memory_window_can_be_reset():
    from tunesmith import hardware

    # An anonymous mapping, not a Python object: a process that has already run other tests has
    # freed heap that malloc would hand back without raising the RSS, and would keep after `del`.
    size = 300 * 1024 * 1024
    ballast = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):  # touch every page so it is resident
        ballast[offset] = 1
    high = hardware.peak_rss_mb()
    ballast.close()  # munmap: the pages leave the RSS at once
    hardware.reset_peak_rss()
    assert hardware.peak_rss_mb() < high - 200
