"""Rate: the human-evaluation form (evaluate/human.py) served from the workbench.

`POST /api/rate/export` writes a run's blinded pairs as `tunesmith human export RUN` does (RUN/human:
pairs.csv, form.html, key.json; never over an earlier export). The page shows the pairs from
pairs.csv; each rating is saved at once into RUN/human/ratings-RATER.csv, the very file the stand-alone
form downloads (columns id,rater,choice), written atomically, and then every ratings-*.csv there is
imported as `tunesmith human import ... --key RUN/human/key.json` does, updating results.json.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
import threading
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tunesmith import fsio
from tunesmith.cli.ui.layout import esc, page
from tunesmith.cli.ui.play import read_body
from tunesmith.cli.ui.runs_pages import run_dir
from tunesmith.cli.ui.security import csrf, inside_root
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.human import CHOICES, escape_cell, import_ratings, read_key, read_ratings, unescape_cell

router = APIRouter()

HUMAN = "human"                  # RUN/human, where `tunesmith human export RUN` writes by default
MAX_PAIRS = 2000                 # pairs one page shows (and one export makes)
MAX_FILE_BYTES = 16 << 20        # pairs.csv, key.json or a ratings file larger than this is not read
MAX_RATER_FILES = 200            # ratings files pooled
MAX_RATER = 100                  # characters of a rater's name
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")  # the form's own file-name rule (linear: one character class)
_WRITE = threading.Lock()        # one read-change-write of a ratings file (and import) at a time


class _RunBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run: str = Field(min_length=1, max_length=1024)


class ExportBody(_RunBody):
    """POST /api/rate/export (n: at most this many pairs, as `--n`)."""

    n: int | None = Field(None, ge=1, le=MAX_PAIRS)


class RatingBody(_RunBody):
    """POST /api/rate/rating: one rater's choice for one pair."""

    rater: str = Field(min_length=1, max_length=MAX_RATER)
    id: str = Field(min_length=1, max_length=64)
    choice: Literal["A", "B", "tie"]

    @field_validator("rater")
    @classmethod
    def _name(cls, v: str) -> str:
        v = v.strip()
        if not v or any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in v):
            raise ValueError("give a name (no control characters)")
        return v


def rater_file(folder: Path, rater: str) -> Path:
    """RUN/human/ratings-NAME.csv, NAME as the stand-alone form makes it (other characters become _)."""
    return folder / f"ratings-{_UNSAFE.sub('_', rater)}.csv"


def ratings_csv(rows: list[dict]) -> str:
    """Rows {id, rater, choice} as the form's download writes them: a header, the rater quoted and escaped."""
    lines = ["id,rater,choice"]
    for r in rows:
        lines.append(f"{_quoted(r['id']) if _needs_quotes(r['id']) else r['id']},"
                     f"{_quoted(escape_cell(r['rater']))},{r['choice']}")
    return "\n".join(lines) + "\n"


def _needs_quotes(cell: str) -> bool:
    return any(c in cell for c in ',"\r\n')


def _quoted(cell: str) -> str:
    return '"' + cell.replace('"', '""') + '"'


def read_pairs(path: Path) -> list[dict]:
    """The rows export_pairs wrote to pairs.csv (id, prompt, response_a, response_b), cells unescaped."""
    if path.stat().st_size > MAX_FILE_BYTES:
        raise HTTPException(413, f"{path.name} is larger than {MAX_FILE_BYTES >> 20} MiB")
    reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"), newline=""))
    rows = []
    for row in reader:
        rows.append({k: unescape_cell(row.get(k) or "") for k in ("id", "prompt", "response_a", "response_b")})
        if len(rows) >= MAX_PAIRS:
            break
    return rows


def _human(request: Request, rel: str) -> tuple[Path, Path]:
    """(the evaluated run, its human folder through inside_root)."""
    run = run_dir(request, rel)
    if not (run / "predictions" / "test.jsonl").is_file():
        raise HTTPException(404, f"the run '{rel}' has no predictions yet: evaluate it first (tunesmith eval)")
    root = request.app.state.ui.root
    return run, inside_root(request, (run / HUMAN).relative_to(root).as_posix())


def _file(request: Request, folder: Path, name: str) -> Path:
    """A file of the human folder, through inside_root (a symlink out of the root is refused)."""
    return inside_root(request, (folder / name).relative_to(request.app.state.ui.root).as_posix())


