"""The "New run" form of `tunesmith ui`: generated from the config schema (tunesmith.config.Project's
pydantic fields and their defaults), validated by the same `load_config` the CLI uses (so the error is
the CLI's own `error: FILE:LINE (key)` line), priced by `select`'s estimate, saved as a config file.

The form's values are dotted keys ("train.epochs") with the text the user typed; a value is read as a
YAML scalar or flow list (as it would be written in project.yaml), except for plain-text fields.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import threading
import time
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel

from tunesmith.cli.ui.layout import esc, page
from tunesmith.cli.ui.scan import UI_DIR, walk
from tunesmith.cli.ui.security import csrf, inside_root, read_capped
from tunesmith.config import Project, yaml_text
from tunesmith.config.sources import GlobTooWide, glob_matches, glob_pattern
from tunesmith.errors import TunesmithError
from tunesmith.models.catalog import CATALOG
from tunesmith.registry import METHOD_SPECS, METHODS, METRIC_SPECS

router = APIRouter()

DATA_SUFFIXES = (".jsonl", ".csv", ".tsv", ".parquet", ".arrow")
DATA_DEPTH = 4            # folders below --root searched for data files
MAX_DATA_FILES = 500
MAX_ENTRIES = 20_000      # directory entries looked at while searching, whatever the tree's size
MAX_BODY = 64 * 1024      # bytes of a form post
MAX_VALUE = 4096          # characters of one value
MAX_GLOB = 10_000         # files a data glob may match (each checked to lie inside the root)
# Sections of project.yaml the form shows, with the keys it leaves out (maps and lists of sections have
# no form widget; they stay in the YAML editor of the user's choice).
SECTIONS: tuple[tuple[str | None, tuple[str, ...]], ...] = (
    (None, ("name", "model")), ("task", ()), ("data", ("train", "test", "validation", "corrections")),
    ("objective", ("metric", "target", "min_gain", "min_gain_on")), ("train", ()), ("eval", ()))
DATA_KEYS = ("data.train", "data.test", "data.validation")
# Keys whose value names a file or folder: each must lie inside --root (security.inside_root) before the
# form writes it, so a run never reads, and the workbench never serves, data from outside the root.
PATH_KEYS = (*DATA_KEYS, "data.corrections", "train.init_from", "task.chat_template")
_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_validate_lock = threading.Lock()   # one draft file per name: validations take turns writing it
_estimate_lock = threading.Lock()   # one estimate at a time (it loads the data and the tokenizer)


# -- the schema as form fields ----------------------------------------------------------------------

def _choices(annotation: Any) -> tuple[list[Any], set[type]]:
    """(Literal values, other plain types) of a field annotation, unions and Optional unfolded."""
    choices, kinds = [], set()
    for arg in _union_args(annotation):
        if typing.get_origin(arg) is Literal:
            choices += list(typing.get_args(arg))
        elif arg is type(None):
            kinds.add(type(None))
        else:
            kinds.add(typing.get_origin(arg) or arg)
    return choices, kinds


def _union_args(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def describe(key: str, info) -> dict | None:
    """One form field for a pydantic field (None for a type with no form widget: maps, sections)."""
    choices, kinds = _choices(info.annotation)
    if kinds & {dict} or any(isinstance(k, type) and issubclass(k, BaseModel) for k in kinds):
        if key not in DATA_KEYS:
            return None
    # a required field has no default to show (pydantic's marker for "none" is not one)
    default = None if info.is_required() else info.get_default(call_default_factory=True)
    field = {"key": key, "default": _shown(default), "required": info.is_required(), "text": kinds == {str}}
    if key in DATA_KEYS:
        field["widget"] = "data"
    elif key == "data.corrections":
        field["widget"] = "corrections"
    elif key == "train.method":
        field.update(widget="select", choices=list(METHODS))
    elif choices and kinds <= {bool, type(None)}:
        field.update(widget="select", choices=[_shown(c) for c in choices + (
            [True, False] if bool in kinds else [])])
    elif kinds == {bool}:
        field["widget"] = "checkbox"
    elif kinds and kinds <= {int, float, type(None)}:
        field["widget"] = "number"
    else:
        field["widget"] = "text"
    return field


def _shown(value: Any) -> str:
    """A default as the user would type it in the form (YAML flow style)."""
    if value is None:
        return ""
    if isinstance(value, (bool, list)):
        return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    return str(value)


def _section_model(section: str | None) -> type[BaseModel]:
    return Project if section is None else _model_of(Project.model_fields[section].annotation)


def _model_of(annotation: Any) -> type[BaseModel]:
    return next(a for a in _union_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel))


def schema_fields() -> list[dict]:
    """The form: one group per section of project.yaml, plus train's nested groups tied to their methods."""
    groups = []
    for section, only in SECTIONS:
        model = _section_model(section)
        prefix = f"{section}." if section else ""
        fields = [f for name, info in model.model_fields.items() if name != "source" and (not only or name in only)
                  if (f := describe(prefix + name, info))]
        groups.append({"name": section or "project", "fields": fields, "methods": None})
    train = _section_model("train")
    for name, info in train.model_fields.items():
        sub = next((a for a in _union_args(info.annotation) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is None:
            continue
        fields = [f for n, i in sub.model_fields.items() if (f := describe(f"train.{name}.{n}", i))]
        groups.append({"name": f"train.{name}", "fields": fields, "methods": group_methods(name)})
    return groups


def group_methods(group: str) -> list[str] | None:
    """The methods a nested train.GROUP configures (None: all of them). The rule follows the registry:
    a group named after a method is that method's; `lora` serves LoRA, DoRA and the preference methods
    (their default adapter); `preference` the preference methods."""
    preference = [m for m in METHODS if METHOD_SPECS[m].preference]
    if group in METHODS:
        return [group]
    if group == "lora":
        return ["lora", "dora", *preference]
    if group == "preference":
        return preference
    return None


def data_files(root: Path) -> list[str]:
    """Data files under `root` (relative paths, sorted): scan.walk's search, DATA_DEPTH folders deep,
    MAX_ENTRIES entries read, symlinks followed only when they stay inside the root, at most MAX_DATA_FILES."""
    root = Path(root).resolve()
    found: list[str] = []
    for path, entry, _ in walk(root, DATA_DEPTH + 1, MAX_ENTRIES, follow_inside_symlinks=True):
        if entry.name.endswith(DATA_SUFFIXES) and entry.is_file():
            found.append(path.relative_to(root).as_posix())
            if len(found) >= MAX_DATA_FILES:
                break
    return sorted(found)


def corrections_files(root: Path, files: list[str]) -> list[str]:
    """Corrections files for data.corrections: those the Review page saved (ROOT/.tunesmith-ui/corrections,
    newest first), then the JSONL data files (`files`) whose name says "correction"."""
    root = Path(root).resolve()
    try:
        folder = inside_root(root, f"{UI_DIR}/corrections")
    except HTTPException:
        folder = None
    saved = [] if folder is None or not folder.is_dir() else [
        path for path, entry, _ in walk(folder, 1, MAX_DATA_FILES) if entry.name.endswith(".jsonl") and entry.is_file()]
    saved.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [p.relative_to(root).as_posix() for p in saved] + [
        f for f in files if f.endswith(".jsonl") and "correction" in Path(f).name.lower()]


# -- values -> config -------------------------------------------------------------------------------

async def read_values(request: Request) -> dict[str, Any]:
    """The posted form: {"values": {dotted key: text or bool}}, bounded in size; 400 otherwise."""
    body = await read_capped(request, MAX_BODY)
    try:
        values = json.loads(body or b"{}").get("values")
    except (ValueError, AttributeError, RecursionError):  # RecursionError: `[[[...` nested past the stack
        values = None
    if not isinstance(values, dict) or not all(isinstance(k, str) and isinstance(v, (str, bool, int, float))
                                               for k, v in values.items()):
        raise HTTPException(400, 'send {"values": {"train.epochs": "2", ...}}')
    if any(isinstance(v, str) and len(v) > MAX_VALUE for v in values.values()):
        raise HTTPException(400, f"a value is longer than {MAX_VALUE} characters")
    return values


def to_config(root: Path, values: dict[str, Any]) -> dict:
    """The nested project.yaml mapping of the form's values: empty values and defaults left out, each
    value read as YAML unless the field is plain text. 400 naming the key for a key the form does not
    show (the YAML file is the place for the others) and for a path that is not inside `root`."""
    fields = {f["key"]: f for group in schema_fields() for f in group["fields"]}
    config: dict = {}
    for key, raw in values.items():
        field = fields.get(key)
        if field is None:
            raise HTTPException(400, f"{key}: not a setting of the New run form (put other keys in a "
                                     "project.yaml and run it with `tunesmith run`)")
        if isinstance(raw, str) and not raw.strip() and not field["required"]:
            continue
        value = raw if not isinstance(raw, str) or field["text"] else _yaml_value(raw)
        if key in PATH_KEYS:
            value = _path_value(Path(root).resolve(), key, value)
        elif key == "model":
            value = _model_value(Path(root).resolve(), value)
        if not field["required"] and _shown(value) == field["default"]:
            continue
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise HTTPException(400, f"{key}: conflicts with another value")
        node[leaf] = value
    return config


def _model_value(root: Path, value: Any) -> Any:
    """A relative `model` naming a checkpoint under the root, made absolute: runs start in the root but
    the form's checks and estimate run in the workbench's own folder, and both must find the same model.
    Catalog names, hub ids and absolute paths stay as typed (see README: a checkpoint may lie anywhere)."""
    from tunesmith.models.catalog import CATALOG

    if not isinstance(value, str) or not value or value in CATALOG or Path(value).is_absolute() or \
            value.startswith("~"):
        return value
    candidate = root / value
    try:
        return str(candidate.resolve()) if candidate.exists() else value
    except (OSError, RuntimeError, ValueError):  # a name too long, a link loop: load_config names the key
        return value


def _path_value(root: Path, key: str, value: Any) -> Any:
    """A path-valued key's value, each path in it checked to lie inside `root` and rebased for the
    config's folder; data keys may also hold hf:// references (read from the offline cache only),
    a source list, or a split fraction. Anything else is left to load_config's located error."""
    if isinstance(value, list) and key in DATA_KEYS:
        return [{**v, "path": _inside(root, key, v["path"])} if isinstance(v, dict) and isinstance(
            v.get("path"), str) else _path_value(root, key, v) for v in value]
    if not isinstance(value, str) or (key == "task.chat_template" and not value.endswith(".jinja")):
        return value
    return _inside(root, key, value)


def _inside(root: Path, key: str, path: str) -> str:
    """`path` (relative to --root, as the form shows it) as written in the config, or 400 naming `key`
    when it could leave the root: absolute, `~`, `..`, or a symlink (also one a glob matches) whose
    target is outside. The same answer whether or not the file exists."""
    if key in DATA_KEYS and path.startswith("hf://"):
        return path
    refused = HTTPException(400, f"{key}: '{path}' is not a path inside the workbench's root (give a path "
                                 "relative to --root, without ~ or ..)")
    if path.startswith("~"):
        raise refused
    if path.count("**") > 1:  # each further ** walks the tree again below every folder the last one found
        raise HTTPException(400, f"{key}: '{path}' has more than one ** (one already searches every folder "
                                 "below it)")
    try:
        inside_root(root, path)
        if any(c in path for c in "*?["):  # every file the loader would read, found as it finds them
            for match in itertools.islice(glob_matches(glob_pattern(path, root)), MAX_GLOB):
                inside_root(root, Path(match).relative_to(root).as_posix())
    except GlobTooWide as e:  # a link loop under the root: said as such, not as a path outside it
        raise HTTPException(400, f"{key}: '{path}' cannot be matched: {e}") from None
    except (HTTPException, ValueError, NotImplementedError):
        raise refused from None
    return _from_ui_folder(path)


def _from_ui_folder(path: str) -> str:
    """A path as the form shows it (relative to --root) as written in a config two folders below the
    root (.tunesmith-ui/drafts or configs, checked by _ui_folder to be exactly there): config paths are
    relative to the config file's folder."""
    return f"../../{path}"


def _yaml_value(text: str) -> Any:
    try:
        value = yaml_text.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if isinstance(value, dict) or value is None else value


def config_text(root: Path, values: dict[str, Any]) -> str:
    return yaml.safe_dump(to_config(root, values), sort_keys=False, allow_unicode=True)


def _ui_folder(root: Path, sub: str) -> Path:
    """ROOT/.tunesmith-ui/SUB, created, and checked to be exactly that folder (no symlink anywhere: the
    config's `../../` paths must lead back to the root)."""
    folder = inside_root(root, f"{UI_DIR}/{sub}")
    folder.mkdir(parents=True, exist_ok=True)
    if inside_root(root, f"{UI_DIR}/{sub}") != Path(root).resolve() / UI_DIR / sub:
        raise HTTPException(409, f"{UI_DIR}/{sub} under the root is a symlink: the workbench writes only "
                                 "to its own folder")
    return folder


def _slug(values: dict[str, Any]) -> str:
    name = str(values.get("name", "")).strip()
    return name if _SLUG.fullmatch(name) else "draft"


def check(root: Path, values: dict[str, Any]) -> tuple[Project | None, str | None, Path]:
    """(project, None) or (None, the CLI's error line) for the config the form writes, read by
    `load_config` from ROOT/.tunesmith-ui/drafts/NAME.yaml, so relative data paths resolve from the
    root as they do from a config file there... and `tunesmith run` on that draft prints the same line."""
    from tunesmith import fsio
    from tunesmith.config import load_config

    text = config_text(root, values)
    draft = _ui_folder(root, "drafts") / f"{_slug(values)}.yaml"
    with _validate_lock:
        fsio.write_text(draft, text)
        try:
            return load_config(draft), None, draft
        except TunesmithError as e:
            return None, e.line(), draft


def save_config(root: Path, values: dict[str, Any]) -> tuple[Path, Path, str]:
    """Validate, then write the config as ROOT/.tunesmith-ui/configs/NAME-TIMESTAMP.yaml (a new file,
    never over an existing one); returns (config, the run directory to create, name). 400 if invalid."""
    project, problem, _ = check(root, values)
    if project is None:
        raise HTTPException(400, problem)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = _ui_folder(root, "configs")
    text = config_text(root, values)
    for attempt in range(100):
        path = folder / f"{project.name}-{stamp}{f'-{attempt}' if attempt else ''}.yaml"
        if _create(path, text):
            break
    else:
        raise HTTPException(409, f"could not find a free config file name in {folder}")
    try:  # the whole path resolved: a runs/ or runs/NAME that is a link out of the root is refused
        out = inside_root(root, f"runs/{project.name}/{stamp}-{secrets.token_hex(2)}")
    except HTTPException:
        path.unlink(missing_ok=True)
        raise HTTPException(409, f"runs/{project.name} under the root leads outside it: the run is not written "
                                 "there; remove the link or pick another name") from None
    return path, out, project.name


def _create(path: Path, text: str) -> bool:
    """Write `text` to a new file at `path` (temp file, fsync, hard link: never replaces a file); False if taken."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "x", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


# -- routes ----------------------------------------------------------------------------------------

@router.post("/api/validate", dependencies=[Depends(csrf)])
async def validate(request: Request) -> JSONResponse:
    """{ok: true} or {ok: false, error: the `error:` line `tunesmith run` prints for this config}."""
    import asyncio

    values = await read_values(request)
    root = request.app.state.ui.root
    # Off the event loop: checking paths walks the data globs, and load_config reads the data files.
    if (refused := await asyncio.to_thread(_refusal, root, values)) is not None:
        return refused
    project, problem, draft = await asyncio.to_thread(check, root, values)
    rel = str(draft.relative_to(root))
    return JSONResponse({"ok": project is not None, "error": problem, "draft": rel,
                         "yaml": await asyncio.to_thread(config_text, root, values)})


def _refusal(root: Path, values: dict[str, Any]) -> JSONResponse | None:
    """A 400 {ok: false, error} for a key the form refuses (unknown, or a path leaving the root),
    before any file is written or read; None when the values can be checked."""
    try:
        to_config(root, values)
    except HTTPException as e:
        if e.status_code != 400:
            raise
        return JSONResponse({"ok": False, "error": str(e.detail)}, status_code=400)
    return None


@router.post("/api/estimate", dependencies=[Depends(csrf)])
async def estimate(request: Request) -> JSONResponse:
    """`tunesmith select`'s memory and time estimate of this config's model and method on this machine
    (no zero-shot probe)."""
    import asyncio

    values = await read_values(request)
    root = request.app.state.ui.root
    if (refused := await asyncio.to_thread(_refusal, root, values)) is not None:
        return refused
    if not _estimate_lock.acquire(blocking=False):
        raise HTTPException(409, "an estimate is already being computed; try again in a moment")
    try:
        return JSONResponse(await asyncio.to_thread(_estimate, root, values))
    finally:
        _estimate_lock.release()


def _estimate(root: Path, values: dict[str, Any]) -> dict:
    from tunesmith.select import METHODS as PRICED
    from tunesmith.select import select

    project, problem, _ = check(root, values)
    if project is None:
        return {"ok": False, "error": problem}
    try:
        result = select(project, [project.model], probe_examples=0, progress=False)
    except TunesmithError as e:
        return {"ok": False, "error": e.line()}
    row = result["candidates"][0]
    method = project.train.method
    if project.train.quantize == "nf4" and method == "lora":
        method = "qlora"  # select prices QLoRA as its own row
    return {"ok": True, "hardware": result["hardware"], "data": result["data"], "method": method,
            "estimate": row["estimates"].get(method), "estimates": row["estimates"],
            "priced": method in PRICED, "recommendation": result["recommendation"]}


@router.get("/new", response_class=HTMLResponse)
def new_run(request: Request, corrections: str = "") -> HTMLResponse:
    """The form, generated from the config schema, with the data and corrections files found under
    --root; `?corrections=REL` (a root-relative path, as the Review page links it) fills data.corrections."""
    root = request.app.state.ui.root
    files = data_files(root)
    found = {"data": files, "corrections": corrections_files(root, files)}
    given = {"data.corrections": corrections} if corrections and _is_inside(root, corrections) else {}
    groups = "".join(_group_html(g, found, given) for g in schema_fields())
    lists = (_datalist("models", list(CATALOG)) + _datalist("metrics", list(METRIC_SPECS)))
    lr = {m: spec.learning_rate for m, spec in METHOD_SPECS.items()}
    body = ("<h1>New run</h1><form id='new-run' novalidate "
            f"data-learning-rates='{esc(json.dumps(lr))}'>{groups}{lists}"
            "<p id='form-status' role='status'></p><pre id='form-error' role='alert'></pre>"
            "<p><button type='button' id='estimate'>Estimate</button> "
            "<button type='submit' id='start'>Start</button></p><pre id='estimate-result'></pre>"
            "<details><summary>Config this form writes</summary><pre id='form-yaml'></pre></details></form>")
    return page(request, "New run", body, ["jobs.js"])


def _is_inside(root: Path, rel: str) -> bool:
    try:
        inside_root(root, rel)
    except HTTPException:
        return False
    return not rel.startswith("~")


def _group_html(group: dict, found: dict[str, list[str]], given: dict[str, str]) -> str:
    methods = group["methods"]
    attr = f" data-methods='{esc(' '.join(methods))}'" if methods else ""
    rows = "".join(_field_html(f, found, given.get(f["key"])) for f in group["fields"])
    return f"<fieldset data-group='{esc(group['name'])}'{attr}><legend>{esc(group['name'])}</legend>{rows}</fieldset>"


def _field_html(field: dict, found: dict[str, list[str]], given: str | None = None) -> str:
    """One labelled control; `given` (a value from the page's query) replaces the default."""
    key, default = field["key"], field["default"]
    value = default if given is None else given
    ident = "f-" + key.replace(".", "-")
    hint = f"default: {default}" if default else ("required" if field["required"] else "optional")
    name = f"name='{esc(key)}' id='{esc(ident)}'"
    if field["widget"] in found:
        files = found[field["widget"]]
        options = [f for f in ([value] if value and value not in files else []) + files if f]
        control = f"<input {name} list='files-{esc(ident)}' value='{esc(value)}' placeholder='{esc(hint)}'>" + \
            _datalist(f"files-{ident}", options)
    elif field["widget"] == "select":
        control = f"<select {name}>" + "".join(
            f"<option{' selected' if c == value else ''}>{esc(c)}</option>" for c in field["choices"]) + "</select>"
    elif field["widget"] == "checkbox":
        control = f"<input type='checkbox' {name}{' checked' if value == 'true' else ''}>"
    else:
        listed = {"model": " list='models'", "objective.metric": " list='metrics'"}.get(key, "")
        control = f"<input {name}{listed} value='{esc(value)}' placeholder='{esc(hint)}'>"
    return f"<label for='{esc(ident)}'><span>{esc(key)}</span>{control}<small>{esc(hint)}</small></label>"


def _datalist(ident: str, options: list[str]) -> str:
    return f"<datalist id='{esc(ident)}'>" + "".join(f"<option value='{esc(o)}'>" for o in options) + "</datalist>"
