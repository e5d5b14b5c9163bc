"""Reading project.yaml into a validated Project (errors name the file, line and key), deriving
configs with validation, and writing the resolved config."""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tunesmith.config import yaml_text
from tunesmith.config.schema import _C, Project, _KeyedError, unread_preference_setting
from tunesmith.config.sources import (
    COLUMN_FIELDS,
    HF_PREFIX,
    DataSource,
    GlobTooWide,
    folder_problem,
    locate_path,
)
from tunesmith.errors import ConfigError


def load_config(path: str | Path, check_files: bool = True) -> Project:
    """Read, validate and resolve a project.yaml.

    Args:
        path: the config file.
        check_files: require the data files to exist (off when re-reading a run's saved config).

    Raises:
        ConfigError: naming `file:line (key.path)` for any problem.
    """
    path = Path(path)
    if not path.is_file():
        what = "is not a regular file (a folder, a device or a pipe)" if path.exists() else "not found"
        raise ConfigError(f"config file {what}", str(path), "give the path to a project.yaml")
    text = _read(path)
    try:
        root, raw = yaml_text.load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"invalid YAML: {problem}", f"{path}{line}",
                          getattr(e, "hint", "check indentation and quoting")) from None
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a YAML mapping of keys", str(path), "see README, 'Config reference'")
    try:
        project = Project.model_validate(raw)
    except ValidationError as e:
        raise _config_error(e, path, root) from None
    if check_files and (unread := unread_preference_setting(project.train)) is not None:
        raise ConfigError(unread[1], _where(path, root, unread[0]), "fix the key or its value")
    project.source = path.resolve()
    try:
        _resolve_paths(project, root, check_files)
    except RuntimeError as e:  # Path.resolve() on a link loop, up to Python 3.12 (_check_data_path: later ones)
        if not str(e).startswith("Symlink loop"):
            raise
        raise ConfigError(f"a path of the config is a symbolic link loop ({e})", str(path),
                          "fix the link, or give the file itself") from None
    return project


MAX_CONFIG_BYTES = 1 << 20   # a project.yaml is a few KB; anything past this is not one


def _read(path: Path) -> str:
    with path.open("rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)  # never the whole of a huge file
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file is over {MAX_CONFIG_BYTES >> 20} MiB: not a project.yaml", str(path),
                          "give the project's config file (rows belong in the data files it names)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config is not UTF-8 text ({e.reason})", str(path), "save it as UTF-8") from None


def _resolve_paths(project: Project, root: yaml.Node, check_files: bool) -> None:
    base = project.base_dir
    seen: dict = {}
    for key in ("train", "validation", "test"):
        try:
            _resolve_data(project, root, key, check_files, seen)
        except RuntimeError as e:  # a link loop (see load_project), here named by its key's line
            if not str(e).startswith("Symlink loop"):
                raise
            raise ConfigError(f"data.{key} is a symbolic link loop ({e})", _where(project.source, root, ("data", key)),
                              "fix the link, or give the file itself") from None
    if project.data.corrections is not None:
        project.data.corrections = _corrections_file(project, root, check_files)
    for i, suite in enumerate(project.benchmarks):
        resolved = suite.data if suite.data.is_absolute() else (base / suite.data).resolve()
        if check_files and not resolved.is_file():
            raise ConfigError(f"benchmark data file not found: {resolved}",
                              _where(project.source, root, ("benchmarks", i, "data")),
                              "paths are relative to the config file's folder")
        suite.data = resolved
    if project.task.chat_template.endswith(".jinja"):
        project.task.chat_template = _template_file(project.task.chat_template, base, check_files,
                                                    lambda: _where(project.source, root, ("task", "chat_template")))
    if project.train.init_from is not None:
        project.train.init_from = _init_run(project.train.init_from, base, check_files,
                                            lambda: _where(project.source, root, ("train", "init_from")))
    log = project.serve.request_log
    if log.path is not None and not log.path.is_absolute():  # else the folder `serve` was started in
        log.path = (base / log.path).resolve()
    harness = project.eval.harness
    if harness.include_path is not None:
        resolved = (harness.include_path if harness.include_path.is_absolute()
                    else (base / harness.include_path).resolve())
        if check_files and not resolved.is_dir():
            raise ConfigError(f"task folder not found: {resolved}", _where(project.source, root,
                                                                         ("eval", "harness", "include_path")),
                              "paths are relative to the config file's folder")
        harness.include_path = resolved
    if harness.tasks and check_files and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("eval.harness needs lm-evaluation-harness, which is not installed",
                          _where(project.source, root, ("eval", "harness", "tasks")), "pip install lm-eval")


