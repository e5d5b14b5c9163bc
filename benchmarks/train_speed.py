"""Training speed: tunesmith vs plain TRL SFTTrainer (+ PEFT LoRA), side by side, same run.

Same model (the project's), same training examples, epochs, batch size, learning rate (the project's
for its own method, the method's tunesmith default otherwise) and LoRA rank/alpha/dropout/targets;
TRL otherwise keeps its defaults. Each (tool, method, repeat) trains in a fresh subprocess so peak RSS
is its own. Test accuracy of both is measured by the same label-scoring code (tunesmith's predict) on
the project's test split. Peak memory is each process's from the start of training setup on, the model
loaded (tunesmith's fit starts a new peak window there; the TRL worker starts one before building its
trainer). Tokens/s: tunesmith over its optimiser steps, TRL over `trainer.train()`; "train s" is wall
time around each tool's training call. Prints one row per run, then medians and the
ratios tunesmith/TRL, and the fraction of this machine's measured bf16 matmul peak reached
(4 x params FLOP per token for LoRA, 6 x for full fine-tuning).

    python benchmarks/train_speed.py examples/quickstart/project.yaml --examples 128 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

FLOP_PER_TOKEN = {"lora": 4, "full": 6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--examples", type=int, default=0, help="first N training examples (0: all)")
    ap.add_argument("--epochs", type=float, default=None, help="default: the project's")
    ap.add_argument("--methods", default="lora", help="comma list of lora,full")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tools", default="tunesmith,trl")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--method", default="lora", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker](args)), flush=True)
        return
    peak = bf16_peak_gflops()
    rows = []
    for method in args.methods.split(","):
        for repeat in range(args.repeats):
            for tool in args.tools.split(","):  # alternate tools so drift in machine speed hits both
                row = run_worker(tool, method, args)
                row.update(tool=tool, method=method, repeat=repeat)
                rows.append(row)
                print(json.dumps(row), flush=True)
    summarise(rows, peak, args)


def run_worker(tool: str, method: str, args) -> dict:
    cmd = [sys.executable, __file__, args.config, "--worker", tool, "--method", method,
           "--examples", str(args.examples)]
    if args.epochs is not None:
        cmd += ["--epochs", str(args.epochs)]
    return run_result(cmd, f"{tool} {method}")


def run_result(cmd: list[str], label: str) -> dict:
    """Run one worker process and return the JSON of its last `RESULT ` line; exit naming `label` on failure."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{label} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def setup(args):
    """(project, train split, test split, resolved model path) exactly as tunesmith prepares them."""
    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare_data
    from tunesmith.models.resolve import resolve_model
    from tunesmith.registry import METHOD_SPECS

    project = load_config(args.config)
    if args.epochs is not None:
        project.train.epochs = args.epochs
    if args.method != project.train.method:
        # Another technique than the project's: its own default learning rate, for both tools.
        project.train.learning_rate = METHOD_SPECS[args.method].learning_rate
    project.train.method = args.method
    splits = prepare_data(project)
    train = splits.train[: args.examples] if args.examples else splits.train
    return project, splits, train, resolve_model(project.model)


def tunesmith_worker(args) -> dict:
    from tunesmith import hardware
    from tunesmith.config import derive
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.tasks.prompts import build_format
    from tunesmith.train.trainer import fit

    project, splits, train, path = setup(args)
    cfg = derive(project.train, {"eval_every": 10**6, "early_stopping": False, "trackers": []})
    tokenizer = load_tokenizer(path)
    fmt = build_format(project.task, splits.labels, tokenizer)
    started = time.perf_counter()
    result = fit(load_model(path), tokenizer, fmt, train, splits.validation, cfg, project.objective.metric,
                 progress=False)
    wall = time.perf_counter() - started
    stats = result.stats
    return {"tokens": stats.train_tokens, "train_seconds": stats.train_seconds, "fit_wall_seconds": wall,
            "tokens_per_second": stats.tokens_per_second, "peak_rss_mb": hardware.peak_rss_mb(),
            "gpu_peak_mb": gpu_peak_mb(), "accuracy": accuracy(result.model, tokenizer, fmt, splits.test),
            "params": stats.total_params}


