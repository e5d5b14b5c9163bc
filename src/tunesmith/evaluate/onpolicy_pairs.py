"""`tunesmith data pairs RUN_DIR --out DIR`: preference pairs with on-policy negatives from a finished run.

For each training row of a generation or chat run, the run's fine-tuned model answers the prompt greedily;
where that answer is wrong (SQuAD exact match after normalisation is 0), the row becomes a pair with the
gold answer as `chosen` and the model's own answer as `rejected`. Rows it answers right are skipped:
they teach DPO nothing the model does not already do. The pairs are then DPO's data, typically with
`train.init_from: RUN_DIR` so DPO starts from (and is measured against) the same model.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith import fsio, hardware
from tunesmith.config import load_config
from tunesmith.data.examples import Example
from tunesmith.data.pairs import Pair
from tunesmith.data.prepare import load_splits
from tunesmith.errors import InputError, RunDirError
from tunesmith.runs import enclosing_run
from tunesmith.tasks.metrics import exact_match_pair
from tunesmith.tasks.predict import predict
from tunesmith.train.finetuned import load_finetuned

SPLITS = ("train", "validation", "test")


def build_pairs(run_dir: Path, out: Path, progress: bool = True, split: str = "train",
                keep_correct: bool = False) -> dict:
    """Write out/pairs.jsonl and out/summary.json ({rows, pairs, skipped_correct, skipped_empty}); return
    the summary. Refuses a non-empty `out` and a run that is not a finished generation/chat run.

    `split` picks the run's split the prompts come from: `train` for DPO's training pairs, `test` for a
    held-out set that is never trained on. `keep_correct` also writes the rows answered right, as plain
    {prompt, completion} rows: a held-out file then scores exact match on the whole split, and preference
    accuracy on the pairs in it."""
    run_dir, out = Path(run_dir), Path(out)
    _check_out(out)
    project, rows = _split_rows(run_dir, split)
    model, tokenizer, fmt, _ = load_finetuned(run_dir / "model", need_base=False)
    dev = hardware.device()
    answers = predict(model.to(dev), tokenizer, fmt, rows, batch_size=project.eval.batch_size,
                      max_new_tokens=project.eval.max_new_tokens,
                      autocast=hardware.use_bf16(project.eval.precision, dev),
                      progress=f"pairs: answering the {split} prompts" if progress else None).texts
    pairs, summary = on_policy_pairs(rows, answers, project.data.group_field, keep_correct)
    if summary["pairs"] == 0:  # an empty file (or one of plain rows) no preference run can train or score on
        raise InputError(f"no preference pairs: of the {summary['rows']} {split} rows the run answered "
                         f"{summary['skipped_correct']} right and {summary['skipped_empty']} with nothing", "--split",
                         "take the prompts from a split the run answers wrong (--split test), or pair another run")
    summary["split"] = split
    out.mkdir(parents=True, exist_ok=True)
    fsio.write_jsonl(out / "pairs.jsonl", pairs)
    summary["run_dir"] = str(run_dir.resolve())
    fsio.write_json(out / "summary.json", summary)
    return summary


def on_policy_pairs(rows: list[Example], answers: list[str], group_field: str | None = None,
                    keep_correct: bool = False) -> tuple[list, dict]:
    """(rows to write, counts): a pair for each row whose answer is not an exact match of its gold answer;
    with `keep_correct`, the others as plain prompt/completion rows."""
    written, correct, empty = [], 0, 0
    for ex, answer in zip(rows, answers):
        right = exact_match_pair(ex.target, answer) == 1.0
        blank = not right and not answer.strip()  # an empty answer is no rejected text to compare against
        correct, empty = correct + right, empty + blank
        if right or blank:
            if not keep_correct:
                continue
            row = _plain_row(ex)
        else:
            row = Pair(ex.input, ex.target, answer, None, ex.messages, ex.source).to_json()
        if group_field and ex.group is not None:  # keeps data.group_field splits working on the pairs
            row[group_field] = ex.group
        written.append(row)
    pairs = len(written) - (correct + empty if keep_correct else 0)
    return written, {"rows": len(rows), "pairs": pairs, "skipped_correct": correct, "skipped_empty": empty,
                     "kept_unpaired": correct + empty if keep_correct else 0}


def _plain_row(ex: Example) -> dict:
    """A row answered right, as the prompt/completion row it came from (a chat row keeps its turns)."""
    if ex.messages is not None:
        return {"messages": [*ex.messages, {"role": "assistant", "content": ex.target}]}
    return {"prompt": ex.input, "completion": ex.target}


def _check_out(out: Path) -> None:
    if (run := enclosing_run(out)) is not None:
        raise InputError(f"is inside the run directory {run}; a run's folders hold only what it wrote",
                         f"--out {out}", "give a new folder outside any run")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError("exists and is not empty; nothing was written", f"--out {out}", "give a new or empty folder")


def _split_rows(run_dir: Path, split: str) -> tuple:
    """(the run's config, the split's real rows with a reference answer)."""
    if split not in SPLITS:
        raise InputError(f"unknown split '{split}'", "--split", f"one of {', '.join(SPLITS)}")
    for needed in ("config.yaml", "data/train.jsonl", "model/tunesmith.json"):
        if not (run_dir / needed).exists():
            raise RunDirError(f"not a trained run directory (no {needed})", str(run_dir),
                              "give a folder made by `tunesmith run` or `tunesmith train`")
    project = load_config(run_dir / "config.yaml", check_files=False)
    if project.task.type not in ("generation", "chat"):
        raise InputError(f"pairs need a generation or chat run; this run's task.type is {project.task.type}",
                         str(run_dir), "give a run that answers prompts")
    # Augmented rows are paraphrases of real ones, and an undesirable KTO completion is no gold answer.
    rows = [e for e in getattr(load_splits(run_dir / "data"), split) if not e.augmented and e.desirable is not False]
    return project, rows
