"""`tunesmith export RUN_DIR --format hf --out DIR`: the run's model as a plain Hugging Face folder,
proven to answer like the run by loading it back with an independent reader.

The folder holds merged safetensors (an adapter folded into its base; a full fine-tune's own weights),
the tokenizer with the run's chat template, `generation_config.json` whose `eos_token_id` is the EOS
and end-of-turn ids generation stops at (tunesmith.models.tokens.stop_ids), `prompt.json` and
`variant.json` (as a variant folder has them), `model_card.md` from the run and `export.json`.

Verification: plain `transformers.AutoModelForCausalLM/AutoTokenizer.from_pretrained(folder)` (not
tunesmith's loader) scores the run's test split as the eval stage did (same prompt format, same label
scoring), and its predictions are compared with the run's predictions/test.jsonl. Below
`min_agreement` the export is refused with a ParityError (exit 1: a defect, not bad input) and the
staged folder is removed: nothing is left at --out.

The export is built in a hidden staging folder beside --out and renamed into place at the end; an
existing non-empty --out is never touched (InputError, exit 2).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tunesmith import fsio
from tunesmith.config import load_config
from tunesmith.data.prepare import load_splits
from tunesmith.errors import InputError, ParityError, RunDirError
from tunesmith.evaluate.preference import reference_rows
from tunesmith.models.tokens import stop_ids
from tunesmith.optimize.engines import save_hf
from tunesmith.optimize.source import open_source
from tunesmith.optimize.variants import NotApplicable
from tunesmith.tasks.metrics import compute_metrics
from tunesmith.tasks.predict import predict
from tunesmith.tasks.prompts import PromptFormat

FORMATS = ("hf",)
EXPORT_FILE = "export.json"


@dataclass
class ExportResult:
    """What export.json records: the folder, its files and how the independent reader agreed with the run."""

    format: str
    path: str
    files: list[str]
    size_mb: float
    reader: str
    agreement: float
    metric: str
    metric_export: float
    metric_run: float
    delta: float
    n: int
    load_seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def check_out(out: Path) -> None:
    """Refuse an --out that exists and is not an empty folder (it is left untouched)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError("--out exists and is not an empty folder", str(out),
                         "give a new folder; an existing export is never overwritten")


def export_hf(run_dir: Path, out: Path, min_agreement: float = 0.98) -> ExportResult:
    """Write the run's model as a verified Hugging Face folder at `out`; return what export.json says.

    Raises:
        InputError / RunDirError: bad --out, not an evaluated run, a run whose trained part is not in
            the weights (soft prompt, prefix) or a text run (no predictions to compare).
        ParityError: the read-back model agrees with the run's predictions on fewer than
            `min_agreement` of the test rows; nothing is left at `out`.
    """
    run_dir, out = Path(run_dir), Path(out)
    if not 0.0 <= min_agreement <= 1.0:
        raise InputError(f"--min-agreement must be between 0 and 1, got {min_agreement}", "--min-agreement")
    check_out(out)
    project, splits, rows = _open_evaluated(run_dir)
    staging = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        fmt = _write_folder(run_dir, project, splits, staging)
        test = _test_rows(project, splits, rows, run_dir)
        result = _verify(staging, project, fmt, test, rows, min_agreement)
        result.path = str(out)
        result.files = sorted([p.name for p in staging.iterdir()] + [EXPORT_FILE])
        fsio.write_json(staging / EXPORT_FILE, result.to_json())
        if out.exists():  # an empty folder (checked above)
            out.rmdir()
        os.replace(staging, out)
        fsio.fsync_dir(out.parent)
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _open_evaluated(run_dir: Path):
    """(project, splits, predictions/test.jsonl rows) of an evaluated run directory."""
    for needed in ("config.yaml", "data/report.json", "model/tunesmith.json", "predictions/test.jsonl"):
        if not (run_dir / needed).exists():
            raise RunDirError(f"not an evaluated run directory (no {needed})", str(run_dir),
                              "give a folder made by `tunesmith run` (or run `tunesmith eval` on it)")
    project = load_config(run_dir / "config.yaml", check_files=False)
    if project.task.type == "text":
        raise InputError("export does not support task.type text (its check compares test predictions, and a "
                         "text run makes none)", "task.type", "use the run's model/ folder as it is")
    return project, load_splits(run_dir / "data"), fsio.read_jsonl(run_dir / "predictions/test.jsonl")


