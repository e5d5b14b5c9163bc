"""Preference tuning through the CLI: pair rows as examples (kept in saved splits), `tunesmith run` with
dpo/kto, the eval stage's pair figures and statistics, `tunesmith data pairs`, and train.init_from."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import GEN_PROJECT, write_jsonl
from tunesmith.cli import app
from tunesmith.config.schema import TaskConfig
from tunesmith.data.examples import Example, load_examples
from tunesmith.data.pairs import pairs_from_examples
from tunesmith.errors import DataError

runner = CliRunner()
WORDS = {"red": "alpha", "blue": "beta", "green": "gamma"}


def _pair_rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        colour = list(WORDS)[i % 3]
        prompt = f"card {colour} number {i}"
        if i % 4 == 0:  # some prompts as a conversation ending with the user's turn
            prompt_part = {"messages": [{"role": "system", "content": "Name the card."},
                                        {"role": "user", "content": prompt}]}
        else:
            prompt_part = {"prompt": prompt}
        rows.append({**prompt_part, "chosen": WORDS[colour], "rejected": list(WORDS.values())[(i + 1) % 3]})
    return rows


def _project(tmp_path, model, method: str, steps: int = 4, extra: str = "", metric: str = "preference_accuracy"):
    text = GEN_PROJECT.format(name=method, model=model, method=method, steps=steps, new_tokens=2)
    text = text.replace("  metric: exact_match\n", f"  metric: {metric}\n")
    text = text.replace(f"  max_steps: {steps}\n", f"  max_steps: {steps}\n  eval_every: {steps}\n{extra}")
    path = tmp_path / f"{method}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _run(args: list[str]):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


# ---- rows as examples -------------------------------------------------------------------------

def test_pair_and_kto_rows_load_as_examples_and_survive_saved_splits(tmp_path):
    rows = _pair_rows(4) + [{"prompt": "q", "completion": "good", "label": True},
                            {"messages": [{"role": "user", "content": "q2"}], "completion": "bad", "label": False}]
    examples, problems = load_examples(write_jsonl(tmp_path / "p.jsonl", rows), TaskConfig(type="generation"))
    assert not problems and len(examples) == 6
    first, chat = examples[1], examples[0]
    assert (first.input, first.target, first.rejected, first.desirable) == ("card blue number 1", "beta", "gamma", None)
    assert chat.messages[-1] == {"role": "user", "content": "card red number 0"} and chat.rejected == "beta"
    assert (examples[4].desirable, examples[5].desirable, examples[5].rejected) == (True, False, None)
    saved = [Example.from_json(json.loads(json.dumps(e.to_json()))) for e in examples]
    assert saved == examples  # rejected, desirable and messages are in the saved splits
    assert [p.rejected for p in pairs_from_examples(saved[:4])] == [r["rejected"] for r in rows[:4]]
    kto = pairs_from_examples(saved, kto=True)  # a pair unpairs into a desirable and an undesirable row
    assert [(p.chosen, p.label) for p in kto[:2]] == [("alpha", True), ("beta", False)] and len(kto) == 10
    with pytest.raises(DataError, match="not a preference row .* \\(and 1 more such rows\\)") as e:
        pairs_from_examples(saved[4:])  # KTO rows are no pairs for DPO
    assert e.value.details == ["p.jsonl:5: not a preference row", "p.jsonl:6: not a preference row"]


def test_a_bad_pair_row_is_located_and_a_string_label_stays_a_generation_row(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "a"}, {"prompt": "q", "completion": "c", "label": "x"}]
    examples, problems = load_examples(write_jsonl(tmp_path / "p.jsonl", rows), TaskConfig(type="generation"))
    assert [p.line for p in problems] == [1] and "the same answer" in problems[0].reason
    assert (examples[0].target, examples[0].desirable) == ("c", None)


# ---- tunesmith run --------------------------------------------------------------------------

def _margins(model_dir, pairs_rows, adapter_off: bool = False) -> list[float]:
    from tunesmith.data.pairs import parse_pair
    from tunesmith.train.finetuned import load_finetuned
    from tunesmith.train.preference_fit import pair_margins

    model, tok, fmt, _ = load_finetuned(model_dir)
    pairs = [parse_pair(r) for r in pairs_rows]
    if adapter_off:
        with model.disable_adapter():
            return pair_margins(model, tok, fmt, pairs)
    return pair_margins(model, tok, fmt, pairs)


def test_dpo_runs_end_to_end_and_eval_compares_pairs(tmp_path, tiny_model):
    write_jsonl(tmp_path / "train.jsonl", _pair_rows(24))
    test_rows = _pair_rows(10, offset=100)
    write_jsonl(tmp_path / "test.jsonl", test_rows)
    out = tmp_path / "run"
    _run(["run", str(_project(tmp_path, tiny_model, "dpo", extra="  learning_rate: 0.005\n")), "--out", str(out),
          "--quiet"])
    metrics = json.loads((out / "metrics.json").read_text())
    for side in ("baseline", "finetuned"):
        assert {"preference_accuracy", "reward_margin", "exact_match"} <= set(metrics[side])
    comp = metrics["comparison"]
    assert comp["preference_accuracy"]["test"] == "McNemar" and comp["reward_margin"]["test"] == "paired bootstrap"
    # The figures are the margins as defined, for the tuned model and for the base (adapter off = base weights).
    tuned, base = _margins(out / "model", test_rows), _margins(out / "model", test_rows, adapter_off=True)
    assert metrics["finetuned"]["reward_margin"] == pytest.approx(sum(tuned) / len(tuned), abs=1e-4)
    assert metrics["baseline"]["reward_margin"] == pytest.approx(sum(base) / len(base), abs=1e-4)
    assert metrics["finetuned"]["preference_accuracy"] == pytest.approx(sum(m > 0 for m in tuned) / len(tuned))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective_metric"] == "preference_accuracy" and "met" in summary["objective"]
    assert metrics["test_rows_not_scored"] == 0 and summary["data"]["test_rows_not_scored"] == 0
    assert summary["comparison"]["preference_accuracy"] == comp["preference_accuracy"]
    assert "preference_accuracy" in (out / "report.html").read_text()
    rows = [json.loads(line) for line in (out / "predictions" / "test.jsonl").read_text().splitlines()]
    assert [r["margin"] for r in rows] == pytest.approx(tuned, abs=1e-4)
    # Eval again from the saved splits alone: the rejected answers were kept, the figures are the same.
    (tmp_path / "test.jsonl").unlink()
    _run(["eval", str(out), "--quiet"])
    again = json.loads((out / "metrics.json").read_text())
    assert again["finetuned"]["reward_margin"] == metrics["finetuned"]["reward_margin"]
    # Export compares on the task's first text metric: a pair metric scores no predicted text (it was null).
    _run(["export", str(out), "--out", str(tmp_path / "hf"), "--min-agreement", "0"])
    exported = json.loads((tmp_path / "hf" / "export.json").read_text())
    assert exported["metric"] == "exact_match" and exported["metric_run"] == again["finetuned"]["exact_match"]
    assert exported["metric_export"] is not None and exported["delta"] is not None


def test_kto_runs_end_to_end_on_completion_label_rows(tmp_path, tiny_model):
    rows = [r for p in _pair_rows(12) for r in ({**{k: v for k, v in p.items() if k not in ("chosen", "rejected")},
                                                "completion": p["chosen"], "label": True},
                                               {**{k: v for k, v in p.items() if k not in ("chosen", "rejected")},
                                                "completion": p["rejected"], "label": False})]
    write_jsonl(tmp_path / "train.jsonl", rows)
    # Test rows: 6 pairs, one desirable completion (a reference answer) and two undesirable ones, which
    # neither the pair figures nor the generation metrics can score: counted, not silently dropped.
    kto_test = [{"prompt": f"card {c} test {i}", "completion": w, "label": ok}
                for i, (c, w, ok) in enumerate([("red", "alpha", True), ("blue", "gamma", False),
                                                 ("green", "beta", False)])]
    write_jsonl(tmp_path / "test.jsonl", _pair_rows(6, offset=100) + kto_test)
    out = tmp_path / "run"
    result = _run(["run", str(_project(tmp_path, tiny_model, "kto", metric="exact_match")), "--out", str(out),
                   "--quiet"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"preference_accuracy", "reward_margin"} <= set(metrics["finetuned"]) and metrics["test_examples"] == 7
    assert metrics["test_rows_not_scored"] == 2 and metrics["test_rows_not_scored_by_reason"] == {"kto_undesirable": 2}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["test_rows_not_scored"] == 2 and summary["data"]["test_rows_removed"] == 0
    assert "test rows not scored: 2 (kto_undesirable 2)" in result.output


def test_sft_refuses_undesirable_kto_rows(tmp_path, tiny_model):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"q{i}", "completion": "a", "label": i % 2 == 0}
                                           for i in range(12)])
    write_jsonl(tmp_path / "test.jsonl", _pair_rows(4))
    result = runner.invoke(app, ["run", str(_project(tmp_path, tiny_model, "lora", metric="exact_match")),
                                 "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 2 and "labelled undesirable" in result.output


# ---- data pairs + DPO on top of the SFT run ---------------------------------------------------------

def test_pairs_from_an_sft_run_then_dpo_from_it(tmp_path, tiny_model, monkeypatch):
    write_jsonl(tmp_path / "train.jsonl", _pair_rows(20))
    write_jsonl(tmp_path / "test.jsonl", _pair_rows(6, offset=100))
    sft = tmp_path / "sft"
    sft_config = _project(tmp_path, tiny_model, "lora", steps=2, metric="exact_match", extra="  learning_rate: 0.01\n")
    # The rows are one template: near-deduplication would leave a handful, and a model trained long on them
    # answers every one right (no pair to make).
    sft_config.write_text(sft_config.read_text().replace("data:\n", "data:\n  clean: {near_dedup: {enabled: false}}\n"))
    _run(["run", str(sft_config), "--out", str(sft), "--quiet"])
    pairs_dir = tmp_path / "pairs"
    printed = _run(["data", "pairs", str(sft), "--out", str(pairs_dir), "--quiet"]).output
    summary = json.loads((pairs_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()]
    train_rows = len((sft / "data" / "train.jsonl").read_text().splitlines())
    assert summary["rows"] == train_rows and len(rows) == summary["pairs"] > 0
    assert summary["pairs"] + summary["skipped_correct"] + summary["skipped_empty"] == train_rows
    assert f"{summary['pairs']} pairs from {train_rows} train rows" in printed
    golds = {json.loads(line)["target"] for line in (sft / "data" / "train.jsonl").read_text().splitlines()}
    assert all(r["chosen"] in golds and r["rejected"] != r["chosen"] for r in rows)
    refused = runner.invoke(app, ["data", "pairs", str(sft), "--out", str(pairs_dir), "--quiet"])
    assert refused.exit_code == 2 and "not empty" in refused.output
    inside = runner.invoke(app, ["data", "pairs", str(sft), "--out", str(sft / "model" / "x"), "--quiet"])
    assert inside.exit_code == 2 and f"is inside the run directory {sft.resolve()}" in inside.output
    assert not (sft / "model" / "x").exists()
    # Every answer right: no pair to make is refused, nothing written (an empty pairs.jsonl exited 0).
    import types

    from tunesmith.evaluate import onpolicy_pairs
    with monkeypatch.context() as m:
        m.setattr(onpolicy_pairs, "predict", lambda model, tok, fmt, rows, **kw: types.SimpleNamespace(
            texts=[r.target for r in rows]))
        none = runner.invoke(app, ["data", "pairs", str(sft), "--out", str(tmp_path / "none"), "--quiet"])
    assert none.exit_code == 2 and f"no preference pairs: of the {train_rows} train rows the run answered " \
        f"{train_rows} right" in none.output and not (tmp_path / "none").exists(), none.output

    # A held-out file from the test split: every test row once, a pair where the model was wrong.
    held_out = tmp_path / "held_out"
    _run(["data", "pairs", str(sft), "--out", str(held_out), "--split", "test", "--keep-correct", "--quiet"])
    kept = [json.loads(line) for line in (held_out / "pairs.jsonl").read_text().splitlines()]
    test_rows = [json.loads(line) for line in (sft / "data" / "test.jsonl").read_text().splitlines()]
    assert len(kept) == len(test_rows)
    assert sorted(r.get("chosen", r.get("completion")) for r in kept) == sorted(r["target"] for r in test_rows)
    held_summary = json.loads((held_out / "summary.json").read_text())
    assert held_summary["pairs"] == sum("rejected" in r for r in kept) and held_summary["split"] == "test"
    bad = runner.invoke(app, ["data", "pairs", str(sft), "--out", str(tmp_path / "x"), "--split", "dev"])
    assert bad.exit_code == 2 and "--split" in bad.output

    # DPO from the SFT run: its reference (adapter off) is the SFT model, not the original base.
    write_jsonl(tmp_path / "train.jsonl", rows)
    dpo = tmp_path / "dpo"
    config = _project(tmp_path, tiny_model, "dpo", extra=f"  init_from: {sft}\n  learning_rate: 0.005\n")
    _run(["run", str(config), "--out", str(dpo), "--quiet"])
    probe = _pair_rows(6, offset=200)
    sft_margins = _margins(sft / "model", probe)
    assert _margins(dpo / "model", probe, adapter_off=True) == pytest.approx(sft_margins, abs=1e-4)
    base_margins = _margins(sft / "model", probe, adapter_off=True)
    assert max(abs(a - b) for a, b in zip(base_margins, sft_margins)) > 1e-3  # the test can tell them apart
    metrics = json.loads((dpo / "metrics.json").read_text())
    sft_metrics = json.loads((sft / "metrics.json").read_text())
    # The baseline of the DPO run is the SFT model: its exact match on the same test rows is the SFT run's.
    assert metrics["baseline"]["exact_match"] == sft_metrics["finetuned"]["exact_match"]
    # The folder loads with plain peft: the adapter names model/base where it is now, not the staging folder.
    from peft import AutoPeftModelForCausalLM

    adapter = json.loads((dpo / "model" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(dpo / "model" / "base")
    assert json.loads((dpo / "model" / "tunesmith.json").read_text())["base_model_path"] == str(dpo / "model" / "base")
    assert AutoPeftModelForCausalLM.from_pretrained(str(dpo / "model")) is not None


def test_init_from_must_be_a_finished_run(tmp_path, tiny_model):
    write_jsonl(tmp_path / "train.jsonl", _pair_rows(8))
    write_jsonl(tmp_path / "test.jsonl", _pair_rows(4))
    config = _project(tmp_path, tiny_model, "dpo", extra=f"  init_from: {tmp_path / 'nowhere'}\n")
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 2 and "train.init_from" in result.output and "no finished run" in result.output


def test_reference_logps_are_the_base_with_the_adapter_off(tiny_model):
    """The DPO reference (train/preference_fit.reference_logps) equals the untouched model's log-probs."""
    from tunesmith.config.schema import TrainConfig
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.tasks.prompts import build_format
    from tunesmith.train import preference as P
    from tunesmith.train.methods import get_method
    from tunesmith.train.preference_fit import collate_pairs, encode_pairs, reference_logps

    tok = load_tokenizer(tiny_model)
    fmt = build_format(TaskConfig(type="generation"), None, tok)
    pairs = pairs_from_examples(load_examples(write_jsonl(tiny_model.parent / "ref.jsonl", _pair_rows(4)),
                                              TaskConfig(type="generation"))[0])
    batch = collate_pairs(encode_pairs(pairs, tok, fmt), pairs, tok.pad_token_id)
    with torch.no_grad():
        want = P.sequence_logps(load_model(tiny_model).eval(), batch)[0]
    cfg = TrainConfig(method="dpo")
    policy = get_method("dpo").apply(load_model(tiny_model), cfg)
    for p in policy.parameters():  # move the adapter off zero so that policy != reference
        if p.requires_grad:
            p.data.add_(0.05)
    assert torch.allclose(reference_logps(policy, batch, None), want, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(P.sequence_logps(policy.eval(), batch)[0], want, atol=1e-3)


def test_a_kto_test_split_with_nothing_to_score_fails_before_training(tmp_path, tiny_model):
    """Every test row labelled undesirable: eval failed after the whole training, naming a staging folder
    that no longer existed; it is refused with the data now."""
    rows = [{"prompt": f"card red {i}", "completion": "alpha", "label": i % 2 == 0} for i in range(24)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": f"card blue {i}", "completion": "gamma", "label": False}
                                          for i in range(4)])
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(_project(tmp_path, tiny_model, "kto", metric="exact_match")),
                                 "--out", str(out), "--quiet"])
    assert result.exit_code == 2 and "no test row can be scored" in result.stderr and "data.test" in result.stderr
    assert not out.exists() and not (tmp_path / ".run.partial").exists()


