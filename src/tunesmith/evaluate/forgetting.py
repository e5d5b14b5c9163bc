"""Forgetting check: a small general probe, unrelated to the task, scored before and after tuning."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from tunesmith.data.examples import Example
from tunesmith.tasks.metrics import compute_metrics
from tunesmith.tasks.predict import predict
from tunesmith.tasks.prompts import PromptFormat

PROBE = Path(__file__).parent / "probes" / "sst2_dev40.jsonl"
INSTRUCTION = "Is the sentiment of this movie review sentence positive or negative?"


@lru_cache(maxsize=1)
def probe_examples() -> tuple[Example, ...]:
    rows = [json.loads(line) for line in PROBE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return tuple(Example(r["text"], r["label"], f"{PROBE.name}:{i + 1}") for i, r in enumerate(rows))


def probe_accuracy(model, tokenizer, max_length: int, autocast: bool = False) -> float:
    """Accuracy of `model` on the shipped probe (SST-2 sentences, label scoring)."""
    examples = list(probe_examples())
    fmt = PromptFormat("classification", INSTRUCTION, ["positive", "negative"], True, max_length)
    preds = predict(model, tokenizer, fmt, examples, autocast=autocast)
    return compute_metrics("classification", [e.target for e in examples], preds.texts)["accuracy"]


def forgetting_report(baseline: float, finetuned: float) -> dict:
    """The probe's before/after figures as stored in metrics.json under `forgetting`."""
    return {"probe": PROBE.stem, "examples": len(probe_examples()), "baseline_accuracy": baseline,
            "finetuned_accuracy": finetuned, "delta": round(finetuned - baseline, 4)}
