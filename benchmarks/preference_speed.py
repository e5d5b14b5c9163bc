"""DPO speed and memory: tunesmith vs plain TRL DPOTrainer (+ PEFT LoRA), side by side, same run.

The pairs come from a classification project's rows (the quickstart's BANKING77 intents): the prompt is
the project's prompt for the message, chosen the gold intent, rejected another intent of the project
(drawn with a fixed seed). Both tools train DPO (sigmoid loss, the adapter-off policy as reference) on
the same pairs with the same epochs, batch size, learning rate, beta and LoRA rank/alpha/dropout/targets;
TRL otherwise keeps its defaults. Each (tool, repeat) trains in a fresh subprocess so peak RSS is its
own. Tokens/s counts the same tokens for both (chosen and rejected rows, prompt included, as tunesmith
encodes them). Held-out preference accuracy (log p(chosen) > log p(rejected) on the test rows' pairs)
is scored for both by the same code (tunesmith's pair_margins). Peak memory is each process's from the
start of training setup (the model loaded: fit_pairs starts a new peak window there, the TRL worker
before building its trainer) to the end of training, before that scoring. Tokens/s: tunesmith over its
optimiser steps, TRL over `trainer.train()`; "train s" is wall time around each tool's training call
(tunesmith's with its one validation). Prints one row per run, the medians and the ratios tunesmith/TRL.

    python benchmarks/preference_speed.py examples/quickstart/project.yaml --examples 128 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from train_speed import gpu_peak_mb, medians, ratio_line, run_result  # benchmarks/ is on sys.path when this script runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--examples", type=int, default=128, help="first N training rows as pairs (0: all)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--learning-rate", type=float, default=5e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tools", default="tunesmith,trl")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker](args)), flush=True)
        return
    rows = []
    for repeat in range(args.repeats):
        for tool in args.tools.split(","):  # alternate tools so drift in machine speed hits both
            row = run_worker(tool, args)
            row.update(tool=tool, repeat=repeat)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summarise(rows, args)


def run_worker(tool: str, args) -> dict:
    cmd = [sys.executable, __file__, args.config, "--worker", tool, "--examples", str(args.examples),
           "--epochs", str(args.epochs), "--learning-rate", str(args.learning_rate), "--beta", str(args.beta)]
    return run_result(cmd, tool)


def setup(args):
    """(train config, prompt format, tokenizer, train pairs, test pairs, model path, tokens trained)."""
    from tunesmith.config import TaskConfig, derive, load_config
    from tunesmith.data.pairs import Pair
    from tunesmith.data.prepare import prepare_data
    from tunesmith.models.load import load_tokenizer
    from tunesmith.models.resolve import resolve_model
    from tunesmith.tasks.prompts import build_format
    from tunesmith.train.preference_fit import encode_pairs

    project = load_config(args.config)
    splits = prepare_data(project)
    labels = sorted({e.target for e in splits.train})
    rng = random.Random(0)

    def pairs(examples):
        return [Pair(e.input, e.target, rng.choice([x for x in labels if x != e.target]), source=e.source)
                for e in examples]

    train = pairs(splits.train[: args.examples] if args.examples else splits.train)
    test = pairs(splits.test)
    path = resolve_model(project.model)
    tokenizer = load_tokenizer(path)
    fmt = build_format(TaskConfig(type="generation", instruction=project.task.instruction,
                                  max_length=project.task.max_length), None, tokenizer)
    cfg = derive(project.train, {"method": "dpo", "epochs": args.epochs, "learning_rate": args.learning_rate,
                                 "beta": args.beta, "eval_every": 10**6, "early_stopping": False, "trackers": []})
    tokens = sum(len(e.ids) for both in encode_pairs(train, tokenizer, fmt) for e in both) * args.epochs
    return cfg, fmt, tokenizer, train, test, path, int(tokens)


def tunesmith_worker(args) -> dict:
    from tunesmith import hardware
    from tunesmith.models.load import load_model
    from tunesmith.train.preference_fit import fit_pairs

    cfg, fmt, tokenizer, train, test, path, tokens = setup(args)
    started = time.perf_counter()
    result = fit_pairs(load_model(path), tokenizer, fmt, train, test[:8], cfg, "preference_accuracy", progress=False)
    seconds = result.stats.train_seconds  # the training steps, without the one validation at the end
    wall, peak = time.perf_counter() - started, hardware.peak_rss_mb()  # before the held-out scoring
    return {"tokens": tokens, "train_seconds": seconds, "fit_wall_seconds": wall,
            "tokens_per_second": hardware.throughput(tokens, seconds), "peak_rss_mb": peak,
            "gpu_peak_mb": gpu_peak_mb(),
            "preference_accuracy": accuracy(result.model, tokenizer, fmt, test), "precision": result.stats.precision}


def trl_worker(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from tunesmith import hardware
    from tunesmith.data.pairs import pair_example

    cfg, fmt, tokenizer, train, test, path, tokens = setup(args)
    # Conversational preference rows: TRL applies the same chat template and scores the answers.
    data = Dataset.from_list([{"prompt": fmt.messages(pair_example(p, p.chosen)),
                               "chosen": [{"role": "assistant", "content": p.chosen}],
                               "rejected": [{"role": "assistant", "content": p.rejected}]} for p in train])
    peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                             target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    dpo = DPOConfig(output_dir=str(Path("/tmp") / f"trl-dpo-bench-{time.time_ns()}"), num_train_epochs=cfg.epochs,
                    per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, beta=cfg.beta,
                    report_to=[], save_strategy="no", logging_steps=10**6, use_cpu=not torch.cuda.is_available(),
                    seed=cfg.seed, max_length=fmt.max_length)
    model = AutoModelForCausalLM.from_pretrained(path)
    # Peak memory from here on, as fit_pairs counts it (it starts a new peak window, the model loaded).
    hardware.reset_peaks()
    trainer = DPOTrainer(model=model, args=dpo, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config)
    started = time.perf_counter()
    trainer.train()
    seconds, peak = time.perf_counter() - started, hardware.peak_rss_mb()  # before the held-out scoring
    return {"tokens": tokens, "train_seconds": seconds, "fit_wall_seconds": seconds,
            "tokens_per_second": hardware.throughput(tokens, seconds), "peak_rss_mb": peak,
            "gpu_peak_mb": gpu_peak_mb(),
            "preference_accuracy": accuracy(trainer.model.eval(), tokenizer, fmt, test),
            "precision": "bf16" if dpo.bf16 else "fp32"}


def accuracy(model, tokenizer, fmt, pairs) -> float:
    from tunesmith.tasks.metrics import compute_metrics
    from tunesmith.train.preference_fit import pair_margins

    margins = pair_margins(model, tokenizer, fmt, pairs, batch_size=16)
    return compute_metrics("preference", [""] * len(margins), margins)["preference_accuracy"]


def summarise(rows: list[dict], args) -> None:
    print(f"\nmedians of {args.repeats} runs")
    memory = "GPU peak MB" if rows and rows[0].get("gpu_peak_mb") else "peak RSS MB"
    print(f"{'tool':10} {'tokens/s':>9} {'train s':>8} {memory:>11} {'pref acc':>8} precision")
    med = {}
    for tool in args.tools.split(","):
        runs = [r for r in rows if r["tool"] == tool]
        m = med[tool] = medians(runs, ("tokens_per_second", "fit_wall_seconds", "peak_rss_mb", "preference_accuracy"))
        print(f"{tool:10} {m['tokens_per_second']:9.1f} {m['fit_wall_seconds']:8.1f} {m['peak_rss_mb']:11.0f} "
              f"{m['preference_accuracy']:8.4f} {runs[0]['precision']}")
    if "tunesmith" in med and "trl" in med:
        print(ratio_line("dpo", med["tunesmith"], med["trl"], "preference_accuracy"))


WORKERS = {"tunesmith": tunesmith_worker, "trl": trl_worker}

if __name__ == "__main__":
    main()