def trl_worker(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tunesmith import hardware
    from tunesmith.tasks.prompts import build_format

    project, splits, train, path = setup(args)
    tokenizer = AutoTokenizer.from_pretrained(path)
    fmt = build_format(project.task, splits.labels, tokenizer)
    # Conversational prompt-completion: TRL applies the same chat template and trains on the completion.
    data = Dataset.from_list([{"prompt": fmt.messages(e), "completion": [{"role": "assistant", "content": e.target}]}
                              for e in train])
    cfg = project.train
    peft_config = None
    if args.method == "lora":
        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    sft = SFTConfig(output_dir=str(Path("/tmp") / f"trl-bench-{time.time_ns()}"), num_train_epochs=cfg.epochs,
                    per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                    report_to=[], save_strategy="no", logging_steps=10**6, use_cpu=not torch.cuda.is_available(),
                    seed=cfg.seed, max_length=project.task.max_length)
    model = AutoModelForCausalLM.from_pretrained(path)
    # Peak memory from here on, as tunesmith's fit counts it (it starts a new peak window, the model loaded).
    hardware.reset_peaks()
    trainer = SFTTrainer(model=model, args=sft, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config)
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"]) * cfg.epochs
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    model = trainer.model.eval()
    return {"tokens": int(tokens), "train_seconds": seconds, "fit_wall_seconds": seconds,
            "tokens_per_second": hardware.throughput(int(tokens), seconds), "peak_rss_mb": hardware.peak_rss_mb(),
            "gpu_peak_mb": gpu_peak_mb(), "accuracy": accuracy(model, tokenizer, fmt, splits.test),
            "params": sum(p.numel() for p in model.parameters()), "bf16": bool(sft.bf16)}


def accuracy(model, tokenizer, fmt, test) -> float:
    from tunesmith.tasks.metrics import compute_metrics
    from tunesmith.tasks.predict import predict

    preds = predict(model, tokenizer, fmt, test, batch_size=16)
    return compute_metrics("classification", [e.target for e in test], preds.texts)["accuracy"]


def bf16_peak_gflops(repeats: int = 10) -> float:
    """Median bf16 matmul throughput of this machine's training device, measured now."""
    import torch

    from tunesmith import hardware

    dev = hardware.device()
    n = 8192 if dev.type == "cuda" else 2048
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=dev) for _ in range(2))
    a @ b
    times = []
    for _ in range(repeats):
        _sync(dev)
        started = time.perf_counter()
        a @ b
        _sync(dev)
        times.append(time.perf_counter() - started)
    return 2 * n**3 / statistics.median(times) / 1e9


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def gpu_peak_mb() -> float | None:
    """Peak GPU memory allocated by torch in this process (None on CPU)."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None


def summarise(rows: list[dict], peak: float, args) -> None:
    print(f"\nbf16 matmul peak measured: {peak:.0f} GFLOP/s; medians of {args.repeats} runs")
    memory = "GPU peak MB" if rows and rows[0].get("gpu_peak_mb") else "peak RSS MB"
    header = f"{'method':6} {'tool':10} {'tokens/s':>9} {'train s':>8} {memory:>11} {'accuracy':>8} {'% peak':>7}"
    print(header)
    med = {}
    for method in args.methods.split(","):
        for tool in args.tools.split(","):
            runs = [r for r in rows if r["tool"] == tool and r["method"] == method]
            m = medians(runs, ("tokens_per_second", "fit_wall_seconds", "peak_rss_mb", "accuracy", "params"))
            m["peak_fraction"] = FLOP_PER_TOKEN[method] * m["params"] * m["tokens_per_second"] / (peak * 1e9)
            med[tool, method] = m
            print(f"{method:6} {tool:10} {m['tokens_per_second']:9.1f} {m['fit_wall_seconds']:8.1f} "
                  f"{m['peak_rss_mb']:11.0f} {m['accuracy']:8.4f} {100 * m['peak_fraction']:6.1f}%")
        if ("tunesmith", method) in med and ("trl", method) in med:
            print(ratio_line(method, med["tunesmith", method], med["trl", method], "accuracy"))


def medians(runs: list[dict], keys: tuple[str, ...]) -> dict:
    """The median of each of `keys` over `runs`; peak memory is the GPU's where the runs measured it."""
    m = {k: statistics.median(r[k] for r in runs) for k in keys}
    gpu = [r["gpu_peak_mb"] for r in runs if r.get("gpu_peak_mb")]
    m["peak_rss_mb"] = statistics.median(gpu) if gpu else m["peak_rss_mb"]
    return m


def ratio_line(name: str, a: dict, b: dict, quality: str) -> str:
    """The summary line: tunesmith's medians `a` against TRL's `b`, as ratios, and the `quality` difference."""
    return (f"{name}: tunesmith/TRL tokens/s x{a['tokens_per_second'] / b['tokens_per_second']:.2f}, "
            f"training time x{a['fit_wall_seconds'] / b['fit_wall_seconds']:.2f}, "
            f"peak memory x{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}, "
            f"{quality.replace('_', ' ')} {a[quality] - b[quality]:+.4f}")


WORKERS = {"tunesmith": tunesmith_worker, "trl": trl_worker}

if __name__ == "__main__":
    main()
