"""Prompt optimisation: the base model's weights stay as they are; the artefact is the prompt.

The search itself lives in train/prompt_search.py; this module gives it the method interface
(apply / fit / save / load) so the pipeline treats it like any other technique.
"""

from __future__ import annotations

import time
from pathlib import Path

from tunesmith import hardware


def apply(model, cfg):
    model.requires_grad_(False)
    return model


def fit(model, tokenizer, fmt, train, val, cfg, metric, out_dir=None, progress=True, resume=False):
    """Search prompts instead of training weights; returns a TrainResult carrying the best format."""
    from tunesmith.train.prompt_search import search
    from tunesmith.train.trainer import TrainLog, TrainResult, TrainStats

    model = apply(model, cfg).to(hardware.device()).eval()
    started = time.perf_counter()
    with TrainLog(out_dir / "train_log.jsonl" if out_dir else None) as log:
        best_fmt, history, best = search(model, tokenizer, fmt, train, val, cfg, metric, log, progress)
    seconds = time.perf_counter() - started
    dev = hardware.device()
    stats = TrainStats.measure(model, seconds, 0, len(history), len(history), hardware.use_bf16(cfg.precision, dev),
                               dev, best, candidates=len(history))
    return TrainResult(model, history=history, best=best, stats=stats, fmt=best_fmt)


def save(model, model_dir: Path) -> None:
    """Nothing to write: the weights are the base model's; prompt.json (written by the stage) is the artefact."""
    Path(model_dir).mkdir(parents=True, exist_ok=True)


def load(base_model, model_dir: Path):
    return base_model