def save_rating(folder: Path, key_path: Path, body: RatingBody, pool: list[Path]) -> dict:
    """Write the rating into the rater's file, import every ratings file in `pool`, write results.json.
    Returns {file, ratings (this rater's count), results or results_error}."""
    key = read_key(key_path)
    if body.id not in key["pairs"]:
        raise HTTPException(400, f"id: pair '{body.id}' is not in {key_path.name}")
    order = {pid: i for i, pid in enumerate(key["pairs"])}
    path = rater_file(folder, body.rater)
    with _WRITE:
        rows = []
        if path.is_file():
            if path.stat().st_size > MAX_FILE_BYTES:
                raise HTTPException(413, f"{path.name} is larger than {MAX_FILE_BYTES >> 20} MiB")
            rows = [r for r in read_ratings(path) if (r["rater"], r["id"]) != (body.rater, body.id)]
        rows.append({"id": body.id, "rater": body.rater, "choice": body.choice})
        rows.sort(key=lambda r: order.get(r["id"], len(order)))
        fsio.write_text(path, ratings_csv(rows))
        pool = sorted(set(pool) | {path})
        answer = {"file": path.name, "ratings": sum(r["rater"] == body.rater for r in rows)}
        try:
            result = import_ratings(key_path, pool)
        except TunesmithError as e:  # another rater's file is damaged: this rating is saved all the same
            return {**answer, "results_error": e.line()}
        fsio.write_json(key_path.parent / "results.json", result)
    return {**answer, "results": result}


def _pool(request: Request, folder: Path) -> list[Path]:
    """The ratings files of the human folder (those a symlink leads out of the root left out), bounded."""
    found = []
    for path in sorted(folder.glob("ratings-*.csv"))[:MAX_RATER_FILES]:
        try:
            safe = _file(request, folder, path.name)
        except HTTPException:
            continue
        if safe.is_file() and safe.stat().st_size <= MAX_FILE_BYTES:
            found.append(safe)
    return found


@router.post("/api/rate/export", dependencies=[Depends(csrf)])
async def export(request: Request) -> JSONResponse:
    """The run's blinded pairs, as `tunesmith human export RUN [--n N]` writes them (never over an earlier export)."""
    from tunesmith.evaluate.human import export_pairs

    body = await read_body(request, ExportBody)
    run, folder = _human(request, body.run)
    try:
        await asyncio.to_thread(export_pairs, run, folder, None, body.n)
    except TunesmithError as e:
        raise HTTPException(409, e.line().removeprefix("error: ")) from None
    return JSONResponse({"folder": f"{HUMAN}/", "pairs": len(read_key(folder / "key.json")["pairs"])})


@router.post("/api/rate/rating", dependencies=[Depends(csrf)])
async def rating(request: Request) -> JSONResponse:
    """Save one rating; answers the rater's count and the pooled results (results.json)."""
    body = await read_body(request, RatingBody)
    _, folder = _human(request, body.run)
    key_path = _file(request, folder, "key.json")
    if not key_path.is_file():
        raise HTTPException(404, "the run has no rating pairs yet: create them first")
    _file(request, folder, rater_file(folder, body.rater).name)  # 404 where a symlink would lead out of the root
    if key_path.stat().st_size > MAX_FILE_BYTES:
        raise HTTPException(413, f"key.json is larger than {MAX_FILE_BYTES >> 20} MiB")
    try:
        answer = await asyncio.to_thread(save_rating, folder, key_path, body, _pool(request, folder))
    except TunesmithError as e:  # the rater's own file or the key is damaged
        raise HTTPException(400, e.line().removeprefix("error: ")) from None
    return JSONResponse(answer)


@router.get("/api/rate/ratings")
async def ratings(request: Request, run: str, rater: str) -> JSONResponse:
    """A rater's choices so far ({id: choice}), from their ratings file."""
    _, folder = _human(request, run)
    rater = rater.strip()[:MAX_RATER]
    path = _file(request, folder, rater_file(folder, rater).name)
    if not rater or not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
        return JSONResponse({"choices": {}})
    try:
        rows = await asyncio.to_thread(read_ratings, path)
    except TunesmithError as e:
        raise HTTPException(400, e.line().removeprefix("error: ")) from None
    return JSONResponse({"choices": {r["id"]: r["choice"] for r in rows if r["rater"] == rater}})


