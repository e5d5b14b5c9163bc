"""`tunesmith run/train` end to end for every method, and kill -9 followed by --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import PROJECT, make_texts, write_jsonl
from tunesmith.cli import app
from tunesmith.registry import METHOD_SPECS
from tunesmith.runs import RUN_FILES
from tunesmith.train.methods import METHODS

runner = CliRunner()


def _project(tmp_path, tiny_model, method: str, extra: str = "") -> str:
    write_jsonl(tmp_path / "train.jsonl", make_texts(30, 1))
    write_jsonl(tmp_path / "test.jsonl", make_texts(9, 2))
    text = PROJECT.format(model=tiny_model, method=method).replace("  learning_rate: 0.01\n",
                                                                   "  learning_rate: 0.01\n" + extra)
    (tmp_path / "project.yaml").write_text(text, encoding="utf-8")
    return str(tmp_path / "project.yaml")


# Preference methods train on pairs, not on this classification data: tests/test_preference.py.
@pytest.mark.parametrize("method", sorted(m for m in METHODS if not METHOD_SPECS[m].preference))
def test_every_method_runs_end_to_end(tmp_path, tiny_model, method):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", _project(tmp_path, tiny_model, method), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    for name in RUN_FILES:
        assert (out / name).exists(), name
    meta = json.loads((out / "model" / "tunesmith.json").read_text())
    assert meta["method"] == method and meta["kind"] == METHOD_SPECS[method].kind
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"trainable_params", "train_seconds", "peak_rss_mb"} <= set(metrics["finetuned"])
    assert metrics["forgetting"]["examples"] == 40
    summary = json.loads((out / "summary.json").read_text())
    assert {"overfitting", "preflight", "best_step"} <= set(summary["training"])
    assert "Training watch" in (out / "report.html").read_text()
    assert not (out / "checkpoints").exists(), "checkpoints are removed once the model is saved"
    if meta["kind"] != "prompt":
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_train_needs_a_config_or_resume(tmp_path):
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 2 and "error: give either a project.yaml or --resume" in result.output
    missing = runner.invoke(app, ["train", "--resume", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "no interrupted run to resume" in missing.output
    elsewhere = runner.invoke(app, ["train", "--resume", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert elsewhere.exit_code == 2 and "--out cannot be given with --resume" in elsewhere.output  # was ignored


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model):
    extra = "  checkpoint_every: 5\n  early_stopping: false\n  lora:\n    dropout: 0.0\n"
    config = _project(tmp_path, tiny_model, "lora", extra)
    text = (tmp_path / "project.yaml").read_text()
    (tmp_path / "project.yaml").write_text(text.replace("max_steps: 6", "max_steps: 300")
                                           .replace("eval_every: 3", "eval_every: 50"))
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    cmd = [sys.executable, "-m", "tunesmith", "train", config, "--quiet", "--out"]
    proc = subprocess.Popen(cmd + [str(killed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    checkpoints = tmp_path / ".killed.partial" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(list(checkpoints.glob("step-*"))) >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not killed.exists()
    resumed = subprocess.run([sys.executable, "-m", "tunesmith", "train", "--resume", str(killed), "--quiet"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert subprocess.run(cmd + [str(whole)], capture_output=True, timeout=600).returncode == 0
    a = json.loads((killed / "train.json").read_text())
    b = json.loads((whole / "train.json").read_text())
    assert a["stats"]["steps"] == b["stats"]["steps"] == 300
    wa = load_file(str(killed / "model" / "adapter_model.safetensors"))
    wb = load_file(str(whole / "model" / "adapter_model.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4
    for run in (killed, whole):
        assert runner.invoke(app, ["eval", str(run), "--quiet"]).exit_code in (0, 3)
    pa = [json.loads(x)["prediction"] for x in (killed / "predictions" / "test.jsonl").read_text().splitlines()]
    pb = [json.loads(x)["prediction"] for x in (whole / "predictions" / "test.jsonl").read_text().splitlines()]
    assert sum(x == y for x, y in zip(pa, pb)) >= 0.95 * len(pa)


def test_resume_of_a_finished_run_says_so(tmp_path, tiny_model):
    out = tmp_path / "done"
    assert runner.invoke(app, ["train", _project(tmp_path, tiny_model, "lora"), "--out", str(out), "-q"]).exit_code == 0
    result = runner.invoke(app, ["train", "--resume", str(out)])
    assert result.exit_code == 2 and "training already finished" in result.output


def test_a_resume_that_cannot_continue_keeps_every_checkpoint_and_says_why(tmp_path, tiny_model, monkeypatch):
    """A failed resume deleted the interrupted run, good checkpoints included; an edited config.yaml or a
    damaged checkpoint was resumed silently or as an internal error; a resume replaced a finished run
    without --overwrite."""
    import shutil

    import tunesmith.train.trainer as trainer

    extra = "  checkpoint_every: 2\n  early_stopping: false\n"
    config = _project(tmp_path, tiny_model, "lora", extra)
    out, staging = tmp_path / "run", tmp_path / ".run.partial"
    real, saved = trainer.save_checkpoint, []

    def stop_after_two(*args, **kwargs):
        saved.append(real(*args, **kwargs))
        if len(saved) == 2:
            raise KeyboardInterrupt
        return saved[-1]
    monkeypatch.setattr(trainer, "save_checkpoint", stop_after_two)
    stopped = runner.invoke(app, ["train", config, "--out", str(out), "-q"])
    monkeypatch.setattr(trainer, "save_checkpoint", real)
    assert stopped.exit_code == 130 and f"`tunesmith train --resume {out}`" in stopped.stderr, stopped.output
    steps = sorted(p.name for p in (staging / "checkpoints").glob("step-*"))
    assert len(steps) == 2

    text = (staging / "config.yaml").read_text()
    (staging / "config.yaml").write_text(text.replace("batch_size: 4", "batch_size: 8"))
    edited = runner.invoke(app, ["train", "--resume", str(out), "-q"])
    assert edited.exit_code == 2 and "config.yaml's train.batch_size changed since training began (4 -> 8)" \
        in edited.stderr, edited.output
    (staging / "config.yaml").write_text(text)

    newest = staging / "checkpoints" / steps[-1] / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    damaged = runner.invoke(app, ["train", "--resume", str(out), "-q"])
    assert damaged.exit_code == 2 and "the checkpoint cannot be read" in damaged.stderr, damaged.output
    assert steps[-1] in damaged.stderr and "the training checkpoints are kept" in damaged.stderr
    assert sorted(p.name for p in (staging / "checkpoints").glob("step-*")) == steps  # nothing deleted

    shutil.rmtree(newest.parent)  # as the error says: resume from the one before
    backup = shutil.copytree(staging, tmp_path / "backup")
    assert runner.invoke(app, ["train", "--resume", str(out), "-q"]).exit_code == 0
    assert (out / "model" / "adapter_model.safetensors").is_file() and not staging.exists()

    shutil.copytree(backup, staging)  # the same interruption again, now with a finished run at `out`
    before = (out / "train.json").read_bytes()
    again = runner.invoke(app, ["train", "--resume", str(out), "-q"])
    assert again.exit_code == 2 and "already holds a tunesmith run" in again.stderr, again.output
    assert (out / "train.json").read_bytes() == before
    assert runner.invoke(app, ["train", "--resume", str(out), "-q", "--overwrite"]).exit_code == 0

    # Interrupted while replacing that finished run: the command it prints is the one that continues.
    saved.clear()
    monkeypatch.setattr(trainer, "save_checkpoint", stop_after_two)
    replacing = runner.invoke(app, ["train", config, "--out", str(out), "-q", "--overwrite"])
    monkeypatch.setattr(trainer, "save_checkpoint", real)
    assert replacing.exit_code == 130 and f"`tunesmith train --resume {out} --overwrite`" in replacing.stderr
    assert runner.invoke(app, ["train", "--resume", str(out), "-q", "--overwrite"]).exit_code == 0


def test_a_run_killed_before_its_first_checkpoint_does_not_block_the_next(tmp_path, tiny_model):
    """The record of the training's inputs sits in checkpoints/ from the start: a staging folder holding
    only it (a kill before the first checkpoint) is no resumable run, and a new run replaces it."""
    from tunesmith.runs import STAGING_MARKER

    config = _project(tmp_path, tiny_model, "lora")
    staging = tmp_path / ".run.partial"
    (staging / "checkpoints").mkdir(parents=True)
    (staging / STAGING_MARKER).touch()
    (staging / "checkpoints" / "inputs.json").write_text("{}")
    result = runner.invoke(app, ["train", config, "--out", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "model").is_dir() and not staging.exists()


def test_quiet_hides_progress_but_never_a_warning_about_the_data(tmp_path, tiny_model):
    """--quiet printed nothing at all, the data's warnings included (a rare label, a single class)."""
    config = _project(tmp_path, tiny_model, "lora")
    write_jsonl(tmp_path / "train.jsonl", make_texts(30, 1) + [{"text": "a purple card", "label": "delta"}] * 2)
    result = runner.invoke(app, ["train", config, "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "warning: label 'delta' has only" in result.stderr
    assert "run directory:" not in result.stderr  # progress stays quiet


def test_a_full_run_loads_without_its_base_and_eval_names_the_missing_base_first(tmp_path, tiny_model, monkeypatch):
    """Whole weights need no base model: with the base gone from the machine (a hub id not in the local
    cache, never fetched) the run still serves, exports and optimizes, and eval stops before scoring anything, naming
    tunesmith.json (it scored the fine-tuned model, then blamed `model` for a missing folder)."""
    from tunesmith.serve.service import load_service
    from tunesmith.train.finetuned import load_finetuned

    out = tmp_path / "run"
    assert runner.invoke(app, ["run", _project(tmp_path, tiny_model, "full"), "--out", str(out), "-q"]).exit_code == 0
    meta_file = out / "model" / "tunesmith.json"
    meta = json.loads(meta_file.read_text())
    meta.update(model="tunesmith-tests/not-cached-anywhere", base_model_path=str(tmp_path / "gone"))
    meta_file.write_text(json.dumps(meta))
    model, _, _, base_path = load_finetuned(out / "model", need_base=False)
    assert model is not None and base_path == tmp_path / "gone"
    assert load_service(out).labels  # what `tunesmith serve RUN` loads
    exported = runner.invoke(app, ["export", str(out), "--out", str(tmp_path / "hf")])
    assert exported.exit_code == 0 and (tmp_path / "hf" / "export.json").is_file(), exported.output
    optimized = runner.invoke(app, ["optimize", str(out), "--variants", "int8", "--quiet"])
    assert optimized.exit_code in (0, 3), optimized.output  # 3: no variant meets this tiny model's objective
    assert [v["name"] for v in json.loads((out / "variants.json").read_text())] == ["fp32", "int8"]
    import tunesmith.evaluate.stage as eval_stage

    scored = []
    real_predict = eval_stage.predict
    monkeypatch.setattr(eval_stage, "predict", lambda *a, **k: scored.append(1) or real_predict(*a, **k))
    result = runner.invoke(app, ["eval", str(out), "--quiet"])
    assert result.exit_code == 2 and "the base model this run was trained on is not on this machine" in result.stderr
    assert str(meta_file) in result.stderr and scored == [], result.output
