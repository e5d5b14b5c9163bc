"""Watch a run train: loss curves and validation figures from its own train_log.jsonl, live (issue 22).

`GET /watch?run=REL` is the page, `GET /api/watch?run=REL` the same view as JSON (its `html` is the
page's chart block, which static/watch.js swaps in every 2 s until training is done). REL is any
folder under --root that holds a train_log.jsonl: a run directory, or the hidden staging folder a run
is built in (runs.staging_dir); either name finds the other, so a page opened while a run trains keeps
working after the run is renamed into place.

The charts are SVG drawn here (no JavaScript library, every text escaped). Overfitting flags are the
ones the trainer's detector (train/watch.py) raised: it logs each as an {"overfitting": ...} record,
and a finished run's train.json lists them too.
"""

from __future__ import annotations

import json
import math
import posixpath
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse

from tunesmith.cli.ui import security
from tunesmith.cli.ui.layout import esc, page
from tunesmith.registry import METRIC_SPECS, VALIDATION_FIGURES
from tunesmith.runs import staging_dir

router = APIRouter()

LOG = "train_log.jsonl"
MAX_POINTS = 2000      # per curve sent or drawn: a long run's steps are thinned evenly, first and last kept
MAX_FLAGS = 50
MAX_TABLE_ROWS = 200   # the evaluations table shows the latest ones
MAX_REL = 1000
CACHE_LOGS = 8         # parsed logs kept between polls (each poll then reads only the new lines)
READ_CHUNK = 4 * 1024 * 1024  # most bytes of a log read per poll (a long log is caught up over several)
STORE_POINTS = 4 * MAX_POINTS  # points kept per list: past this, thinned to half (first and last kept)
MAX_BAD_LINES = 100    # unreadable line numbers remembered (the count goes on)
MAX_EVAL_KEYS = 32     # figures kept per validation record
MAX_STEP = 2 ** 53     # integers a float holds exactly: past it a log's number is no figure to chart
IDLE_S = 600.0         # a log unchanged this long, with no job running on it, is no longer polled
_NOT_FIGURES = {"step", "epoch", "val_loss", "train_loss", "loss", "lr"}


@dataclass
class _Parsed:
    """What has been read of one log so far."""

    inode: int
    offset: int = 0
    lines: int = 0
    steps: list[tuple[int, float | None]] = field(default_factory=list)   # (step, training loss)
    evals: list[dict] = field(default_factory=list)
    flags: list[dict] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)
    caught_up: bool = False    # the last read reached the end of the file
    skipping: bool = False     # inside a line longer than READ_CHUNK (counted as unreadable already)


