"""Review labels: the data stage's suspected label errors (RUN/data/suspects.jsonl) as a review queue.

Each decision (keep, relabel, drop) is saved at once into a corrections file under the root
(default ROOT/.tunesmith-ui/corrections/RUN-HASH.jsonl, HASH from the run's path), which
`data.corrections: FILE` applies in the next run (tunesmith/data/corrections.py). The queue also goes
to and comes back from Label Studio: `GET /api/review/export` gives Label Studio JSON tasks (the text
as `data.text`, the suggested label as a prediction, a decision already made as an annotation), and
`POST /api/review/import` turns Label Studio's JSON export (annotations[].result[].value.choices) back
into decisions. The page posts a row's key (a hash of its text and given label), never the text
itself: the server takes the exact text from suspects.jsonl, since text that went through an HTML
attribute comes back changed (CR and CRLF read as LF, NUL as U+FFFD) and would no longer match its row.
Formats:
https://labelstud.io/guide/task_format and https://labelstud.io/guide/predictions.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from pathlib import Path
from urllib.parse import quote, urlencode

import yaml
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse

from tunesmith import fsio
from tunesmith.cli.ui.layout import esc, page
from tunesmith.cli.ui.scan import UI_DIR, walk
from tunesmith.cli.ui.security import csrf, inside_root, read_capped
from tunesmith.config import yaml_text
from tunesmith.data.corrections import MAX_DECISIONS, Decision, merge, parse_decision, read_corrections
from tunesmith.errors import DataError
from tunesmith.runs import is_run_dir

router = APIRouter()

MAX_QUEUE = 500                 # rows the page shows (lowest rank first)
MAX_EXPORT = 10_000             # tasks one export holds
MAX_SUSPECTS_BYTES = 64 << 20   # a suspects.jsonl larger than this is not read
MAX_BODY = 20 << 20             # bytes of an uploaded Label Studio export
MAX_DECISION_BODY = 1 << 20     # bytes of one decision
MAX_SCAN_ENTRIES = 20_000       # folder entries read when listing runs with suspects
SCAN_DEPTH = 4
DROP_CHOICE = "(drop)"          # the Label Studio choice that means "drop this row"
_WRITE = threading.Lock()       # one read-merge-write of a corrections file at a time


# -- reading a run's queue -------------------------------------------------------------------------
def suspects_file(folder: Path) -> Path | None:
    """A run's data/suspects.jsonl, or the suspects.jsonl of a `tunesmith data clean --out` folder."""
    for path in (folder / "data" / "suspects.jsonl", folder / "suspects.jsonl"):
        if path.is_file():
            return path
    return None


def _under(root: Path, path: Path) -> Path | None:
    """`path` (a file inside a folder already checked) through inside_root: None where a symlink leaves the root."""
    try:
        return inside_root(root, path.relative_to(root).as_posix())
    except (HTTPException, ValueError):
        return None


def _run_folder(request: Request, run: str) -> tuple[Path, Path]:
    """(the run's folder, its suspects file); 404 unless `run` is a folder under the root that has one."""
    root: Path = request.app.state.ui.root
    folder = inside_root(request, run)
    found = suspects_file(folder) if folder.is_dir() else None
    safe = _under(root, found) if found is not None else None
    if safe is None:
        raise HTTPException(404, f"no suspects.jsonl in {run}: run the data stage with data.clean.label_noise on")
    return folder, safe


def read_suspects(path: Path, limit: int = MAX_QUEUE) -> tuple[list[dict], int]:
    """(the `limit` lowest-ranked suspects, how many the file lists)."""
    if path.stat().st_size > MAX_SUSPECTS_BYTES:
        raise HTTPException(413, f"{path.name} is larger than {MAX_SUSPECTS_BYTES >> 20} MiB")
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a line cut short by a crash: the rest of the queue is still worth showing
            if isinstance(row, dict) and isinstance(row.get("given_label"), str):
                rows.append(row)
    rows.sort(key=lambda r: r.get("rank") if isinstance(r.get("rank"), int) else 1 << 30)
    return rows[:limit], len(rows)