def test_a_pair_metric_with_no_test_pairs_fails_before_training(tmp_path, tiny_model):
    """DPO judged on preference_accuracy with a test split of plain prompt/completion rows trained the
    whole model, then failed in eval (exit 1); refused with the data now (exit 2), nothing left."""
    write_jsonl(tmp_path / "train.jsonl", _pair_rows(16))
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": f"card red {i}", "completion": "alpha"} for i in range(4)])
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(_project(tmp_path, tiny_model, "dpo")), "--out", str(out), "--quiet"])
    assert result.exit_code == 2 and "needs test rows with a rejected answer" in result.stderr, result.output
    assert "objective.metric" in result.stderr and not out.exists() and not (tmp_path / ".run.partial").exists()


def test_kto_with_no_desirable_validation_row_is_refused_naming_the_split(tmp_path, tiny_model):
    """A generation metric is scored on the desirable validation completions: with none it was an
    IndexError inside the metric (exit 1, internal error)."""
    rows = [{"prompt": f"card red {i}", "completion": "alpha", "label": i % 2 == 0} for i in range(24)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "val.jsonl", [{"prompt": f"card green {i}", "completion": "beta", "label": False}
                                         for i in range(4)])
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": f"card blue {i}", "completion": "gamma", "label": True}
                                          for i in range(4)])
    project = _project(tmp_path, tiny_model, "kto", metric="exact_match")
    project.write_text(project.read_text().replace("  validation: 0.2\n", "  validation: val.jsonl\n"))
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(project), "--out", str(out), "--quiet"])
    assert result.exit_code == 2 and "the validation split has none" in result.stderr, result.output
    assert "data.validation" in result.stderr and "internal error" not in result.output and not out.exists()


