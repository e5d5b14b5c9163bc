"""Prompt optimisation: the base model's weights stay as they are; the artefact is the prompt.

The search itself lives in train/prompt_search.py; this module gives it the method interface
(apply / fit / save / load) so the pipeline treats it like any other technique.
"""

from __future__ import annotations

import time
from pathlib import Path

from tunesmith import hardware

KIND = "prompt"


def apply(model, cfg):
    model.requires_grad_(False)
    return model


def fit(model, tokenizer, fmt, train, val, cfg, metric, out_dir=None, progress=True, resume=False):
    """Search prompts instead of training weights; returns a TrainResult carrying the best format."""
    from tunesmith.train.prompt_search import search
    from tunesmith.train.trainer import TrainLog, TrainResult

    model = apply(model, cfg).to(hardware.device()).eval()
    started = time.perf_counter()
    with TrainLog(out_dir / "train_log.jsonl" if out_dir else None) as log:
        best_fmt, history, best = search(model, tokenizer, fmt, train, val, cfg, metric, log, progress)
    seconds = time.perf_counter() - started
    n_trainable, n_total = hardware.parameter_counts(model)
    stats = {"train_seconds": round(seconds, 3), "train_tokens": 0, "tokens_per_second": 0.0,
             "peak_rss_mb": hardware.peak_rss_mb(), "steps": len(history), "total_steps": len(history),
             "trainable_params": n_trainable, "total_params": n_total, "candidates": len(history),
             "precision": "bf16" if hardware.use_bf16(cfg.precision, hardware.device()) else "fp32",
             "device": hardware.device().type, "best_step": best["step"], "stopped_early": False}
    return TrainResult(model, history=history, best=best, stats=stats, fmt=best_fmt)


def save(model, model_dir: Path) -> None:
    """Nothing to write: the weights are the base model's; prompt.json (written by the stage) is the artefact."""
    Path(model_dir).mkdir(parents=True, exist_ok=True)


def load(base_model, model_dir: Path):
    return base_model
