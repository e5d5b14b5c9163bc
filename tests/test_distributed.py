"""Data-parallel training: 2 CPU processes (gloo) equal one process accumulating 2 batches."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import PROJECT, make_texts, write_jsonl


def _project(tmp_path, tiny_model, grad_accum: int):
    folder = tmp_path / f"accum{grad_accum}"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", make_texts(30, 1))  # 24 train rows after the 20% validation split
    write_jsonl(folder / "test.jsonl", make_texts(9, 2))
    extra = f"  max_steps: 3\n  grad_accum: {grad_accum}\n  trackers: []\n  lora:\n    dropout: 0.0\n"
    text = PROJECT.format(model=tiny_model, method="lora").replace("  max_steps: 6\n", extra)
    (folder / "project.yaml").write_text(text, encoding="utf-8")
    return folder / "project.yaml"


def _train(args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_gloo_processes_match_one_process(tmp_path, tiny_model):
    single = _project(tmp_path, tiny_model, grad_accum=2)
    _train([sys.executable, "-m", "tunesmith", "train", str(single), "--out", str(tmp_path / "one"), "-q"])
    double = _project(tmp_path, tiny_model, grad_accum=1)
    _train([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
            "-m", "tunesmith", "train", str(double), "--out", str(tmp_path / "two"), "-q"])
    a = load_file(str(tmp_path / "one" / "model" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    moved = sum(float(v.abs().sum()) for k, v in a.items() if "lora_B" in k)
    assert moved > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3)
    import json

    stats = json.loads((tmp_path / "two" / "train.json").read_text())["stats"]
    assert stats["world_size"] == 2 and stats["steps"] == 3
    assert not list(tmp_path.glob(".*partial*")), "no staging folder left behind"
