"""The runs pages of `tunesmith ui`: every run under `--root` as a table (`/`), a run's page with
its report (`/runs/REL`), two runs compared (`/compare?a=REL&b=REL`), and the runs' own files,
read-only (`/files/REL`)."""

from __future__ import annotations

import asyncio
import mimetypes
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import yaml
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from tunesmith import fsio
from tunesmith.cli.ui.layout import esc, page
from tunesmith.cli.ui.scan import walk
from tunesmith.cli.ui.security import FILE_CSP, inside_root
from tunesmith.config import yaml_text
from tunesmith.evaluate.human import KEY_FILE
from tunesmith.runs import is_run_dir

router = APIRouter()

MAX_DEPTH = 5          # root/runs/NAME/RUN-ID is 3 deep; deeper trees are not searched
MAX_DIRS = 20_000      # directory entries read per scan: a huge --root answers with what was found
MAX_RUNS = 2_000       # runs listed
MAX_CONFIG_BYTES = 1_000_000
TEXT_TYPES = {".jsonl": "application/x-ndjson", ".json": "application/json", ".yaml": "text/plain",
              ".yml": "text/plain", ".md": "text/plain", ".txt": "text/plain", ".csv": "text/csv",
              ".log": "text/plain", ".html": "text/html", ".png": "image/png", ".svg": "image/svg+xml"}


@dataclass
class RunRow:
    """What the runs table shows of one run (figures None where the run has no evaluation yet)."""

    rel: str
    name: str
    task: str
    model: str
    method: str
    verdict: str            # met | not met | not evaluated
    metric: str | None
    baseline: float | None
    finetuned: float | None
    date: str               # ISO time the run finished (its summary.json, else its model)
    evaluated: bool


def find_runs(root: Path) -> list[Path]:
    """Run directories under `root` (scan.walk: breadth first, at most MAX_DEPTH deep, MAX_DIRS entries
    read): hidden folders (staging, the workbench's own), symlinked folders and folders inside a run are
    not searched."""
    root = Path(root).resolve()
    if is_run_dir(root):
        return [root]
    found: list[Path] = []
    runs: set[Path] = set()
    for path, entry, _ in walk(root, MAX_DEPTH, MAX_DIRS, enter=lambda folder: folder not in runs):
        if entry.is_dir(follow_symlinks=False) and is_run_dir(path):
            found.append(path)
            runs.add(path)
            if len(found) >= MAX_RUNS:
                break
    return found


def run_row(root: Path, run: Path) -> RunRow:
    """The table row of `run`: summary.json when evaluated, else what config.yaml says."""
    rel = run.relative_to(root).as_posix()
    summary_path = _own_file(root, rel, "summary.json")
    summary = _read_json(summary_path) if summary_path else {}
    config_path = _own_file(root, rel, "config.yaml")
    config = _read_config(config_path) if config_path else {}
    when = summary_path if summary else _own_file(root, rel, "model/tunesmith.json")
    date = "" if when is None else datetime.fromtimestamp(when.stat().st_mtime, timezone.utc).strftime(
        "%Y-%m-%d %H:%M")
    task = str((config.get("task") or {}).get("type", "")) if isinstance(config.get("task"), dict) else ""
    if not summary:
        method = (config.get("train") or {}).get("method", "") if isinstance(config.get("train"), dict) else ""
        return RunRow(rel, str(config.get("name", run.name)), task, str(config.get("model", "")), str(method),
                      "not evaluated", None, None, None, date, False)
    # Every field read with the type it must have: one hand-edited summary.json never hides the others.
    metric = summary.get("objective_metric") if isinstance(summary.get("objective_metric"), str) else None
    figures = _dict(summary.get("metrics"))
    return RunRow(rel, str(summary.get("name", run.name)), task, str(summary.get("model", "")),
                  str(summary.get("method", "")), "met" if _dict(summary.get("objective")).get("met") is True
                  else "not met", metric, _number(_dict(figures.get("baseline")).get(metric)),
                  _number(_dict(figures.get("finetuned")).get(metric)), date, True)


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _own_file(root: Path, rel: str, name: str) -> Path | None:
    """The run's file `name` through inside_root (None when missing, or a symlink leaving the root:
    a run's page never shows data from outside --root)."""
    try:
        path = inside_root(root, f"{rel}/{name}" if rel != "." else name)
    except HTTPException:
        return None
    return path if path.is_file() else None


