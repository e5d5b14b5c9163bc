"""The eval stage end to end on a tiny model: paired comparison, efficiency figures for both models,
calibration, extra evaluation suites, and what the report shows of them."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import make_texts, write_jsonl

SUITES = """benchmarks:
  - name: colours
    data: suite_cls.jsonl
    task: {type: classification, instruction: "Which colour group?"}
  - name: echo
    data: suite_gen.jsonl
    task: {type: generation, instruction: "Repeat the word."}
    metric: rouge_l
    max_examples: 4
"""


def test_eval_writes_comparison_efficiency_calibration_and_suites(tiny_project, tmp_path):
    write_jsonl(tmp_path / "suite_cls.jsonl", make_texts(12, 7))
    write_jsonl(tmp_path / "suite_gen.jsonl", [{"prompt": f"word {i}", "completion": f"word {i}"} for i in range(6)])
    tiny_project.write_text(tiny_project.read_text() + SUITES)
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "tunesmith", "run", str(tiny_project), "--out", str(out), "-q"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, 3), done.stderr
    assert "95% CI [" in done.stdout and "McNemar p = " in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    acc = metrics["comparison"]["accuracy"]
    assert {"diff", "ci_low", "ci_high", "p_value"} <= set(acc) and acc["ci_low"] <= acc["diff"] <= acc["ci_high"]
    assert acc["test"] == "McNemar" and acc["mcnemar"]["b"] + acc["mcnemar"]["c"] <= metrics["test_examples"]
    for side in ("baseline", "finetuned"):
        figures = metrics[side]
        assert {"latency_p50_ms", "latency_p95_ms", "model_size_mb", "throughput_eps", "ece"} <= set(figures)
    assert metrics["baseline"]["model_size_mb"] < metrics["finetuned"]["model_size_mb"]  # base + adapter
    assert len(metrics["latency_ms"]["finetuned"]) == 2
    assert {b["count"] for b in metrics["calibration"]["finetuned"]["bins"]} and metrics["calibration"]["baseline"]
    suites = metrics["benchmarks"]
    assert suites["colours"]["examples"] == 12 and suites["colours"]["metric"] == "accuracy"
    assert suites["echo"]["examples"] == 4 and "rouge_l" in suites["echo"]["comparison"]
    assert suites["echo"]["comparison"]["rouge_l"]["test"] == "paired bootstrap"
    page = (out / "report.html").read_text()
    assert "Other evaluation sets" in page and "95% CI" in page and "McNemar" in page
    assert f"Answers: the first {min(10, metrics['test_examples'])} test prompts" in page  # answers_section.py
    assert page.count("data:image/png;base64,") >= 7
    summary = json.loads((out / "summary.json").read_text())
    assert summary["comparison"]["accuracy"]["p_value"] == acc["p_value"]


def test_missing_suite_file_is_a_config_error(tiny_project, tmp_path):
    tiny_project.write_text(tiny_project.read_text() + SUITES)
    done = subprocess.run([sys.executable, "-m", "tunesmith", "run", str(tiny_project), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    assert "benchmark data file not found" in done.stderr and "(benchmarks.0.data)" in done.stderr
    assert not (tmp_path / "r").exists()


TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Text: {{{{text}}}}\\nGroup:"
doc_to_choice: ["alpha", "beta", "gamma"]
doc_to_target: "{{{{['alpha', 'beta', 'gamma'].index(label)}}}}"
metric_list:
  - metric: acc
"""


def test_harness_tasks_run_on_both_models_and_score_as_computed_by_hand(tiny_project, tiny_model, tmp_path):
    """An lm-evaluation-harness task over a local file: figures for both models in metrics.json and
    the report; the baseline's accuracy equals a by-hand argmax of log P(" choice" | context)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = make_texts(6, 11)
    write_jsonl(tmp_path / "mc.jsonl", rows)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(TASK_YAML.format(data=tmp_path / "mc.jsonl"))
    tiny_project.write_text(tiny_project.read_text() + "  harness:\n    tasks: [tiny_mc]\n    include_path: tasks\n")
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "tunesmith", "run", str(tiny_project), "--out", str(out), "-q"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, 3), done.stderr
    acc = json.loads((out / "metrics.json").read_text())["harness"]["tasks"]["tiny_mc"]["acc"]
    assert acc["diff"] == round(acc["finetuned"] - acc["baseline"], 6)
    assert "lm-evaluation-harness tasks" in (out / "report.html").read_text()
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)
    right = 0
    for row in rows:
        context = tok(f"Text: {row['text']}\nGroup:")["input_ids"]
        scores = []
        for choice in ("alpha", "beta", "gamma"):
            cont = tok(f"Text: {row['text']}\nGroup: {choice}")["input_ids"][len(context):]
            ids = torch.tensor([context + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)  # (T-1, V)
            scores.append(sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(cont)))
        right += ["alpha", "beta", "gamma"][scores.index(max(scores))] == row["label"]
    assert acc["baseline"] == round(right / len(rows), 6)


def test_harness_task_folder_must_exist(tiny_project, tmp_path):
    tiny_project.write_text(tiny_project.read_text() + "  harness:\n    tasks: [x]\n    include_path: nowhere\n")
    done = subprocess.run([sys.executable, "-m", "tunesmith", "run", str(tiny_project), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=600)
    assert (done.returncode == 2 and "task folder not found" in done.stderr
            and "eval.harness.include_path" in done.stderr)


def test_harness_gets_merged_weights_and_no_model_for_soft_prompts(tiny_model):
    import torch
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunesmith.models.load import plain_lm

    def load():
        return AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    soft = get_peft_model(load(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert plain_lm(soft) is None
    lora = get_peft_model(load(), LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        merged = plain_lm(lora)
        assert not hasattr(merged, "peft_config")
        assert torch.allclose(merged(ids).logits, lora(ids).logits, atol=1e-4)
