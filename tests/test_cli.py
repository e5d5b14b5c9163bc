"""The real CLI end to end on the tiny model: run directory contents, exit codes, error lines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_texts, reproduce_predictions, write_jsonl
from tunesmith.cli import app
from tunesmith.runs import RUN_FILES

runner = CliRunner()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunesmith", *args], capture_output=True, text=True, timeout=600)


def test_run_writes_complete_run_directory(tiny_project, tiny_model, tmp_path):
    out = tmp_path / "run1"
    proc = _cli("run", str(tiny_project), "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "report:" in proc.stdout and "objective MET" in proc.stdout
    for name in RUN_FILES:
        assert (out / name).exists(), name
    assert (out / "model" / "adapter_model.safetensors").is_file()
    assert (out / "model" / "tokenizer.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run_dir"] == str(out) and summary["objective"]["met"] is True
    assert {"name", "value", "target", "met"} <= set(summary["objective"]["criteria"][0])
    assert set(summary["metrics"]) == {"baseline", "finetuned"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"train_seconds", "train_tokens", "tokens_per_second", "peak_rss_mb"} <= set(metrics["train"])
    assert "accuracy" in metrics["baseline"] and "latency_p95_ms" in metrics["finetuned"]
    rows = [json.loads(line) for line in (out / "predictions" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and {"text", "gold", "prediction", "baseline_prediction"} <= set(rows[0])
    assert not list(tmp_path.glob(".run1.partial*"))


def test_saved_model_reproduces_predictions_with_transformers_and_peft_alone(tiny_project, tiny_model, tmp_path):
    out = tmp_path / "run"
    assert _cli("run", str(tiny_project), "--out", str(out), "--quiet").returncode == 0
    agree, total = reproduce_predictions(out, tiny_model)
    assert agree == total == 9


def test_default_run_dir_and_latest_link(tiny_project):
    result = runner.invoke(app, ["run", str(tiny_project), "--quiet"])
    assert result.exit_code == 0, result.output
    runs = tiny_project.parent / "runs" / "tiny"
    latest = runs / "latest"
    assert latest.is_symlink() and (latest / "summary.json").is_file()


def test_unmet_objective_exits_3(tiny_project, tmp_path):
    # a gain of the whole accuracy range: met only by a baseline of 0 that the fine-tune takes to 1
    tiny_project.write_text(tiny_project.read_text().replace("target: 0.0", "target: 0.0\n  min_gain: 1.0"))
    result = runner.invoke(app, ["run", str(tiny_project), "--out", str(tmp_path / "r"), "--quiet"])
    assert result.exit_code == 3
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["objective"]["met"] is False


def test_train_then_eval_then_report(tiny_project, tmp_path):
    out = tmp_path / "staged"
    assert runner.invoke(app, ["train", str(tiny_project), "--out", str(out), "--quiet"]).exit_code == 0
    assert (out / "model" / "adapter_config.json").is_file() and not (out / "summary.json").exists()
    result = runner.invoke(app, ["eval", str(out)])
    assert result.exit_code == 0, result.output
    (out / "report.html").unlink()
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0
    assert "<img" in (out / "report.html").read_text()


BAD_ROWS = {
    "invalid JSON": '{"text": "broken",\n',
    "missing field": '{"txt": "a", "label": "alpha"}\n',
    "empty text": '{"text": "   ", "label": "alpha"}\n',
    "non-string label": '{"text": "a", "label": {"x": 1}}\n',
}


def _assert_bad_input(result, where: str, out: Path) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert lines and lines[0].startswith("error: ") and where in lines[0], lines
    assert sum(line.startswith("error:") for line in lines) == 1
    assert "Traceback" not in result.stderr
    assert not out.exists() and not (out.parent / "runs").exists()


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_exit_2_naming_file_and_line(tiny_project, tmp_path, case):
    train = tmp_path / "train.jsonl"
    train.write_text(train.read_text() + BAD_ROWS[case])
    line = len(train.read_text().splitlines())
    result = runner.invoke(app, ["run", str(tiny_project), "--out", str(tmp_path / "out")])
    _assert_bad_input(result, f"{train}:{line}", tmp_path / "out")


def test_undecodable_and_empty_files(tiny_project, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_bytes(train.read_bytes() + b'{"text": "caf\xe9", "label": "alpha"}\n')
    result = runner.invoke(app, ["run", str(tiny_project), "--out", str(tmp_path / "out")])
    _assert_bad_input(result, f"{train}:31", tmp_path / "out")
    assert "not UTF-8" in result.stderr
    (tmp_path / "test.jsonl").write_bytes(b"")
    result = runner.invoke(app, ["data", "check", str(tiny_project)])
    _assert_bad_input(result, str(tmp_path / "test.jsonl"), tmp_path / "out")


CONFIG_EDITS = {
    "yaml syntax": ("train:\n", "train: [\n", "project.yaml:"),
    "unknown key": ("  batch_size: 4\n", "  batch_size: 4\n  lora_rank: 4\n", "(train.lora_rank)"),
    "wrong type": ("  batch_size: 4\n", "  batch_size: four\n", "(train.batch_size)"),
    "unknown method": ("method: lora", "method: qlora9", "(train.method)"),
    "unknown metric": ("metric: accuracy", "metric: accurasy", "(objective.metric)"),
    "missing data file": ("train: train.jsonl", "train: nowhere.jsonl", "(data.train)"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_EDITS))
def test_config_mistakes_exit_2_naming_key(tiny_project, tmp_path, case):
    old, new, where = CONFIG_EDITS[case]
    text = tiny_project.read_text()
    assert old in text
    tiny_project.write_text(text.replace(old, new, 1))
    result = runner.invoke(app, ["run", str(tiny_project), "--out", str(tmp_path / "out")])
    _assert_bad_input(result, where, tmp_path / "out")


def test_unknown_model_lists_catalog(tiny_project, tmp_path):
    text = tiny_project.read_text().splitlines()
    assert text[1].startswith("model: ")
    text[1] = "model: no-such-model"
    tiny_project.write_text("\n".join(text) + "\n")
    result = runner.invoke(app, ["run", str(tiny_project), "--out", str(tmp_path / "out")])
    _assert_bad_input(result, "model", tmp_path / "out")
    assert "smollm2-135m-instruct" in result.stderr


def test_real_process_error_line_and_debug_traceback(tiny_project, tmp_path):
    tiny_project.write_text(tiny_project.read_text().replace("method: lora", "method: nope"))
    proc = _cli("run", str(tiny_project))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    debug = _cli("run", str(tiny_project), "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_output_piped_into_a_reader_that_stops_early_ends_quietly(tmp_path):
    """`tunesmith runs list | head`: the closed pipe is no internal error; exit 141 as a SIGPIPE death is."""
    env = {**os.environ, "TUNESMITH_REGISTRY": str(tmp_path / "runs.sqlite")}
    # --help too: rich prints it, and exited 1 on the closed pipe
    for command in (["runs", "list"], ["--help"], ["runs", "list", "--help"]):
        proc = subprocess.Popen([sys.executable, "-m", "tunesmith", *command], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
        proc.stdout.close()  # the reader is gone before the first line is written
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 141 and err == "", (command, err)


def test_data_check_lists_every_bad_row(tiny_project, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(train.read_text() + BAD_ROWS["invalid JSON"] + BAD_ROWS["missing field"])
    result = runner.invoke(app, ["data", "check", str(tiny_project)])
    assert result.exit_code == 2
    assert f"{train}:31" in result.stderr and f"{train}:32" in result.stderr
    write_jsonl(train, make_texts(30, 1))
    ok = runner.invoke(app, ["data", "check", str(tiny_project)])
    assert ok.exit_code == 0 and "data OK" in ok.stdout


GENERATION = """name: gen
model: {model}
task:
  type: {type}
  instruction: "Answer with the label."