@dataclass
class _Entry:
    """A cached log: its own lock (polls of one log take turns; other logs are read meanwhile)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    parsed: _Parsed | None = None


_CACHE: OrderedDict[str, _Entry] = OrderedDict()
_LOCK = threading.Lock()  # guards _CACHE itself, held only to find or add an entry


@router.get("/watch", response_class=HTMLResponse)
def watch_page(request: Request, run: str = Query(..., max_length=MAX_REL)) -> HTMLResponse:
    """The watch page of the run (or training folder) `run`, relative to --root."""
    view = _view(request, run)
    api = f"/api/watch?run={quote(run, safe='/')}"
    body = (f"<section id='watch' data-api='{esc(api)}' data-done='{int(view['done'])}' "
            f"data-lines='{view['lines']}'><h1>Training of {esc(run)}</h1>"
            f"<p id='watch-status' role='status'>{esc(_status(view))}</p>"
            f"<div id='watch-body'>{view['html']}</div></section>")
    return page(request, f"Watch {run}", body, scripts=["watch.js"])


@router.get("/api/watch")
def watch_json(request: Request, run: str = Query(..., max_length=MAX_REL)) -> JSONResponse:
    """The curves, evaluations and flags of `run` as JSON (curves thinned to MAX_POINTS points)."""
    view = _view(request, run)
    view["status"] = _status(view)
    return JSONResponse(view)


def _view(request: Request, rel: str) -> dict:
    log, folder_rel = _find_log(request, rel)
    info = _train_json(request, folder_rel)
    stat = log.stat()
    entry = _entry(str(log))
    with entry.lock:  # polls of the same log share its cache entry
        parsed = _read(entry, log, stat)
        steps, evals = _thin(parsed.steps, MAX_POINTS), _thin(parsed.evals, MAX_POINTS)
        finished = info.get("overfitting") if isinstance(info.get("overfitting"), list) else []
        flags = _flags(parsed.flags, finished)
        lines, bad, caught_up = parsed.lines, list(parsed.bad_lines[:3]), parsed.caught_up
    figures = _figures(evals)
    best = info.get("best", {}).get("step") if isinstance(info.get("best"), dict) else None
    best = best if isinstance(best, int) else None
    idle = max(0.0, time.time() - stat.st_mtime)
    ended = _ended(request, log.parent, info, idle)
    view = {"run": rel, "folder": folder_rel, "done": bool(ended and caught_up), "ended": ended, "lines": lines,
            "updated_seconds": round(idle, 1),
            "last_step": steps[-1][0] if steps else None, "best_step": best,
            "figures": figures, "loss": [[s, _finite(v)] for s, v in steps],
            "evals": [{k: _finite(v) for k, v in e.items()} for e in evals], "flags": flags,
            "unreadable_lines": bad}
    view["html"] = _charts_html(view)
    return view


def _find_log(request: Request, rel: str) -> tuple[Path, str]:
    """The train_log.jsonl of `rel`, else of its staging folder (the run still trains) or, for a staging
    folder, of its final directory (the run finished and was renamed): (log path, its folder's rel)."""
    for candidate in _candidates(rel):
        try:
            log = security.inside_root(request, posixpath.join(candidate, LOG))
        except HTTPException:
            continue
        if log.is_file():
            return log, candidate
    raise HTTPException(404, f"no {LOG} in {rel or 'the root folder'}: give a run directory or a training "
                             "folder under --root")


def _candidates(rel: str) -> list[str]:
    path = PurePosixPath(rel.replace("\\", "/"))
    name = path.name
    if name in ("", ".", ".."):
        return [rel]
    if name.startswith(".") and name.endswith(".partial") and len(name) > len("..partial"):
        return [rel, str(path.with_name(name[1:-len(".partial")]))]
    return [rel, str(staging_dir(Path(path)).as_posix())]


def _train_json(request: Request, folder_rel: str) -> dict:
    """The train stage's train.json (written when training has finished), or {} while it trains."""
    path = security.inside_root(request, posixpath.join(folder_rel, "train.json"))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _ended(request: Request, folder: Path, info: dict, idle: float) -> str | None:
    """Why the log will not grow any more, or None while it may: training finished (train.json), the
    workbench job that trains it was stopped, failed or interrupted, or it has been idle IDLE_S with
    no job running on it (a run stopped outside the workbench)."""
    if info:
        return "finished"
    state = _job_state(request, folder)
    if state in ("stopped", "failed", "interrupted"):
        return state
    return "idle" if state not in ("running", "orphaned") and idle >= IDLE_S else None


def _job_state(request: Request, folder: Path) -> str | None:
    """The state of the newest workbench job whose run (or its staging folder) is `folder`, if any."""
    snapshot = getattr(getattr(request.app.state.ui, "jobs", None), "snapshot", None)
    for job in reversed(snapshot() if snapshot else []):
        out = Path(job.out).resolve()
        if folder in (out, staging_dir(out)):
            return job.state
    return None


def _entry(key: str) -> _Entry:
    with _LOCK:
        entry = _CACHE.pop(key, None) or _Entry()
        _CACHE[key] = entry
        while len(_CACHE) > CACHE_LOGS:
            _CACHE.popitem(last=False)
    return entry


def _read(entry: _Entry, path: Path, stat) -> _Parsed:
    """The log parsed up to its last complete line, reading at most READ_CHUNK bytes of what was appended
    since the last call (a log rewritten by a resumed run has a new inode or is shorter: read again from
    the start). The caller holds entry.lock."""
    parsed = entry.parsed
    if parsed is None or parsed.inode != stat.st_ino or stat.st_size < parsed.offset:
        parsed = entry.parsed = _Parsed(stat.st_ino)
    with open(path, "rb") as f:
        f.seek(parsed.offset)
        chunk = f.read(min(READ_CHUNK, max(0, stat.st_size - parsed.offset)))
    parsed.caught_up = parsed.offset + len(chunk) >= stat.st_size
    start = 0
    if parsed.skipping:  # the rest of an over-long line, already counted
        start = chunk.find(b"\n") + 1
        parsed.skipping = start == 0
        if parsed.skipping:
            parsed.offset += len(chunk)
            return parsed
    end = max(start, chunk.rfind(b"\n") + 1)  # a line still being written waits for the next poll
    if start == 0 and end == 0 and len(chunk) == READ_CHUNK:  # a line longer than READ_CHUNK: no record
        parsed.lines += 1
        _bad(parsed)
        parsed.skipping, end = True, len(chunk)
    else:
        for line in chunk[start:end].split(b"\n")[:-1]:
            parsed.lines += 1
            if line.strip():
                _take(parsed, line)
    parsed.offset += end
    return parsed


def _bad(parsed: _Parsed) -> None:
    if len(parsed.bad_lines) < MAX_BAD_LINES:
        parsed.bad_lines.append(parsed.lines)


def _take(parsed: _Parsed, line: bytes) -> None:
    """File one log record: a step, a validation or an overfitting flag (others, e.g. prompt search
    candidates, are not charted)."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        record = None
    if not isinstance(record, dict) or not _step(record.get("step")):
        _bad(parsed)
        return
    step = record["step"]
    if isinstance(record.get("overfitting"), dict):
        if len(parsed.flags) < 2 * MAX_FLAGS:  # the view shows the first MAX_FLAGS distinct ones
            parsed.flags.append({**record["overfitting"], "step": step})
    elif "val_loss" in record:
        figures = [(k, v) for k, v in record.items() if k != "step" and k != "epoch" and _number(v)]
        parsed.evals.append({"step": step, **dict(figures[:MAX_EVAL_KEYS])})
        if len(parsed.evals) > STORE_POINTS:
            parsed.evals = _thin(parsed.evals, STORE_POINTS // 2)
    elif "loss" in record and _number(record["loss"]):
        parsed.steps.append((step, float(record["loss"])))
        if len(parsed.steps) > STORE_POINTS:  # memory per log stays bounded however long the run
            parsed.steps = _thin(parsed.steps, STORE_POINTS // 2)


def _step(value) -> bool:
    """A step the charts can place: an integer (not a boolean) a float holds exactly; 10**400 would
    overflow the axis scale."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_STEP


def _number(value) -> bool:
    """A figure to chart: a float, or an integer within MAX_STEP (float(10**400) overflows)."""
    return isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)
                                        and abs(value) <= MAX_STEP)