def _resolve_data(project: Project, root: yaml.Node, key: str, check_files: bool, seen: dict) -> None:
    """data.KEY's paths made absolute and globs expanded (recorded in the source's `files`), so the run's
    saved config.yaml reads the same files again; with check_files each must exist, and no file may be
    read twice (`seen`, shared by train, validation and test: a file in two splits would leak)."""
    value, base = getattr(project.data, key), project.base_dir
    if isinstance(value, Path):  # a plain path (a glob became a source list)
        resolved = value if value.is_absolute() else (base / value).resolve()
        where = _where(project.source, root, ("data", key))
        if check_files:
            _check_data_path(resolved, where)
            _once(str(resolved), f"data.{key}", where, seen)
        setattr(project.data, key, resolved)
        return
    if not isinstance(value, list):
        return
    listed = isinstance(_node(root, ("data", key)), yaml.SequenceNode)
    for i, src in enumerate(value):
        loc = ("data", key, i) if listed else ("data", key)
        where = _where(project.source, root, loc)
        if src.columns is not None:
            _check_columns_fit(project, root, (*loc, "columns"), src.columns)
        for file in _resolve_source(src, base, check_files, where):
            if check_files:
                _once(file, ".".join(map(str, loc)), where, seen)


def _corrections_file(project: Project, root: yaml.Node, check_files: bool) -> Path:
    """data.corrections made absolute (relative to the config file's folder, as data files are); with
    check_files it must be a file, and the task must have labels to correct."""
    path = project.data.corrections
    resolved = path if path.is_absolute() else (project.base_dir / path).resolve()
    where = _where(project.source, root, ("data", "corrections"))
    if check_files and project.task.type != "classification":
        raise ConfigError(f"data.corrections applies to classification tasks, not {project.task.type}", where,
                          "remove data.corrections")
    if check_files and not resolved.is_file():
        raise ConfigError(f"corrections file not found: {resolved}", where,
                          "paths are relative to the config file's folder")
    return resolved


def _once(file: str, key: str, where: str, seen: dict) -> None:
    """Refused when `file` was given already (by path, or as the same file under another name: a hard link)."""
    try:
        st = os.stat(file)
        identity = (st.st_dev, st.st_ino) if st.st_ino else file  # 0: a file system without inode numbers
    except OSError:  # not there (yet): its path is all there is to compare
        identity = file
    if identity in seen:
        raise ConfigError(f"{file} is read twice: by {seen[identity]} and by {key}", where,
                          "give each file to one source of one split (a glob or a hard link may name it too)")
    seen[identity] = key


def _check_columns_fit(project: Project, root: yaml.Node, loc: tuple, columns: dict[str, str]) -> None:
    """A source's own `columns` map fields of the task's type, as data.columns must."""
    fields = COLUMN_FIELDS[project.task.type]
    bad = next((name for name in columns if name not in fields), None)
    if bad is not None:
        raise ConfigError(f"{'.'.join(map(str, loc))}: '{bad}' is not a field of a {project.task.type} task",
                          _where(project.source, root, (*loc, bad)), f"map one of: {', '.join(fields)}")


def _resolve_source(src: DataSource, base: Path, check_files: bool, where: str) -> list[str]:
    """Resolve one source in place; returns the files (or folder, or hf:// reference) it reads."""
    if src.path.startswith(HF_PREFIX):
        return [src.path]
    written = src.path
    try:
        located = locate_path(written, base, None if check_files else src.files)
    except GlobTooWide as e:
        raise ConfigError(f"the glob {written} cannot be matched: {e}", where,
                          "name the folder to search without the link loop, or a narrower glob") from None
    src.path, src.files = located.path, located.files
    if located.files is None:
        if check_files:
            _check_data_path(Path(located.path), where)
        return [located.path]
    if check_files and not located.files:
        raise ConfigError(f"no data file matches {written}", where,
                          f"globs are relative to the config file's folder ({base}), e.g. data/*.jsonl")
    return list(located.files)


def _check_data_path(path: Path, where: str) -> None:
    """A data file, or a `datasets` save_to_disk folder of one split."""
    if path.is_file():
        return
    if path.is_dir():
        problem = folder_problem(path)
        if problem is not None:
            raise ConfigError(f"{path} {problem[0]}", where, problem[1])
        return
    if path.exists():  # a fifo, socket or device: reading it could block forever
        raise ConfigError(f"{path} is not a regular file", where, "give a data file")
    if path.is_symlink():
        raise ConfigError(f"{path} is a symbolic link loop or a link to nothing", where,
                          "fix the link, or give the file itself")
    raise ConfigError(f"data file not found: {path}", where, "paths are relative to the config file's folder")


def _node(root: yaml.Node | None, loc: tuple) -> yaml.Node | None:
    """The YAML node at a key path (None when absent)."""
    node = root
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            return None
        node = next((v for k, v in node.value if _is_key(k, part)), None)
    return node


def _is_key(key: yaml.Node, part) -> bool:
    """Whether a mapping's key node is `part` of a validation error's path: as written, or, for a key YAML
    reads as no string (`~`, `yes`, `0x10`), as read."""
    if key.value == str(part):
        return True
    if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:str":
        return False
    try:  # pydantic gives such a key as itself or as its str()
        read = yaml.SafeLoader("").construct_object(key)
    except (yaml.YAMLError, ValueError, OverflowError):
        return False
    return read == part or str(read) == str(part)


