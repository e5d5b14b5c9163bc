"""The train stage: base model + curated splits in, a saved fine-tuned model out."""

from __future__ import annotations

import shutil
from pathlib import Path

from tunesmith import fsio
from tunesmith.config import Project
from tunesmith.data.prepare import Splits
from tunesmith.models.load import load_model, load_tokenizer
from tunesmith.models.resolve import resolve_model
from tunesmith.tasks.prompts import PromptFormat, build_format
from tunesmith.train import distributed
from tunesmith.train.methods import get_method
from tunesmith.train.trackers import check_available
from tunesmith.train.trainer import TrainResult, fit


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
    model = load_model(base_path)
    # A method may bring its own fitting procedure (prompt search); weight-training methods share `fit`.
    fitter = getattr(get_method(project.train.method), "fit", fit)
    extra = {"on_validate": on_validate} if on_validate else {}
    result = fitter(model, tokenizer, fmt, splits.train, splits.validation, project.train, project.objective.metric,
                    out_dir=run_dir, progress=progress, resume=resume, **extra)
    if distributed.rank() == 0:
        save_finetuned(result.model, tokenizer, result.fmt or fmt, project, base_path, run_dir / "model")
        fsio.write_json(run_dir / "train.json", {"stats": result.stats, "best": result.best,
                                                 "history": result.history, "overfitting": result.overfitting,
                                                 "preflight": result.preflight})
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    distributed.barrier()
    return result


def save_finetuned(model, tokenizer, fmt: PromptFormat, project: Project, base_path: Path, model_dir: Path) -> None:
    """Weights (adapter or full), tokenizer, prompt format and provenance, side by side."""
    method = get_method(project.train.method)
    method.save(model, model_dir)
    tokenizer.save_pretrained(str(model_dir))
    fsio.write_json(model_dir / "prompt.json", fmt.to_json())
    fsio.write_json(model_dir / "tunesmith.json", {"method": project.train.method, "kind": method.KIND,
                                                   "model": project.model, "base_model_path": str(base_path)})


def load_finetuned(model_dir: Path):
    """(model, tokenizer, prompt format, base model path) from a run's model folder."""
    meta = fsio.read_json(model_dir / "tunesmith.json")
    base_path = Path(meta["base_model_path"])
    if not (base_path / "config.json").is_file():
        base_path = resolve_model(meta["model"])
    method = get_method(meta["method"])
    base = load_model(base_path) if meta["kind"] in ("adapter", "prompt") else None
    model = method.load(base, model_dir)
    model.eval()
    fmt = PromptFormat.from_json(fsio.read_json(model_dir / "prompt.json"))
    return model, load_tokenizer(model_dir), fmt, base_path