def _finite(value):
    """JSON has no NaN or infinity: a diverged loss is sent as null."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _thin(items: list, limit: int) -> list:
    """At most `limit` items spread evenly over `items`, the first and the last kept."""
    n = len(items)
    if n <= limit:
        return list(items)
    return [items[round(i * (n - 1) / (limit - 1))] for i in range(limit)]


def _flags(logged: list[dict], finished: list[dict]) -> list[dict]:
    """The detector's flags, each once: from the log, and from train.json for trainers that log none."""
    out, seen = [], set()
    for flag in [f for f in (*logged, *finished) if isinstance(f, dict)]:
        key = (flag.get("signal"), flag.get("step"))
        if isinstance(flag.get("step"), int) and key not in seen and len(out) < MAX_FLAGS:
            seen.add(key)
            out.append({"signal": str(flag.get("signal", "")), "step": flag["step"],
                        "detail": str(flag.get("detail", ""))})
    return out


def _figures(evals: list[dict]) -> list[str]:
    """The validation figures to chart: a classification run's four first, then any other (the objective's)."""
    found = [k for e in evals for k in e if k not in _NOT_FIGURES]
    ordered = [k for k in VALIDATION_FIGURES["classification"] if k in found]
    for k in found:
        if k not in ordered:
            ordered.append(k)
    return ordered[:12]


def _status(view: dict) -> str:
    ended = view["ended"] if view["done"] else None
    if ended == "finished":
        return f"Training finished at step {view['last_step']}."
    if ended == "idle":
        return (f"The log has not changed for {view['updated_seconds'] / 60:.0f} minutes and no workbench job "
                "runs on it: not refreshing (reload the page to look again).")
    if ended:
        return f"The job training this run is {ended}; last step {view['last_step']}. Not refreshing."
    if view["last_step"] is None:
        return "Waiting for the first training step…"
    return f"Training: step {view['last_step']}, log updated {view['updated_seconds']:.0f} s ago; refreshing every 2 s."


