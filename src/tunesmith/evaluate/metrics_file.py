"""A run's metrics.json read back as eval writes it: every figure of the baseline and the fine-tuned
model a number or null (runs.figures_problem, which summary.json's copy is checked with too)."""

from __future__ import annotations

from pathlib import Path

from tunesmith import fsio
from tunesmith.runs import figures_problem


def read_metrics(run_dir: Path) -> dict:
    """metrics.json of `run_dir`; DamagedFile naming it and the first figure that is not a number or null."""
    path = Path(run_dir) / "metrics.json"
    metrics = fsio.read_json(path, dict)
    if problem := figures_problem(metrics):
        raise fsio.DamagedFile(path, problem, what="not what tunesmith wrote")
    return metrics