def task_fields(root: Path, folder: Path, rows: list[dict]) -> tuple[str, list[str]]:
    """(the field holding each row's text, the run's label set), from its config.yaml and data report."""
    text_field, labels = None, None
    config = _under(root, folder / "config.yaml")
    if config is not None and config.is_file() and config.stat().st_size < 1 << 20:
        try:
            task = (yaml_text.safe_load(config.read_text(encoding="utf-8")) or {}).get("task") or {}
            text_field = task.get("text_field")
            labels = task.get("labels")
        except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
            pass
    for report in (_under(root, folder / "data" / "report.json"), _under(root, folder / "report.json")):
        if labels is None and report is not None and report.is_file() and report.stat().st_size < 64 << 20:
            try:
                labels = fsio.read_json(report).get("labels")
            except (ValueError, AttributeError):
                pass
    if not isinstance(text_field, str):
        text_field = "text" if any("text" in r for r in rows) or not rows else "input"
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        labels = sorted({r["given_label"] for r in rows} | {r.get("suggested_label") for r in rows} - {None})
    return text_field, labels


def _row_text(row: dict, text_field: str) -> str | None:
    value = row.get(text_field, row.get("input"))
    return value if isinstance(value, str) else None


def _source(row: dict) -> str | None:
    file, line = row.get("file"), row.get("line")
    return f"{Path(str(file)).name}:{line}" if file else None


# -- the corrections file --------------------------------------------------------------------------
def corrections_path(request: Request, folder: Path, file: str | None, writing: bool = False) -> Path:
    """Where the review of the run in `folder` saves its decisions: `file` (a .jsonl under the root,
    outside the reviewed folder and outside every run folder; `writing`: in a folder that exists) or the
    default under ROOT/.tunesmith-ui."""
    root: Path = request.app.state.ui.root
    if not file:
        return default_corrections(root, folder)
    path = inside_root(request, file)
    if path.suffix != ".jsonl" or (path.exists() and not path.is_file()):
        raise HTTPException(400, "the corrections file must be a .jsonl file")
    if path.is_relative_to(folder) or _in_run_dir(root, path):
        raise HTTPException(400, "keep the corrections file outside run folders (a run's files are its record)")
    if writing and not path.parent.is_dir():  # a typo in a folder name makes no new folders in the user's tree
        raise HTTPException(400, f"the corrections file's folder does not exist: {file}; create it first")
    return path


def _in_run_dir(root: Path, path: Path) -> bool:
    """Whether a folder holding `path`, up to the root, is a run directory."""
    return any(is_run_dir(p) for p in path.parents if p == root or p.is_relative_to(root))


def default_corrections(root: Path, folder: Path) -> Path:
    """ROOT/.tunesmith-ui/corrections/NAME-HASH.jsonl for the run in `folder`: NAME is its path made
    readable, HASH tells apart runs whose names read the same (a/b and a_b). Through inside_root, so a
    .tunesmith-ui that is a link leaving the root is never written through."""
    rel = folder.relative_to(root).as_posix()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", rel).strip("._")[:120] or "run"
    digest = hashlib.sha256(rel.encode("utf-8")).hexdigest()[:8]
    try:
        return inside_root(root, f"{UI_DIR}/corrections/{name}-{digest}.jsonl")
    except HTTPException:
        raise HTTPException(409, f"{root / UI_DIR} leads outside the root: decisions are not written there; "
                                 "give file=PATH.jsonl under the root") from None


def _existing(path: Path) -> list[Decision]:
    if not path.exists():
        return []
    try:
        return read_corrections(path)
    except DataError as e:  # never overwrite it, nor show its content (it may be any file under the root)
        where = f"{path}:{e.lineno}" if e.lineno else str(path)
        raise HTTPException(409, f"not a corrections file: {where}") from None


def save_decisions(path: Path, new: list[Decision]) -> int:
    """Merge `new` into the corrections file at `path` (a decision for the same row replaces the old one),
    written atomically; returns how many decisions it holds."""
    with _WRITE:
        merged = merge(_existing(path), new)
        if len(merged) > MAX_DECISIONS:
            raise HTTPException(413, f"a corrections file holds at most {MAX_DECISIONS} decisions")
        fsio.write_jsonl(path, [d.to_json() for d in merged])
        return len(merged)


async def _body(request: Request, limit: int) -> object:
    """The request's JSON body, read up to `limit` bytes (413 past it, 400 if it is not JSON)."""
    body = await read_capped(request, limit)
    try:
        return json.loads(body or b"null")
    except (ValueError, RecursionError):
        raise HTTPException(400, "the body is not JSON") from None


def row_key(text: str, given: str) -> str:
    """The key a page posts for a suspect: ASCII, so it survives an HTML attribute unchanged."""
    return hashlib.sha256(json.dumps([text, given]).encode("utf-8")).hexdigest()[:32]