# --- drawing: SVG charts and the evaluations table -------------------------------------------------

WIDTH, HEIGHT = 640, 250
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 30, 34
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")


@dataclass
class Series:
    """One curve: its name and (step, value) points (None values are gaps)."""

    name: str
    points: list[tuple[float, float | None]]
    dots: bool = False


def _charts_html(view: dict) -> str:
    """The chart block: loss, the validation figures on [0, 1], any other figure on its own axis,
    then the overfitting flags and the evaluations table."""
    evals, flags, best = view["evals"], view["flags"], view["best_step"]
    span = [p[0] for p in view["loss"][:1] + view["loss"][-1:]]  # every chart spans the same steps
    unit = [f for f in view["figures"] if f in METRIC_SPECS and METRIC_SPECS[f].unit_interval]
    other = [f for f in view["figures"] if f not in unit]
    charts = [_chart("Loss", [Series("training loss (step)", [tuple(p) for p in view["loss"]]),
                              Series("validation loss", _column(evals, "val_loss"), dots=True)], flags, best, span)]
    if unit:
        charts.append(_chart("Validation figures", [Series(f, _column(evals, f), dots=True) for f in unit],
                             flags, best, span, (0.0, 1.0)))
    charts += [_chart(f"Validation {f}", [Series(f, _column(evals, f), dots=True)], flags, best, span)
               for f in other]
    note = (f"<p class='warn'>Lines {', '.join(map(str, view['unreadable_lines']))} of {LOG} are not log "
            "records and were skipped.</p>" if view["unreadable_lines"] else "")
    return "".join(charts) + _flag_list(flags) + note + _table(evals, view["figures"], flags)


def _column(evals: list[dict], key: str) -> list[tuple[float, float | None]]:
    return [(e["step"], e.get(key)) for e in evals if key in e]


def _chart(title: str, series: list[Series], flags: list[dict], best: int | None, span: list[int],
           y_range: tuple[float, float] | None = None) -> str:
    """One SVG line chart over steps, flags as red dashed lines and the restored best step as a green
    dotted one; every text escaped."""
    points = [(x, y) for s in series for x, y in s.points if y is not None]
    head = f"<figure class='watch-chart' data-chart='{esc(title)}'><figcaption>{esc(title)}</figcaption>"
    if not points:
        return head + "<p>No points yet.</p></figure>"
    xs = [x for x, _ in points] + [f["step"] for f in flags] + ([best] if best is not None else []) + span
    scale = _Scale((min(xs), max(xs)), y_range or (min(y for _, y in points), max(y for _, y in points)))
    parts = [_axes(scale)]
    for i, s in enumerate(series):
        parts.append(_curve(s, COLOURS[i % len(COLOURS)], scale))
        parts.append(f"<text x='{LEFT + 8 + 150 * i}' y='16' font-size='11' fill='{COLOURS[i % len(COLOURS)]}'>"
                     f"{esc(s.name)}</text>")
    for flag in flags:
        x = scale.x(flag["step"])
        parts.append(f"<line class='flag' data-step='{flag['step']}' data-signal='{esc(flag['signal'])}' "
                     f"x1='{x:.1f}' x2='{x:.1f}' y1='{TOP}' y2='{HEIGHT - BOTTOM}' stroke='#c62828' "
                     f"stroke-dasharray='5 3'><title>overfitting at step {flag['step']} ({esc(flag['signal'])}): "
                     f"{esc(flag['detail'])}</title></line><text x='{x - 3:.1f}' y='{TOP + 10}' font-size='10' "
                     f"text-anchor='end' fill='#c62828'>overfitting</text>")
    if best is not None:
        x = scale.x(best)
        parts.append(f"<line class='best' data-step='{best}' x1='{x:.1f}' x2='{x:.1f}' y1='{TOP}' "
                     f"y2='{HEIGHT - BOTTOM}' stroke='#2e7d32' stroke-dasharray='2 3'>"
                     f"<title>best evaluation (restored) at step {best}</title></line>")
    return (head + f"<svg viewBox='0 0 {WIDTH} {HEIGHT}' width='100%' role='img' aria-label='{esc(title)}'>"
            + "".join(parts) + "</svg></figure>")


