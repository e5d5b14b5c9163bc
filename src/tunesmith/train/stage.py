"""The train stage: base model + curated splits in, a saved fine-tuned model out."""

from __future__ import annotations

import shutil
from pathlib import Path

from tunesmith import fsio
from tunesmith.config import Project
from tunesmith.data.prepare import Splits
from tunesmith.models.load import load_tokenizer
from tunesmith.models.resolve import resolve_model
from tunesmith.tasks.prompts import build_format
from tunesmith.train import distributed
from tunesmith.train.finetuned import save_finetuned
from tunesmith.train.methods import get_method
from tunesmith.train.trackers import check_available
from tunesmith.train.trainer import TrainResult, fit, load_base


def train_stage(project: Project, splits: Splits, run_dir: Path, progress: bool = True,
                resume: bool = False, on_validate=None) -> TrainResult:
    """Fine-tune the project's model and save it under run_dir/model with its tokenizer and prompt.

    With `resume`, training continues from the newest checkpoint in run_dir/checkpoints. Once the
    model is saved the checkpoints are deleted: they exist only to survive an interruption.
    """
    check_available(project.train.trackers)
    base_path = resolve_model(project.model)
    tokenizer = load_tokenizer(base_path)
    fmt = build_format(project.task, splits.labels, tokenizer)
    model = load_base(base_path, project.train)
    # A method may bring its own fitting procedure (prompt search); weight-training methods share `fit`.
    fitter = getattr(get_method(project.train.method), "fit", fit)
    extra = {"on_validate": on_validate} if on_validate else {}
    result = fitter(model, tokenizer, fmt, splits.train, splits.validation, project.train, project.objective.metric,
                    out_dir=run_dir, progress=progress, resume=resume, **extra)
    if distributed.rank() == 0:
        save_finetuned(result.model, tokenizer, result.fmt or fmt, project, base_path, run_dir / "model")
        fsio.write_json(run_dir / "train.json", {"stats": result.stats.to_json(), "best": result.best,
                                                 "history": result.history, "overfitting": result.overfitting,
                                                 "preflight": result.preflight})
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    distributed.barrier()
    return result