def _decision_from(body: dict, rows: list[dict], text_field: str, labels: list[str]) -> Decision:
    """The decision for the suspect whose row_key is body["row"], its text and label taken from the file."""
    key = body.get("row")
    if not isinstance(key, str):
        raise HTTPException(400, "give 'row', the key of the suspect's row in the page (data-row)")
    row = next((r for r in rows if (t := _row_text(r, text_field)) is not None
                and row_key(t, r["given_label"]) == key), None)
    if row is None:
        raise HTTPException(409, "that row is not in the run's suspects (the run changed?): reload the page")
    given, action, label = row["given_label"], body.get("action"), body.get("label")
    if action == "relabel" and isinstance(label, str) and label.strip() == given.strip():
        action, label = "keep", None   # "relabel" to the label it has: the reviewer keeps it
    fields = {"text": _row_text(row, text_field), "given_label": given, "action": action,
              "label": label if action == "relabel" else None, "source": _source(row)}
    try:
        d = parse_decision({k: v for k, v in fields.items() if v is not None})
    except ValueError as e:
        raise HTTPException(400, str(e)) from None
    if d.action == "relabel" and labels and d.label not in labels:
        raise HTTPException(400, f"label '{d.label}' is not one of the run's labels: {', '.join(labels)}")
    return d


# -- routes ----------------------------------------------------------------------------------------
@router.get("/review", response_class=HTMLResponse)
def review_page(request: Request, run: str | None = None, file: str | None = None) -> HTMLResponse:
    """The review queue of one run, or (without ?run=) the runs under the root that have suspects."""
    if not run:
        return page(request, "Review labels", _run_list(request.app.state.ui.root))
    folder, found = _run_folder(request, run)
    rows, total = read_suspects(found)
    text_field, labels = task_fields(request.app.state.ui.root, folder, rows)
    target = corrections_path(request, folder, file)
    decided = {d.key: d for d in _existing(target)}
    body = (f"<h1>Review labels: {esc(run)}</h1>"
            f"<p>{total} suspected label errors{f', the first {len(rows)} by rank' if total > len(rows) else ''}. "
            "Each decision is saved at once.</p>" + _file_note(target, len(decided), request.app.state.ui.root)
            + _queue(rows, text_field, labels, decided, run, file) + _label_studio(run, file, labels))
    return page(request, f"Review labels: {run}", body, scripts=["review.js"])


@router.post("/api/review/decision", dependencies=[Depends(csrf)])
async def decide(request: Request) -> JSONResponse:
    """Save one decision {run, row (the suspect's row_key), action, label?, file?}; returns the file's count."""
    body = await _body(request, MAX_DECISION_BODY)
    if not isinstance(body, dict) or not isinstance(body.get("run"), str):
        raise HTTPException(400, "give a JSON object with run, row, action and (for relabel) label")
    folder, found = _run_folder(request, body["run"])
    rows = read_suspects(found, MAX_EXPORT)[0]
    text_field, labels = task_fields(request.app.state.ui.root, folder, rows)
    decision = _decision_from(body, rows, text_field, labels)
    path = corrections_path(request, folder, body.get("file") if isinstance(body.get("file"), str) else None,
                            writing=True)
    count = save_decisions(path, [decision])
    return JSONResponse({"count": count, "file": str(path), "decision": decision.to_json()})


@router.get("/api/review/export")
def export(request: Request, run: str, file: str | None = None) -> JSONResponse:
    """The queue as Label Studio tasks (text classification; see the module docstring)."""
    folder, found = _run_folder(request, run)
    rows, _ = read_suspects(found, MAX_EXPORT)
    text_field, _ = task_fields(request.app.state.ui.root, folder, rows)
    decided = {d.key: d for d in _existing(corrections_path(request, folder, file))}
    tasks = [label_studio_task(row, text, decided.get((text, row["given_label"])), run)
             for row in rows if (text := _row_text(row, text_field)) is not None]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", run).strip("._") or "run"
    return JSONResponse(tasks, headers={"Content-Disposition": f'attachment; filename="{name}-label-studio.json"'})