def _write_folder(run_dir: Path, project, splits, folder: Path) -> PromptFormat:
    """Merged weights, tokenizer (with chat template), prompt.json, generation config, model card."""
    source = open_source(run_dir, project, splits, progress=False)
    try:
        model = source.plain()
    except NotApplicable as e:
        raise InputError(f"cannot export this run as plain weights: {e}", str(run_dir)) from None
    save_hf(model, source.tokenizer, source.fmt, folder, exported_from=str(run_dir.resolve()))
    write_generation_config(model, source.tokenizer, folder)
    if (run_dir / "model_card.md").is_file():
        shutil.copyfile(run_dir / "model_card.md", folder / "model_card.md")
    return source.fmt


def write_generation_config(model, tokenizer, folder: Path) -> dict:
    """generation_config.json: EOS = the ids training's answers end with and generation stops at."""
    from transformers import GenerationConfig

    eos = stop_ids(tokenizer)
    config = GenerationConfig.from_model_config(model.config)
    config.eos_token_id = eos[0] if len(eos) == 1 else eos
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id
    config.save_pretrained(str(folder))
    return config.to_dict()


def _test_rows(project, splits, rows: list[dict], run_dir: Path):
    """The test examples the eval stage scored, in the order of predictions/test.jsonl."""
    test = splits.test[: project.eval.max_examples] if project.eval.max_examples else splits.test
    test, _ = reference_rows(project, test)
    if len(test) != len(rows) or any(ex.input != r["text"] for ex, r in zip(test, rows)):
        raise RunDirError("predictions/test.jsonl does not match the run's test split", str(run_dir),
                          "re-run `tunesmith eval RUN_DIR`")
    return test


def read_back(folder: Path, project, fmt: PromptFormat, test) -> tuple[list[str], float]:
    """(predictions, load seconds) of the folder loaded by plain transformers, scored as the eval stage does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    load_seconds = time.perf_counter() - started
    if tokenizer.pad_token_id is None:  # padding only; masked out
        tokenizer.pad_token = tokenizer.eos_token
    preds = predict(model, tokenizer, fmt, test, batch_size=project.eval.batch_size,
                    max_new_tokens=project.eval.max_new_tokens, sampling=project.eval.generation)
    return preds.texts, load_seconds


def _verify(folder: Path, project, fmt: PromptFormat, test, rows: list[dict], min_agreement: float) -> ExportResult:
    import transformers

    texts, load_seconds = read_back(folder, project, fmt, test)
    run_texts = [r["prediction"] for r in rows]
    golds = [ex.target for ex in test]
    metric = project.objective.metric
    agreement = sum(a == b for a, b in zip(texts, run_texts)) / max(len(rows), 1)
    m_export = compute_metrics(project.task.type, golds, texts).get(metric)
    m_run = compute_metrics(project.task.type, golds, run_texts).get(metric)
    delta = None if m_export is None or m_run is None else round(m_export - m_run, 6)
    weights = list(folder.glob("*.safetensors"))
    result = ExportResult("hf", str(folder), [], round(sum(p.stat().st_size for p in weights) / 2**20, 2),
                          f"transformers {transformers.__version__}", round(agreement, 6), metric, m_export, m_run,
                          delta, len(rows), round(load_seconds, 3))
    if agreement < min_agreement:
        raise ParityError(f"the exported model agrees with the run's predictions on {agreement:.4f} of "
                          f"{len(rows)} test rows (below --min-agreement {min_agreement}); {metric} "
                          f"{m_export} vs {m_run}; nothing was written", "export",
                          "report this as a bug (run with --debug)")
    return result