def _template_file(name: str, base: Path, check_files: bool, where) -> str:
    """task.chat_template's .jinja file made absolute, so the run's saved config finds it again (resume)."""
    path = Path(name).expanduser()
    resolved = path if path.is_absolute() else (base / path).resolve()
    if check_files and resolved.is_dir():
        raise ConfigError(f"the chat template {resolved} is a folder, not a file", where(),
                          "give the .jinja file itself")
    if check_files and not resolved.is_file():
        raise ConfigError(f"chat template file not found: {resolved}", where(),
                          "paths are relative to the config file's folder")
    return str(resolved)


def _init_run(path: Path, base: Path, check_files: bool, where) -> Path:
    """train.init_from resolved; with check_files it must be a finished run whose model has weights."""
    resolved = path if path.is_absolute() else (base / path).resolve()
    meta = resolved / "model" / "tunesmith.json"
    if check_files and not meta.is_file():
        raise ConfigError(f"train.init_from: {resolved} holds no finished run's model (no model/tunesmith.json)",
                          where(), "give the directory of a run made by `tunesmith run` or `tunesmith train`")
    if check_files and json.loads(meta.read_text(encoding="utf-8")).get("kind") == "prompt":
        raise ConfigError(f"train.init_from: {resolved} trained a prompt, not weights, so there is nothing to "
                          "start from", where(), "give a run trained with an adapter or full fine-tuning")
    return resolved


def _config_error(e: ValidationError, path: Path, root: yaml.Node) -> ConfigError:
    err = e.errors()[0]
    loc = tuple(p for p in err["loc"] if not _type_tag(p))
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, _KeyedError):
        return ConfigError(ctx_error.msg, _where(path, root, ctx_error.loc), "fix the key or its value")
    key = ".".join(str(p) for p in loc) or "(root)"
    if err["type"] == "extra_forbidden":
        return ConfigError(f"unknown key '{key}'", _where(path, root, loc), _suggest(loc))
    if err["type"] == "missing":
        return ConfigError(f"missing required key '{key}'", _where(path, root, loc), "add it")
    msg = err["msg"].removeprefix("Value error, ")
    return ConfigError(f"invalid value for '{key}': {msg}", _where(path, root, loc),
                       f"got {err.get('input')!r}" if "input" in err else None)


def _type_tag(part: str | int) -> bool:
    """Whether a part of pydantic's error location names a branch of a union type
    (`lax-or-strict[...]`, `function-after[...]`, `str`), not a key of the file."""
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "literal"})


def _where(path: Path | None, root: yaml.Node | None, loc: tuple) -> str:
    key = ".".join(str(p) for p in loc)
    line = _key_line(root, loc) if root is not None else None
    return f"{path}:{line} ({key})" if line else f"{path} ({key})"


def _key_line(node: yaml.Node, loc: tuple) -> int | None:
    """1-based line of the deepest node along `loc` in the YAML node tree."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if _is_key(k, part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line or (node.start_mark.line + 1 if node is not None and not loc else line)


def _suggest(loc: tuple) -> str:
    allowed = _fields_at(loc[:-1])
    bad = str(loc[-1])
    nested = bad.replace("_", ".", 1)
    if "." in nested and nested.split(".")[0] in allowed:
        return f"did you mean the nested key '{nested}'?"
    close = difflib.get_close_matches(bad, allowed, n=1)
    if close:
        return f"did you mean '{close[0]}'?"
    return f"allowed keys here: {', '.join(allowed)}" if allowed else "remove it"


def _fields_at(loc: tuple) -> list[str]:
    model: Any = Project
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        if field is None:
            return []
        model = next((a for a in (field.annotation, *typing.get_args(field.annotation))
                      if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return [name for name in model.model_fields if name != "source"]


def derive(config: _C, updates: dict[str, Any]) -> _C:
    """A copy of `config` with dotted-key `updates` (e.g. {"train.method": "full"}), validated again.

    Trials, method comparisons and command-line overrides derive configs this way rather than with
    pydantic's model_copy and an update, which skips every validator (a derived learning rate of 0, an unknown
    method or a train.fsdp method clash would pass unseen). Raises pydantic's ValidationError.
    """
    data = config.model_dump(mode="python", round_trip=True)
    for dotted, value in updates.items():
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node[key]
        if leaf not in node:
            raise KeyError(f"unknown config key '{dotted}'")
        node[leaf] = value
    derived = type(config).model_validate(data)
    if isinstance(config, Project):
        derived.source = config.source  # excluded from the dump; relative data paths were resolved against it
    return derived


def dump_config(project: Project) -> str:
    """The resolved config as YAML, as saved in the run directory."""
    return yaml.safe_dump(project.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