def test_preference_training_runs_the_pre_flight_on_chosen_and_rejected_answers(tmp_path, tiny_model):
    """Preference methods skipped the supervised loop's pre-flight: rows cut at task.max_length, and a
    3,000-word answer, were trained on with no word. Now each is named, printed and kept in train.json."""
    rows = [{**r, "prompt": " ".join(f"w{i}x{j}" for j in range(60)) + f" {r['prompt']}"} if "prompt" in r else r
            for i, r in enumerate(_pair_rows(12))]  # distinct long prompts (near-duplicates would be removed)
    for r in rows:
        r["rejected"] = " ".join([r["rejected"]] * 400)  # rejected answers far past max_length
    write_jsonl(tmp_path / "train.jsonl", rows)
    project = _project(tmp_path, tiny_model, "dpo", steps=2)
    project.write_text(project.read_text().replace("  instruction: \"Continue.\"\n",
                                                   "  instruction: \"Continue.\"\n  max_length: 48\n"))
    write_jsonl(tmp_path / "test.jsonl", _pair_rows(3, offset=50))
    result = runner.invoke(app, ["train", str(project), "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    notes = json.loads((tmp_path / "run" / "train.json").read_text())["preflight"]
    assert any("training examples are longer than task.max_length=48" in n for n in notes), notes
    assert any("rejected answers are longer than task.max_length=48" in n and "train.jsonl:" in n
               for n in notes), notes
    assert "warning: " in result.stderr and "rejected answers" in result.stderr


def test_optimize_measures_a_kto_run_on_the_rows_eval_scored(tmp_path, tiny_model, monkeypatch):
    """Undesirable KTO test rows are not scored; optimize took data/test.jsonl's first N rows, so with one
    of them first every variant answered other questions than the golds it was compared with."""
    from tunesmith.optimize import stage

    rows = [{"prompt": p.get("prompt", "x"), "completion": p[side], "label": side == "chosen"}
            for p in _pair_rows(8) for side in ("chosen", "rejected")]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "card blue first", "completion": "gamma", "label": False}]
                + [{"prompt": f"card red test {i}", "completion": "alpha", "label": True} for i in range(3)])
    out = tmp_path / "run"
    _run(["run", str(_project(tmp_path, tiny_model, "kto", metric="exact_match")), "--out", str(out), "--quiet"])
    seen = []
    real = stage.measure_variant

    def spy(path, test_file, *args, **kwargs):
        seen.append([json.loads(line)["input"] for line in test_file.read_text().splitlines()])
        return real(path, test_file, *args, **kwargs)

    monkeypatch.setattr(stage, "measure_variant", spy)
    result = runner.invoke(app, ["optimize", str(out), "--variants", "merged", "-q"])
    assert result.exit_code in (0, 3), result.output
    scored = [json.loads(line)["text"] for line in (out / "predictions" / "test.jsonl").read_text().splitlines()]
    assert len(scored) == 3 and seen and all(texts == scored for texts in seen), (seen, scored)


