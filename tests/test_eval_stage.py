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