def _read_json(path: Path) -> dict:
    """A run's JSON file as a dict; {} when missing or unreadable (a run being written, a bad file)."""
    try:
        data = fsio.read_json(path)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_config(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            return {}
        data = yaml_text.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def all_rows(root: Path) -> list[RunRow]:
    """Every run's row, newest first."""
    return sorted((run_row(root, run) for run in find_runs(root)), key=lambda r: r.date, reverse=True)


def run_dir(request: Request, rel: str, evaluated: bool = False) -> Path:
    """The run directory `rel` under the root; 404 when it is not one (or not evaluated, if asked)."""
    path = inside_root(request, rel)
    if not is_run_dir(path) or (evaluated and not (path / "summary.json").is_file()):
        raise HTTPException(404, f"no {'evaluated ' if evaluated else ''}run at '{rel}'")
    return path


# -- pages -------------------------------------------------------------------------------------------

@router.get("/api/runs")
async def runs_json(request: Request) -> JSONResponse:
    """The runs table's data (what `/` shows)."""
    rows = await asyncio.to_thread(all_rows, request.app.state.ui.root)
    return JSONResponse({"runs": [asdict(r) for r in rows]})


@router.get("/", response_class=HTMLResponse)
async def runs_page(request: Request) -> HTMLResponse:
    """Every run under --root: filter and sort (ui.js), pick two to compare."""
    root = request.app.state.ui.root
    rows = await asyncio.to_thread(all_rows, root)
    table = ("<p class='empty'>No runs under this folder yet: start one from <a href='/new'>New run</a> "
             "or give <code>--root</code> the folder that holds your runs.</p>" if not rows else _runs_table(rows))
    body = (f"<h1>Runs</h1><p class='muted'>Run directories under <code>{esc(root)}</code>.</p>"
            f"{_jobs_list(request)}"
            "<div class='toolbar'><input id='run-filter' type='search' placeholder='Filter: name, model, method…' "
            "aria-label='Filter runs'><button id='compare-picked' type='button' disabled>Compare the two "
            "picked runs</button></div>" + table)
    return page(request, "Runs", body)


def _runs_table(rows: list[RunRow]) -> str:
    head = "".join(f"<th data-sort='{key}' data-type='{kind}' tabindex='0'>{label}</th>" for key, kind, label in (
        ("name", "text", "name"), ("task", "text", "task"), ("model", "text", "model"),
        ("method", "text", "method"), ("verdict", "text", "objective"), ("gain", "number", "key figure"),
        ("date", "text", "date")))
    return (f"<table id='runs' class='runs'><thead><tr><th><span class='sr-only'>pick</span></th>{head}</tr></thead>"
            f"<tbody>{''.join(_row(r) for r in rows)}</tbody></table>")


def _row(r: RunRow) -> str:
    gain = "" if r.finetuned is None or r.baseline is None else f"{r.finetuned - r.baseline:.6g}"
    figure = "—" if r.finetuned is None else (
        f"{esc(r.metric)} {_fmt(r.baseline)} → <b>{_fmt(r.finetuned)}</b>")
    verdict = {"met": "ok", "not met": "bad"}.get(r.verdict, "muted")
    # a local model's folder by its last part (the full path on hover); a hub id as it is
    model = r.model.rstrip("/").rsplit("/", 1)[-1] if r.model.startswith(("/", ".", "~")) else r.model
    pick = (f"<input type='checkbox' class='pick' value='{esc(r.rel)}' aria-label='pick {esc(r.name)}'>"
            if r.evaluated else "")
    return (f"<tr data-rel='{esc(r.rel)}' data-name='{esc(r.name)}' data-task='{esc(r.task)}' "
            f"data-model='{esc(r.model)}' data-method='{esc(r.method)}' data-verdict='{esc(r.verdict)}' "
            f"data-gain='{gain}' data-date='{esc(r.date)}'><td>{pick}</td>"
            f"<td><a href='/runs/{esc(_q(r.rel))}'>{esc(r.name)}</a><div class='muted small'>{esc(r.rel)}</div></td>"
            f"<td>{esc(r.task)}</td><td title='{esc(r.model)}'>{esc(model)}</td><td>{esc(r.method)}</td>"
            f"<td><span class='badge {verdict}'>{esc(r.verdict)}</span></td><td>{figure}</td>"
            f"<td>{esc(r.date)}</td></tr>")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _jobs_list(request: Request) -> str:
    """The workbench's jobs still running or without a finished run yet, linked to their live pages."""
    manager = request.app.state.ui.jobs
    jobs = [j.to_json(manager.root) for j in manager.snapshot()]
    open_jobs = [j for j in jobs if j["state"] == "running" or not j.get("run_dir")][-20:]
    if not open_jobs:
        return ""
    items = "".join(f"<li><a href='/jobs/{esc(j['id'])}'>{esc(j['name'])}</a> <span class='badge muted'>"
                    f"{esc(j['state'])}</span> <span class='muted small'>{esc(j['out'])}</span></li>"
                    for j in reversed(open_jobs))
    return f"<h2>Jobs</h2><ul class='jobs'>{items}</ul>"


@router.get("/runs/{rel:path}", response_class=HTMLResponse)
async def run_page(rel: str, request: Request) -> HTMLResponse:
    """One run: a summary, links to its live curves, label review and files, and its report."""
    run = run_dir(request, rel)
    row = await asyncio.to_thread(run_row, request.app.state.ui.root, run)
    quoted = esc(_q(row.rel))
    facts = "".join(f"<dt>{label}</dt><dd>{esc(value)}</dd>" for label, value in (
        ("name", row.name), ("task", row.task), ("model", row.model), ("method", row.method),
        ("objective", row.verdict), ("finished", row.date)) if value)
    if row.metric:
        facts += (f"<dt>{esc(row.metric)}</dt><dd>base {_fmt(row.baseline)} → fine-tuned "
                  f"<b>{_fmt(row.finetuned)}</b></dd>")
    links = (f"<a class='button' href='/watch?run={quoted}'>Watch training</a>"
             f"<a class='button' href='/review?run={quoted}'>Review labels</a>"
             f"<a class='button' href='/play?run={quoted}'>Try it</a>"
             f"<a class='button' href='/rate?run={quoted}'>Rate</a>"
             f"<a class='button' href='/?compare={quoted}'>Compare with…</a>")
    has_report = (run / "report.html").is_file()
    if has_report:
        links += (f"<a class='button' href='/files/{quoted}/report.html' target='_blank' rel='noopener'>"
                  "Report in a tab</a>")
    report = (f"<iframe class='report' id='report' title='report of {esc(row.name)}' "
              f"src='/files/{quoted}/report.html'></iframe>" if has_report else
              "<p class='empty'>No report yet: the run has not been evaluated (<code>tunesmith eval</code>).</p>")
    body = (f"<p class='crumbs'><a href='/'>Runs</a> / {esc(row.rel)}</p><h1>{esc(row.name)}</h1>"
            f"<dl class='facts'>{facts}</dl><div class='actions'>{links}</div>{report}")
    return page(request, f"Run {row.name}", body)


@router.get("/compare", response_class=HTMLResponse)
async def compare_page(request: Request, a: str = "", b: str = "") -> HTMLResponse:
    """Two evaluated runs side by side: report/compare_page.py's page (B - A) in a frame."""
    if not a or not b:
        return page(request, "Compare", "<h1>Compare</h1><p class='error'>Pick two evaluated runs on the "
                                        "<a href='/'>Runs</a> page.</p>", status_code=400)
    rows = [run_row(request.app.state.ui.root, run_dir(request, rel, evaluated=True)) for rel in (a, b)]
    query = f"a={_q(rows[0].rel)}&b={_q(rows[1].rel)}"
    names = "<br>".join(f"{side}: <a href='/runs/{esc(_q(r.rel))}'>{esc(r.name)}</a> <span class='muted small'>"
                        f"({esc(r.rel)})</span>" for side, r in zip("AB", rows))
    body = (f"<p class='crumbs'><a href='/'>Runs</a> / compare</p><h1>Compare</h1><p>{names}"
            f"</p><iframe class='report' id='comparison' title='comparison' src='/compare/page?{esc(query)}'></iframe>")
    return page(request, "Compare", body)


def _q(text: str) -> str:
    """`text` for a URL path or query value (`/` kept, `&`, `#`, `?`, spaces encoded)."""
    return quote(text, safe="/")


@router.get("/compare/page")
async def comparison_html(request: Request, a: str, b: str) -> HTMLResponse:
    """The comparison page itself (`tunesmith report --compare A B`), built in a temporary folder."""
    from tunesmith.report.compare_page import compare_report

    run_a, run_b = run_dir(request, a, evaluated=True), run_dir(request, b, evaluated=True)

    def build() -> str:
        with tempfile.TemporaryDirectory(prefix="tunesmith-ui-compare-") as tmp:
            return compare_report(run_a, run_b, Path(tmp) / "compare.html").read_text(encoding="utf-8")
    text = await asyncio.to_thread(build)
    return HTMLResponse(text, headers={"Content-Security-Policy": FILE_CSP, "Cache-Control": "no-store"})


@router.get("/files/{rel:path}")
async def run_file(rel: str, request: Request) -> FileResponse:
    """A file of a run directory, read-only (nothing outside a run under --root is served)."""
    path = inside_root(request, rel)
    root = request.app.state.ui.root
    if not path.is_file() or not any(is_run_dir(p) for p in path.parents if p.is_relative_to(root)):
        raise HTTPException(404, "not found")
    if path.name == KEY_FILE:  # a human evaluation's blinding key: a rater on /rate could unblind the pairs
        raise HTTPException(404, "not found")
    kind = TEXT_TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if kind.startswith("text/") or kind.endswith(("json", "ndjson", "+xml")):
        kind += "; charset=utf-8"
    return FileResponse(path, media_type=kind, headers={"Content-Security-Policy": FILE_CSP,
                                                        "Cache-Control": "no-store"})