def test_sft_rows_for_dpo_are_refused_before_anything_is_written_and_compare_checks_every_method(tmp_path,
                                                                                                  tiny_model):
    """DPO on prompt/completion rows failed in training, after `run` had made runs/<name>/ (left empty);
    `compare --methods lora,dpo` trained lora whole first. Both refuse at the data now, leaving nothing."""
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"card red {i}", "completion": "alpha"} for i in range(16)])
    write_jsonl(tmp_path / "test.jsonl", _pair_rows(4))
    result = runner.invoke(app, ["run", str(_project(tmp_path, tiny_model, "dpo")), "--quiet"])
    assert result.exit_code == 2 and "not a preference row" in result.stderr and "train.jsonl:1" in result.stderr
    assert "invalid row:" in result.stderr  # the data stage's refusal, not training's
    assert not (tmp_path / "runs").exists()
    lora = _project(tmp_path, tiny_model, "lora", metric="exact_match")
    out = tmp_path / "bake" / "off"
    result = runner.invoke(app, ["compare", str(lora), "--methods", "lora,dpo", "--out", str(out), "--quiet"])
    assert result.exit_code == 2 and "not a preference row" in result.stderr, result.output
    assert not (tmp_path / "bake").exists()


def test_compare_checks_rows_against_the_methods_it_trains_not_the_configs_own(tmp_path, tiny_model):
    """KTO rows with undesirable completions, a config left at lora: `compare --methods kto` trains kto
    (lora, which would learn those completions, is not among the methods)."""
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"card red {i}", "completion": "alpha" if i % 2 else "beta",
                                            "label": i % 2 == 1} for i in range(16)])
    write_jsonl(tmp_path / "test.jsonl", _pair_rows(4))
    config = _project(tmp_path, tiny_model, "lora", steps=1, metric="exact_match")
    out = tmp_path / "bake"
    _run(["compare", str(config), "--methods", "kto", "--out", str(out), "--quiet"])
    assert (out / "kto" / "summary.json").is_file() and (out / "compare.json").is_file()
