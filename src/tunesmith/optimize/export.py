"""`tunesmith export RUN_DIR --format hf|gguf|ollama --out DIR`: the run's model where people run it, proven to
answer like the run by loading it back with an independent reader.

Formats are entries of FORMATS (a writer, a reader, default agreement thresholds per quantization);
`--format gguf` is documented in optimize/gguf.py (writer) and optimize/gguf_read.py (readers).

An hf folder holds merged safetensors (an adapter folded into its base; a full fine-tune's own weights),
the tokenizer with the run's chat template, `generation_config.json` whose `eos_token_id` is the EOS
and end-of-turn ids generation stops at (tunesmith.models.tokens.stop_ids), `prompt.json` and
`variant.json` (as a variant folder has them), `model_card.md` from the run and `export.json`. A gguf
folder holds `model-<quant>.gguf` (chat template and stop ids in its metadata), `prompt.json`,
`model_card.md` and `export.json`; an ollama folder is a gguf folder plus a `Modelfile`
(optimize/ollama.py) whose TEMPLATE is checked against every test prompt before the GGUF is read back.

Verification (hf; gguf's readers are in gguf_read.py): plain
`transformers.AutoModelForCausalLM/AutoTokenizer.from_pretrained(folder)` (not tunesmith's loader)
scores the run's test split as the eval stage did (same prompt format, same label scoring), and its
predictions are compared with the run's predictions/test.jsonl. Below `min_agreement` (--min-agreement,
else the run's `export.min_agreement`, else the format's default: MIN_AGREEMENT) the export is refused
with a ParityError (exit 1: a defect, not bad input) and the staged folder is removed: nothing is left
at --out.

The export is built in a new hidden staging folder beside --out (tempfile.mkdtemp: never one that
exists) and renamed into place at the end; an existing non-empty --out, or an --out whose parent
folder is missing, is refused untouched (InputError, exit 2).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tunesmith import fsio
from tunesmith.config import load_config
from tunesmith.data.prepare import load_splits
from tunesmith.errors import InputError, ParityError, RunDirError
from tunesmith.evaluate.predictions_file import require_test_predictions
from tunesmith.evaluate.preference import scored_test
from tunesmith.models.tokens import stop_ids
from tunesmith.optimize.engines import save_hf
from tunesmith.optimize.gguf import DEFAULT_QUANT, QUANTS, gguf_name, write_gguf
from tunesmith.optimize.gguf_read import ReadBack, read_gguf
from tunesmith.optimize.ollama import MODELFILE, check_export, modelfile
from tunesmith.optimize.source import open_source
from tunesmith.optimize.variants import NotApplicable
from tunesmith.registry import metric_names
from tunesmith.runs import is_run_dir
from tunesmith.tasks.metrics import compute_metrics
from tunesmith.tasks.predict import predict
from tunesmith.tasks.prompts import PromptFormat

EXPORT_FILE = "export.json"
# Least share of test predictions an export must share with the run, by format or GGUF quantization,
# when neither --min-agreement nor the run's export.min_agreement says otherwise. q4_K_M rounds weights
# to about 4.5 bits, which moves close calls: its floor is lower (measured on the quickstart and the
# tiny test model; see README "Exporting").
MIN_AGREEMENT = {"hf": 0.98, "f16": 0.98, "q8_0": 0.98, "q4_K_M": 0.90}


@dataclass(frozen=True)
class ExportFormat:
    """One export format: how the folder is written and how it is read back for verification.

    write(source, folder, quant) writes the files and returns the weight files' names;
    read(folder, project, fmt, test, source, quant) returns the reader's predictions (a ReadBack).
    """

    write: Callable
    read: Callable
    quants: tuple[str | None, ...] = (None,)
    default_quant: str | None = None


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
    quant: str | None = None
    token_mismatches: int | None = None  # test prompts the reader tokenized unlike the run (None: same tokenizer)
    min_agreement: float | None = None
    modelfile: dict | None = None  # ollama: the Modelfile check (optimize/ollama.py ModelfileCheck)

    def to_json(self) -> dict:
        return asdict(self)


def check_out(out: Path) -> None:
    """Refuse an --out that exists and is not an empty folder, or whose parent folder is missing (no
    folders are created for it: a failed export leaves nothing behind)."""
    out = Path(out)
    real, cwd = out.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:  # the export replaces --out whole: never where the user stands
        raise InputError("--out is the current folder or one above it", str(out),
                         "give a new folder, e.g. --out export")
    inside = next((p for p in real.parents if is_run_dir(p)), None)
    if inside is not None:  # a run's folders hold only what it wrote (a server loads model/, --overwrite replaces all)
        raise InputError(f"--out is inside the run directory {inside}", str(out),
                         "give a folder outside any run, e.g. beside it")
    if out.is_symlink():  # replaced by a rename, a link would be removed and its target never written
        raise InputError("--out is a symbolic link", str(out), "give the folder itself, or a new folder")
    if out.exists() and not out.is_dir():
        raise InputError("--out exists and is a file, not a folder", str(out),
                         "give a new folder; an existing file is never overwritten")
    if out.exists() and any(out.iterdir()):
        raise InputError("--out exists and is not an empty folder", str(out),
                         "give a new folder; an existing export is never overwritten")
    parent = out.absolute().parent
    if not parent.is_dir():
        what = "does not exist" if not (parent.exists() or parent.is_symlink()) else \
            f"is not a folder ({fsio.not_a_folder(parent)})" if parent.is_symlink() else "is a file, not a folder"
        raise InputError(f"--out's parent folder {what}", str(parent),
                         "create it first, or give --out inside an existing folder")
    why = None if out.exists() else fsio.uncreatable(out)
    if why:
        raise InputError(f"--out cannot be created: {why}", str(out), "give a folder path you can write to")


def export(run_dir: Path, out: Path, fmt: str = "hf", quant: str | None = None,
           min_agreement: float | None = None) -> ExportResult:
    """Write the run's model in format `fmt` (GGUF: quantization `quant`) at `out`, verified by an
    independent reader; return what export.json says.

    Raises:
        InputError / RunDirError: bad --format/--quant/--out/--min-agreement, not an evaluated run, a run
            whose trained part is not in the weights (soft prompt, prefix), a text run (no predictions to
            compare) or what the format cannot hold (a GGUF of an unsupported architecture).
        ParityError: the read-back model agrees with the run's predictions on fewer than the threshold's
            share of the test rows; nothing is left at `out`.
    """
    run_dir, out = Path(run_dir), Path(out)
    quant = check_format(fmt, quant)
    check_min_agreement(min_agreement, "--min-agreement")
    check_out(out)
    staging = _new_staging(out)
    try:
        result = stage_export(run_dir, staging, fmt, quant, min_agreement)
        result.path = str(out.absolute())  # as given, made absolute: export.json is read from anywhere
        fsio.write_json(staging / EXPORT_FILE, result.to_json())
        _install(staging, out)
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _install(staging: Path, out: Path) -> None:
    """Put the finished export at `out`, which was new or empty when the export began. Something else
    may have filled it since (another export, a user's file): that is kept, and this export is not."""
    fsio.share_like_umask(staging)
    try:
        if out.exists():
            out.rmdir()  # fails unless still empty
        os.replace(staging, out)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        raise InputError("--out was filled while the export ran: its contents were left untouched and this "
                         "export was not kept", str(out), "export again into a new folder") from None
    fsio.fsync_dir(out.parent)


def _new_staging(out: Path) -> Path:
    """A new hidden folder beside `out` (mkdtemp never reuses an existing one), with the mode a plain
    mkdir would give it (mkdtemp's 0700 would follow the folder to --out)."""
    staging = Path(tempfile.mkdtemp(dir=out.absolute().parent, prefix=f".{out.name}.export-"))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    return staging


def check_format(fmt: str, quant: str | None) -> str | None:
    """The quantization to use for `fmt` (its default when None); InputError for unknown ones."""
    if fmt not in FORMATS:
        raise InputError(f"unknown export format '{fmt}'", "--format", f"supported: {', '.join(FORMATS)}")
    spec = FORMATS[fmt]
    quant = quant or spec.default_quant
    if quant not in spec.quants:
        choices = ", ".join(q for q in spec.quants if q) or "none (leave --quant out)"
        known = any(quant in other.quants for other in FORMATS.values())
        raise InputError(f"--quant {quant} does not apply to --format {fmt}" if known else
                         f"unknown quantization type '{quant}'", "--quant", f"supported for {fmt}: {choices}")
    return quant


def check_min_agreement(value: float | None, where: str) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise InputError(f"{where} must be between 0 and 1, got {value}", where)


def threshold(project, fmt: str, quant: str | None, given: float | None) -> float:
    """--min-agreement, else the run's export.min_agreement, else the format's default."""
    if given is not None:
        return given
    if project.export.min_agreement is not None:
        return project.export.min_agreement
    return MIN_AGREEMENT[quant or fmt]


def stage_export(run_dir: Path, folder: Path, fmt: str, quant: str | None,
                 min_agreement: float | None) -> ExportResult:
    """Write and verify the export into `folder` (export.json not yet written)."""
    project, splits, rows = _open_evaluated(run_dir)
    floor = threshold(project, fmt, quant, min_agreement)
    test = scored_test(project, splits.test, rows, run_dir)
    source = open_source(run_dir, project, splits, progress=False)
    spec = FORMATS[fmt]
    weights = spec.write(source, folder, quant)
    if (run_dir / "model_card.md").is_file():
        shutil.copyfile(run_dir / "model_card.md", folder / "model_card.md")
    back = spec.read(folder, project, source.fmt, test, source, quant)
    result = _compare(back, project, test, rows, fmt, quant, floor)
    result.path = str(folder)
    result.size_mb = round(sum((folder / w).stat().st_size for w in weights) / 2**20, 2)
    result.files = sorted({p.name for p in folder.iterdir()} | {EXPORT_FILE})
    return result


def _open_evaluated(run_dir: Path):
    """(project, splits, predictions/test.jsonl rows) of an evaluated run directory."""
    if not run_dir.is_dir():
        raise RunDirError("no such run directory" if not run_dir.exists() else "not a folder", str(run_dir),
                          "give a folder made by `tunesmith run`")
    for needed in ("config.yaml", "data/report.json", "model/tunesmith.json", "predictions/test.jsonl"):
        if not (run_dir / needed).exists():
            raise RunDirError(f"not an evaluated run directory (no {needed})", str(run_dir),
                              "give a folder made by `tunesmith run` (or run `tunesmith eval` on it)")
    project = load_config(run_dir / "config.yaml", check_files=False)
    if project.task.type == "text":
        raise InputError("export does not support task.type text (its check compares test predictions, and a "
                         "text run makes none)", "task.type", "use the run's model/ folder as it is")
    return project, load_splits(run_dir / "data"), require_test_predictions(run_dir)


def _plain(source):
    """The run's model with its trained part in the weights (adapters merged)."""
    try:
        return source.plain()
    except NotApplicable as e:
        raise InputError(f"cannot export this run as plain weights: {e}", str(source.run_dir)) from None


def _write_hf(source, folder: Path, quant: None) -> list[str]:
    """Merged weights, tokenizer (with chat template), prompt.json, generation config."""
    model = _plain(source)
    save_hf(model, source.tokenizer, source.fmt, folder, exported_from=str(source.run_dir.resolve()))
    write_generation_config(model, source.tokenizer, folder)
    return [p.name for p in folder.glob("*.safetensors")]


def _write_gguf(source, folder: Path, quant: str) -> list[str]:
    """model-<quant>.gguf (chat template and stop ids in its metadata) and prompt.json."""
    name = gguf_name(quant)
    write_gguf(_plain(source), source.tokenizer, folder / name, quant, name=source.project.name)
    fsio.write_json(folder / "prompt.json", source.fmt.to_json())
    return [name]


def _write_ollama(source, folder: Path, quant: str) -> list[str]:
    """The GGUF (as --format gguf) and a Modelfile whose FROM, TEMPLATE, SYSTEM and stops are the run's."""
    weights = _write_gguf(source, folder, quant)
    text = modelfile(source.fmt, source.tokenizer, weights[0], source.project.eval.generation,
                     source.project.eval.max_new_tokens)
    fsio.write_text(folder / MODELFILE, text)
    return weights


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


def read_back(folder: Path, project, fmt: PromptFormat, test) -> ReadBack:
    """The hf folder loaded by plain transformers, scored as the eval stage does."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    # What a user's plain load does, with the two safety settings stated rather than left to defaults.
    model = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    load_seconds = time.perf_counter() - started
    if tokenizer.pad_token_id is None:  # padding only; masked out
        tokenizer.pad_token = tokenizer.eos_token
    preds = predict(model, tokenizer, fmt, test, batch_size=project.eval.batch_size,
                    max_new_tokens=project.eval.max_new_tokens, sampling=project.eval.generation)
    return ReadBack(preds.texts, load_seconds, f"transformers {transformers.__version__}")


def _read_hf(folder: Path, project, fmt: PromptFormat, test, source, quant: None) -> ReadBack:
    return read_back(folder, project, fmt, test)


def _read_gguf(folder: Path, project, fmt: PromptFormat, test, source, quant: str) -> ReadBack:
    return read_gguf(folder / gguf_name(quant), project, fmt, test, source.tokenizer)


def _read_ollama(folder: Path, project, fmt: PromptFormat, test, source, quant: str) -> ReadBack:
    """The Modelfile's TEMPLATE rendered for every test row must be the prompt the run scored (else
    ParityError), then the GGUF is read back as --format gguf reads it."""
    check = check_export((folder / MODELFILE).read_text(encoding="utf-8"), fmt, source.tokenizer, test)
    if not check.ok:
        raise ParityError(f"the Modelfile TEMPLATE differs from the run's prompt on {check.mismatches} of "
                          f"{check.rows} test rows ({'; '.join(check.problems) or check.first_mismatch}); nothing "
                          "was written", "export", "report this as a bug (run with --debug)")
    back = _read_gguf(folder, project, fmt, test, source, quant)
    back.modelfile = asdict(check)
    return back


def _compare(back: ReadBack, project, test, rows: list[dict], fmt: str, quant: str | None,
             floor: float) -> ExportResult:
    """Agreement and metric delta of the reader's predictions against the run's; ParityError below `floor`."""
    run_texts = [r["prediction"] for r in rows]
    golds = [ex.target for ex in test]
    metric = project.objective.metric
    exported, ran = compute_metrics(project.task.type, golds, back.texts), compute_metrics(project.task.type, golds,
                                                                                           run_texts)
    if metric not in ran:  # a pair metric (preference_accuracy) scores no predicted text: the task's first one does
        metric = metric_names(project.task.type)[0]
    agreement = sum(a == b for a, b in zip(back.texts, run_texts)) / max(len(rows), 1)
    m_export, m_run = exported.get(metric), ran.get(metric)
    delta = None if m_export is None or m_run is None else round(m_export - m_run, 6)
    result = ExportResult(fmt, "", [], 0.0, back.reader, round(agreement, 6), metric, m_export, m_run, delta,
                          len(rows), round(back.load_seconds, 3), quant, back.token_mismatches, floor,
                          back.modelfile)
    if agreement < floor:
        what = fmt if quant is None else f"{fmt} {quant}"
        raise ParityError(f"the exported model ({what}, read back by {back.reader}) agrees with the run's "
                          f"predictions on {agreement:.4f} of {len(rows)} test rows (below the minimum "
                          f"agreement {floor}); {metric} {m_export} vs {m_run}; nothing was written", "export",
                          "a lightly trained model has many close calls that rounding flips: compare the metric "
                          "figures above, and if the change is one you accept pass a lower --min-agreement "
                          "(export.min_agreement); a large disagreement on a well-trained model is a bug to report")
    return result


FORMATS: dict[str, ExportFormat] = {
    "hf": ExportFormat(_write_hf, _read_hf),
    "gguf": ExportFormat(_write_gguf, _read_gguf, QUANTS, DEFAULT_QUANT),
    "ollama": ExportFormat(_write_ollama, _read_ollama, QUANTS, DEFAULT_QUANT),
}