@router.post("/api/review/import", dependencies=[Depends(csrf)])
async def import_tasks(request: Request, run: str, file: str | None = None) -> JSONResponse:
    """Label Studio's JSON export (a list of tasks) turned into decisions and saved."""
    folder, found = _run_folder(request, run)
    body = await _body(request, MAX_BODY)
    tasks = body.get("tasks") if isinstance(body, dict) else body
    if not isinstance(tasks, list):
        raise HTTPException(400, "give Label Studio's JSON export: a list of tasks")
    if len(tasks) > MAX_DECISIONS:
        raise HTTPException(413, f"at most {MAX_DECISIONS} tasks")
    _, labels = task_fields(request.app.state.ui.root, folder, read_suspects(found, MAX_EXPORT)[0])
    decisions, counts = decisions_from_label_studio(tasks, labels)
    path = corrections_path(request, folder, file, writing=True)
    count = save_decisions(path, decisions) if decisions else len(_existing(path))
    return JSONResponse({"count": count, "file": str(path), **counts})


# -- Label Studio ----------------------------------------------------------------------------------
def label_config(labels: list[str]) -> str:
    """The labeling interface to paste into a Label Studio project for these tasks."""
    choices = "".join(f'    <Choice value="{esc(x)}"/>\n' for x in [*labels, DROP_CHOICE])
    return ('<View>\n  <Text name="text" value="$text"/>\n  <Choices name="label" toName="text" choice="single">\n'
            f"{choices}  </Choices>\n</View>")


