"""Data-parallel training: 2 CPU processes (gloo) equal one process accumulating 2 batches,
with replicated weights (all-reduce) and with decoder layers sharded (FSDP2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PROJECT, make_texts, write_jsonl


def _project(tmp_path, tiny_model, grad_accum: int, method: str = "lora", extra_train: str = ""):
    folder = tmp_path / f"{method}-accum{grad_accum}{'-fsdp' if 'fsdp' in extra_train else ''}"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", make_texts(30, 1))  # 24 train rows after the 20% validation split
    write_jsonl(folder / "test.jsonl", make_texts(9, 2))
    extra = f"  max_steps: 3\n  grad_accum: {grad_accum}\n  trackers: []\n{extra_train}  lora:\n    dropout: 0.0\n"
    text = PROJECT.format(model=tiny_model, method=method).replace("  max_steps: 6\n", extra)
    (folder / "project.yaml").write_text(text, encoding="utf-8")
    return folder / "project.yaml"


def _train(args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _torchrun(config, out, port: int, *extra: str):
    return _train([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                   "-m", "tunesmith", "train", str(config), "--out", str(out), "-q", *extra])


def _assert_same_weights(one, two, filename: str, moved_key: str) -> None:
    a = load_file(str(one / "model" / filename))
    b = load_file(str(two / "model" / filename))
    assert a.keys() == b.keys()
    moved = sum(float(v.abs().sum()) for k, v in a.items() if moved_key in k)
    assert moved > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3)


def test_two_gloo_processes_match_one_process(tmp_path, tiny_model):
    single = _project(tmp_path, tiny_model, grad_accum=2)
    _train([sys.executable, "-m", "tunesmith", "train", str(single), "--out", str(tmp_path / "one"), "-q"])
    _torchrun(_project(tmp_path, tiny_model, grad_accum=1), tmp_path / "two", 29517)
    _assert_same_weights(tmp_path / "one", tmp_path / "two", "adapter_model.safetensors", "lora_B")
    stats = json.loads((tmp_path / "two" / "train.json").read_text())["stats"]
    assert stats["world_size"] == 2 and stats["steps"] == 3
    assert not list(tmp_path.glob(".*partial*")), "no staging folder left behind"


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp_sharded_layers_match_one_process(tmp_path, tiny_model, method):
    # fp32: the sharded run computes each prompt whole rather than sharing its prefix's keys/values,
    # which is the same maths but rounds differently under bf16.
    single = _project(tmp_path, tiny_model, grad_accum=2, method=method, extra_train="  precision: fp32\n")
    _train([sys.executable, "-m", "tunesmith", "train", str(single), "--out", str(tmp_path / "one"), "-q"])
    sharded = "  precision: fp32\n  fsdp: true\n"
    done = _torchrun(_project(tmp_path, tiny_model, grad_accum=1, method=method, extra_train=sharded),
                     tmp_path / "two", 29518 if method == "lora" else 29519)
    assert "train.fsdp is on, but this is a single process" not in done.stderr  # two processes do shard
    if method == "lora":
        _assert_same_weights(tmp_path / "one", tmp_path / "two", "adapter_model.safetensors", "lora_B")
    else:
        _assert_same_weights(tmp_path / "one", tmp_path / "two", "model.safetensors", "layers")
    stats = json.loads((tmp_path / "two" / "train.json").read_text())["stats"]
    assert stats["world_size"] == 2 and stats["steps"] == 3


def _kill_9_everything_mentioning(text: str) -> None:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def test_fsdp_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model):
    """Sharded checkpoints (full weights + one optimiser shard per rank) resume to the same weights."""
    extra = "  fsdp: true\n  checkpoint_every: 4\n  early_stopping: false\n"
    config = _project(tmp_path, tiny_model, grad_accum=1, extra_train=extra)
    config.write_text(config.read_text().replace("max_steps: 3", "max_steps: 120").replace("eval_every: 3",
                                                                                           "eval_every: 60"))
    killed = tmp_path / "killed"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29520",
              "-m", "tunesmith", "train"]
    proc = subprocess.Popen(launch + [str(config), "-q", "--out", str(killed)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    checkpoints = tmp_path / ".killed.partial" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(list(checkpoints.glob("step-*"))) >= 2:
            _kill_9_everything_mentioning(str(killed))  # the launcher and its workers (own sessions)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert (checkpoints / "step-0000004" / "optimizer-rank1.json").is_file()
    resume = [*launch[:6], "29521", "-m", "tunesmith", "train", "--resume", str(killed), "-q"]
    _train(resume)
    _torchrun(config, tmp_path / "whole", 29522)
    _assert_same_weights(killed, tmp_path / "whole", "adapter_model.safetensors", "lora_B")
    assert json.loads((killed / "train.json").read_text())["stats"]["steps"] == 120