@router.get("/rate", response_class=HTMLResponse)
async def rate_page(request: Request, run: str = "") -> HTMLResponse:
    """The blinded pairs of a run with A / tie / B per pair, or a button that creates them."""
    if not run:
        return page(request, "Rate", "<h1>Rate</h1><p class='error'>Open a run from the <a href='/'>Runs</a> "
                                     "page and press <em>Rate</em>.</p>", status_code=400)
    run_path, folder = _human(request, run)
    rel = run_path.relative_to(request.app.state.ui.root).as_posix()
    link = esc(quote(rel, safe="/"))
    head = (f"<p class='crumbs'><a href='/'>Runs</a> / <a href='/runs/{link}'>{esc(rel)}</a> / rate</p>"
            "<h1>Rate the answers</h1>")
    key_path, pairs_path = _file(request, folder, "key.json"), _file(request, folder, "pairs.csv")
    if not key_path.is_file() or not pairs_path.is_file():
        body = (f"{head}<section id='rate' data-run='{esc(rel)}'><p>The run has no rating pairs yet. Creating them "
                "writes <code>human/</code> in the run: the fine-tuned and the base model's answers to the test "
                "prompts, shuffled and blinded as A and B (as <code>tunesmith human export</code> does).</p>"
                "<div class='actions'><button id='rate-create' type='button'>Create rating pairs</button></div>"
                "<p id='rate-message' role='status'></p></section>")
        return page(request, "Rate", body, scripts=["rate.js"])
    pairs = await asyncio.to_thread(read_pairs, pairs_path)
    results = _results(folder / "results.json")
    body = (f"{head}<p class='muted'>Each pair shows one prompt and two answers in a random order. Choose the better "
            "one, or tie; each choice is saved at once into <code>human/ratings-NAME.csv</code> and the results "
            f"below are updated.</p><section id='rate' data-run='{esc(rel)}'>"
            "<p><label>Your name <input id='rate-rater' type='text' maxlength='100' autocomplete='name'></label></p>"
            f"<p id='rate-message' role='status'></p><div id='rate-results'>{results_html(results)}</div>"
            f"{''.join(_pair_html(p) for p in pairs)}</section>")
    return page(request, "Rate", body, scripts=["rate.js"])


def _results(path: Path) -> dict | None:
    try:
        if path.is_file() and path.stat().st_size <= MAX_FILE_BYTES:
            data = fsio.read_json(path)
            return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        pass
    return None


def results_html(result: dict | None) -> str:
    """The pooled win/tie/loss of system one (the fine-tuned model), with 95% intervals and agreement."""
    if not result or not isinstance(result.get("pooled"), dict):
        return "<p class='muted'>No ratings yet.</p>"
    pooled = result["pooled"]
    rows = "".join(f"<tr><td>{o}</td><td>{esc(pooled[o]['count'])}</td><td>{esc(pooled[o]['rate'])}</td>"
                   f"<td>[{esc(pooled[o]['ci_low'])}, {esc(pooled[o]['ci_high'])}]</td></tr>"
                   for o in ("win", "tie", "loss") if isinstance(pooled.get(o), dict))
    agree = result.get("agreement") or {}
    agreement = (f"<p>Agreement: {esc(agree['statistic'])} {esc(agree.get('value'))} on {esc(agree.get('pairs'))} "
                 "pairs</p>" if agree.get("statistic") else f"<p class='muted'>{esc(agree.get('note', ''))}</p>")
    return (f"<h2>Results</h2><p>{esc(result.get('one'))} against {esc(result.get('two'))}: "
            f"{esc(pooled.get('ratings'))} ratings by {esc(result.get('raters'))} rater(s) on "
            f"{esc(result.get('pairs'))} pairs.</p><table id='rate-table'><thead><tr><th>outcome for "
            f"{esc(result.get('one'))}</th><th>count</th><th>rate</th><th>95% interval</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>{agreement}")


def _pair_html(p: dict) -> str:
    choices = "".join(f"<label><input type='radio' name='{esc(p['id'])}' value='{c}'> {label}</label> "
                      for c, label in zip(CHOICES, ("A is better", "B is better", "tie")))
    return (f"<fieldset class='pair' data-id='{esc(p['id'])}'><legend>{esc(p['id'])}</legend>"
            f"<p><b>{esc(p['prompt'])}</b></p><table><thead><tr><th>A</th><th>B</th></tr></thead><tbody><tr>"
            f"<td><pre>{esc(p['response_a'])}</pre></td><td><pre>{esc(p['response_b'])}</pre></td></tr></tbody>"
            f"</table><p>{choices}<span class='status muted small'></span></p></fieldset>")