data:
  train: train.jsonl
  test: test.jsonl
objective:
  metric: rouge_l
  min_gain: -1.0
train:
  max_steps: 4
  eval_every: 2
  batch_size: 4
  learning_rate: 0.01
  max_val_examples: 4
eval:
  max_new_tokens: 4
  latency_samples: 1
"""


@pytest.mark.parametrize("kind", ["generation", "chat"])
def test_generation_and_chat_runs(tmp_path, tiny_model, kind):
    rows = make_texts(20, 4)
    if kind == "chat":
        data = [{"messages": [{"role": "user", "content": r["text"]}, {"role": "assistant", "content": r["label"]}]}
                for r in rows]
    else:
        data = [{"prompt": r["text"], "completion": r["label"]} for r in rows]
    write_jsonl(tmp_path / "train.jsonl", data[:16])
    write_jsonl(tmp_path / "test.jsonl", data[16:])
    (tmp_path / "p.yaml").write_text(GENERATION.format(model=tiny_model, type=kind))
    result = runner.invoke(app, ["run", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {"exact_match", "rouge_l", "bleu", "chrf"} <= set(metrics["finetuned"]) and "confusion_matrix" not in metrics
    # The tiny model is random: its perplexity on the answers is large, but finite and above 1.
    assert all(1 < metrics[side]["perplexity"] < 1e6 for side in ("baseline", "finetuned"))
    assert metrics["finetuned"]["perplexity"] < metrics["baseline"]["perplexity"]  # training lowered it
    assert "exact_match" in metrics["comparison"] and "bleu" in metrics["comparison"]
    rows_out = [json.loads(line) for line in (tmp_path / "out" / "predictions" / "test.jsonl").read_text().splitlines()]
    assert len(rows_out) == 4 and all(isinstance(r["prediction"], str) for r in rows_out)


def test_a_verdict_with_no_criteria_says_it_required_nothing(capsys):
    from tunesmith.cli import _print_summary

    summary = {"objective": {"met": True, "criteria": []}, "objective_metric": "exact_match",
               "metrics": {"baseline": {"exact_match": 0.1}, "finetuned": {"exact_match": 0.2}},
               "run_dir": "r", "report": "r/report.html"}
    _print_summary(summary)
    assert "objective MET (no criteria set: objective.target, min_gain and constraints are all unset)" in \
        capsys.readouterr().out
    summary["objective"]["criteria"] = [{"name": "exact_match", "value": 0.2, "op": ">=", "target": 0.1, "met": True}]
    _print_summary(summary)
    assert "objective MET\n" in capsys.readouterr().out


@pytest.mark.parametrize("args,where", [((), "tunesmith"), (("data",), "tunesmith data"),
                                        (("runs",), "tunesmith runs")])
def test_a_command_group_without_its_command_shows_the_commands_and_one_error_line(args, where):
    proc = _cli(*args)
    assert proc.returncode == 2 and "Commands" in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(f"error: missing command, (python -m )?{where}, see the commands above",
                                             lines[0]), proc.stderr
