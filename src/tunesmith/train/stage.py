"""The train stage: base model + curated splits in, a saved fine-tuned model out."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tunesmith import fsio, hardware
from tunesmith.config import Project
from tunesmith.data.pairs import refuse_undesirable_targets
from tunesmith.data.prepare import Splits
from tunesmith.models.load import load_tokenizer
from tunesmith.models.resolve import resolve_model
from tunesmith.registry import METHOD_SPECS
from tunesmith.tasks.chat_template import check_chat_template, use_chat_template
from tunesmith.tasks.prompts import answer_only, build_format
from tunesmith.train import distributed
from tunesmith.train.finetuned import save_finetuned
from tunesmith.train.init_from import merged_init
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
    hardware.steady_heap()  # batch shapes vary step to step: without it the heap only grows
    if not METHOD_SPECS[project.train.method].preference:
        refuse_undesirable_targets(splits.train, project.train.method)
    base_path = resolve_model(project.model)
    tokenizer, fmt = _checked_tokenizer(project, splits, base_path)
    if project.train.init_from is not None:  # e.g. DPO after SFT: that run's merged model is the base
        base_path = merged_init(project.train.init_from, run_dir / "model")
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


def check_method_fits(project: Project) -> None:
    """The method's settings that depend on the model (an adapter's rank against the layers' width, its
    target layers) checked on the model's shape alone: built on the meta device, no weights read. For
    the commands that train several configs (compare, tune), so such a value fails before the first
    training rather than after it. Any other failure is left to the training itself to report."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunesmith.errors import TunesmithError

    if METHOD_SPECS[project.train.method].kind == "prompt" or project.train.init_from is not None:
        return  # nothing attached to weights; an init_from base is that run's merged model, checked there
    base_path = resolve_model(project.model)
    try:
        config = AutoConfig.from_pretrained(str(base_path), trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        get_method(project.train.method).apply(model, project.train)
    except TunesmithError:
        raise
    except Exception:  # noqa: BLE001 - an architecture that will not build on meta: training finds out
        return


def _checked_tokenizer(project: Project, splits: Splits, base_path: Path):
    """The tokenizer with task.chat_template on it (saved with the model: serve renders the same) and the
    prompt format, the template checked against the rows before anything is written: merging
    train.init_from's weights comes after. Test rows are checked too, on their last answer (all eval
    scores), so a row the template cannot render fails now, not in eval after training."""
    init = project.train.init_from
    # train.init_from's merged base (train/init_from.py) carries that run's saved tokenizer unchanged.
    tokenizer = load_tokenizer(Path(init) / "model" if init is not None else base_path)
    use_chat_template(tokenizer, project.task, project.base_dir)
    fmt = build_format(project.task, splits.labels, tokenizer)
    name = project.task.chat_template
    notes = check_chat_template(tokenizer, fmt, splits.train + splits.validation, name)
    check_chat_template(tokenizer, answer_only(fmt), splits.test, name)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    return tokenizer, fmt