def _choice(label: str) -> list[dict]:
    return [{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]


def label_studio_task(row: dict, text: str, decision: Decision | None, run: str) -> dict:
    """One suspect as a Label Studio task: the suggested label as a prediction, a decision as an annotation.
    The given label travels in `data` (kept by every export) and `meta`."""
    given, source = row["given_label"], _source(row)
    task = {"data": {"text": text, "given_label": given, "source": source},
            "predictions": [{"model_version": "tunesmith label_noise", "score": row.get("score"),
                             "result": _choice(str(row.get("suggested_label")))}],
            "meta": {"given_label": given, "source": source, "rank": row.get("rank"), "run": run}}
    if decision is not None:
        chosen = {"keep": given, "drop": DROP_CHOICE}.get(decision.action, decision.label)
        task["annotations"] = [{"result": _choice(chosen), "was_cancelled": False}]
    return task


def _chosen(task: dict) -> str | None:
    """The label of the task's last annotation that is not cancelled and picks exactly one choice."""
    for annotation in reversed(task.get("annotations") or []):
        if not isinstance(annotation, dict) or annotation.get("was_cancelled"):
            continue
        for result in annotation.get("result") or []:
            if not isinstance(result, dict) or result.get("type") != "choices":
                continue
            choices = (result.get("value") or {}).get("choices") if isinstance(result.get("value"), dict) else None
            if isinstance(choices, list) and len(choices) == 1:
                return choices[0] if isinstance(choices[0], str) else None
    return None


def decisions_from_label_studio(tasks: list, labels: list[str]) -> tuple[list[Decision], dict]:
    """(decisions, counts): relabel when the chosen label differs from the given one, keep when equal,
    drop for the (drop) choice; tasks without a usable annotation or with an unknown label are counted."""
    counts = {"keep": 0, "relabel": 0, "drop": 0, "skipped_no_annotation": 0, "skipped_unknown_label": 0,
              "skipped_invalid": 0}
    out: list[Decision] = []
    for task in tasks:
        data = task.get("data") if isinstance(task, dict) else None
        meta = task.get("meta") if isinstance(task, dict) and isinstance(task.get("meta"), dict) else {}
        if not isinstance(data, dict):
            counts["skipped_invalid"] += 1
            continue
        given = data.get("given_label", meta.get("given_label"))
        chosen = _chosen(task)
        if chosen is None:
            counts["skipped_no_annotation"] += 1
            continue
        if chosen != DROP_CHOICE and labels and chosen not in labels:
            counts["skipped_unknown_label"] += 1
            continue
        action = "drop" if chosen == DROP_CHOICE else "keep" if chosen == given else "relabel"
        try:
            d = parse_decision({"text": data.get("text"), "given_label": given, "action": action,
                                **({"label": chosen} if action == "relabel" else {}),
                                **({"source": data["source"]} if isinstance(data.get("source"), str) else {})})
        except ValueError:
            counts["skipped_invalid"] += 1
            continue
        counts[action] += 1
        out.append(d)
    return out, counts


# -- page parts ------------------------------------------------------------------------------------
def _file_note(path: Path, count: int, root: Path) -> str:
    start = f"/new?{urlencode({'corrections': path.relative_to(root).as_posix()})}"
    return (f"<section class='corrections'><p>Decisions are saved to <code id='corrections-file'>{esc(path)}</code> "
            f"(<span id='decision-count'>{count}</span> so far). To apply them in the next run, add to its "
            "config:</p>"
            f"<pre>data:\n  corrections: {esc(path)}</pre>"
            f"<p><a id='start-with-corrections' href='{esc(start)}'>Start a run with these corrections</a></p>"
            f"<p class='hint'>Under the root {esc(root)}; a relative path resolves from the config file's folder. "
            "Test rows are never changed by corrections.</p></section>")


def _queue(rows: list[dict], text_field: str, labels: list[str], decided: dict, run: str, file: str | None) -> str:
    options = "".join(f"<option value='{esc(x)}'>{esc(x)}</option>" for x in labels)
    out = []
    for row in rows:
        text = _row_text(row, text_field)
        if text is None:
            continue
        given, suggested = row["given_label"], str(row.get("suggested_label", ""))
        d = decided.get((text, given))
        status = "" if d is None else d.action + (f" → {d.label}" if d.label else "")
        select = options.replace(f"value='{esc(suggested)}'>", f"value='{esc(suggested)}' selected>", 1)
        score = row.get("score")
        out.append(
            f"<tr data-row='{row_key(text, given)}' data-given='{esc(given)}'>"
            f"<td>{esc(row.get('rank', ''))}</td><td class='text'>{esc(text)}</td><td>{esc(given)}</td>"
            f"<td>{esc(suggested)}</td><td>{f'{score:.2f}' if isinstance(score, (int, float)) else ''}</td>"
            f"<td class='status'>{esc(status)}{' (reviewed)' if row.get('reviewed') else ''}</td><td class='actions'>"
            "<button type='button' data-action='keep'>Keep</button> "
            f"<select aria-label='new label'>{select}</select>"
            "<button type='button' data-action='relabel'>Relabel</button> "
            "<button type='button' data-action='drop'>Drop</button></td></tr>")
    return (f"<table id='review' data-run='{esc(run)}' data-file='{esc(file or '')}'><thead><tr><th>rank</th>"
            "<th>text</th><th>given</th><th>suggested</th><th>score</th><th>decision</th><th></th></tr></thead>"
            f"<tbody>{''.join(out)}</tbody></table><p id='review-message' role='status'></p>")


def _label_studio(run: str, file: str | None, labels: list[str]) -> str:
    query = urlencode({"run": run, **({"file": file} if file else {})})
    return ("<section class='label-studio'><h2>Label Studio</h2>"
            f"<p><a id='ls-export' href='/api/review/export?{esc(query)}' download>Download the queue as Label Studio "
            "tasks</a> (JSON; the suggested label as a prediction). Labeling interface for the project:</p>"
            f"<pre>{esc(label_config(labels))}</pre>"
            "<p><label>Import Label Studio's JSON export "
            "<input type='file' id='ls-import' accept='.json,application/json'>"
            "</label> <button type='button' id='ls-import-button'>Import</button></p></section>")


def _run_list(root: Path) -> str:
    found = _folders_with_suspects(root)
    if not found:
        return ("<h1>Review labels</h1><p>No run under the root has suspected label errors yet: a run's data stage "
                "lists them when data.clean.label_noise is on (the default for classification).</p>")
    items = "".join(f"<li><a href='/review?run={esc(quote(rel))}'>{esc(rel)}</a></li>" for rel in found)
    return f"<h1>Review labels</h1><p>Runs with suspected label errors:</p><ul class='review-runs'>{items}</ul>"


def _folders_with_suspects(root: Path) -> list[str]:
    """Folders under `root` with a non-empty suspects file, found by the workbench's one bounded walk
    (scan.walk: depth-limited, hidden folders and symlinks skipped); a folder with one is not searched
    further (a run's own data/ folder is not listed again)."""
    def has_suspects(folder: Path) -> bool:
        found = suspects_file(folder)
        if found is not None:
            stop.add(folder)
        return found is not None and _under(root, found) is not None and found.stat().st_size > 0

    stop: set[Path] = set()
    if has_suspects(root):
        return ["."]
    out = [path.relative_to(root).as_posix()
           for path, entry, _ in walk(root, SCAN_DEPTH, MAX_SCAN_ENTRIES, enter=lambda folder: folder not in stop)
           if _is_folder(entry) and has_suspects(path)]
    return sorted(out)


def _is_folder(entry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False