class _Scale:
    """Data coordinates to SVG coordinates."""

    def __init__(self, xr: tuple[float, float], yr: tuple[float, float]):
        self.x0, self.x1 = xr if xr[1] > xr[0] else (xr[0] - 1, xr[0] + 1)
        self.y0, self.y1 = yr if yr[1] > yr[0] else (yr[0] - 0.5, yr[0] + 0.5)

    def x(self, v: float) -> float:
        return LEFT + (v - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT)

    def y(self, v: float) -> float:
        return HEIGHT - BOTTOM - (v - self.y0) / (self.y1 - self.y0) * (HEIGHT - TOP - BOTTOM)


def _axes(scale: _Scale) -> str:
    out = [f"<rect x='{LEFT}' y='{TOP}' width='{WIDTH - LEFT - RIGHT}' height='{HEIGHT - TOP - BOTTOM}' "
           "fill='none' stroke='#bbb'/>"]
    for i in range(5):
        v = scale.y0 + (scale.y1 - scale.y0) * i / 4
        y = scale.y(v)
        out.append(f"<line x1='{LEFT}' x2='{WIDTH - RIGHT}' y1='{y:.1f}' y2='{y:.1f}' stroke='#eee'/>"
                   f"<text x='{LEFT - 4}' y='{y + 4:.1f}' font-size='10' text-anchor='end'>{v:.3g}</text>")
        s = scale.x0 + (scale.x1 - scale.x0) * i / 4
        out.append(f"<text x='{scale.x(s):.1f}' y='{HEIGHT - BOTTOM + 14}' font-size='10' "
                   f"text-anchor='middle'>{round(s)}</text>")
    out.append(f"<text x='{(LEFT + WIDTH - RIGHT) / 2}' y='{HEIGHT - 4}' font-size='11' "
               "text-anchor='middle'>step</text>")
    return "".join(out)


def _curve(s: Series, colour: str, scale: _Scale) -> str:
    pts = [(scale.x(x), scale.y(y)) for x, y in s.points if y is not None]
    if not pts:
        return ""
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
    out = [f"<polyline class='curve' data-series='{esc(s.name)}' data-points='{len(pts)}' fill='none' "
           f"stroke='{colour}' stroke-width='{1.8 if s.dots else 1}' points='{line}'/>"]
    if s.dots:
        out += [f"<circle cx='{x:.1f}' cy='{y:.1f}' r='2.5' fill='{colour}'><title>{esc(s.name)} at step "
                f"{sx}: {sy:.4f}</title></circle>" for (x, y), (sx, sy) in
                zip(pts, [(a, b) for a, b in s.points if b is not None])]
    return "".join(out)


def _flag_list(flags: list[dict]) -> str:
    if not flags:
        return "<p class='watch-flags'>No overfitting signal so far.</p>"
    items = "".join(f"<li class='warn' data-step='{f['step']}'>overfitting at step {f['step']} "
                    f"({esc(f['signal'])}): {esc(f['detail'])}</li>" for f in flags)
    return f"<ul class='watch-flags'>{items}</ul>"


def _table(evals: list[dict], figures: list[str], flags: list[dict]) -> str:
    """The latest evaluations, one row each; rows at a flagged step are marked."""
    flagged = {f["step"]: f["signal"] for f in flags}
    columns = ["val_loss", "train_loss", *figures]
    head = "".join(f"<th>{esc(c)}</th>" for c in ["step", *columns, "overfitting"])
    rows = []
    for e in evals[-MAX_TABLE_ROWS:]:
        cells = "".join(f"<td>{_cell(e.get(c))}</td>" for c in columns)
        mark = esc(flagged.get(e["step"], ""))
        rows.append(f"<tr data-step='{e['step']}'{' class=flagged' if mark else ''}><td>{e['step']}</td>{cells}"
                    f"<td>{mark}</td></tr>")
    return (f"<table class='watch-evals'><caption>Validation, per evaluation</caption><tr>{head}</tr>"
            + "".join(rows) + "</table>")


def _cell(value) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else esc(value)
