"""Verdicts on served answers: `POST /v1/feedback` (`feedback_router`) and `tunesmith feedback import`
(`import_file`), both stored beside the request log (store.RequestLog.add_feedback / import_feedback).

A verdict names the answer by the `request_id` it carried and gives exactly one of: `label` (the true
class; one the model does not know is accepted, it teaches a new class), `correction` (the right
answer to a completion) or `rating` (1: the answer was right, 0: it was wrong). A correction is at most
store.STORED_CHARS characters and is stored redacted like an input when `request_log.redact_pii` is on;
tabs and line breaks are allowed in it, other control characters are not. A label is one line of at
most LABEL_CHARS characters, surrounding blanks removed, and is stored as given: a class name carries
no personal data, and the PII patterns would take a numeric class code ("10-20") for a phone number.

An answer's log row is written before the answer leaves, unless that write was still pending at the
request's deadline (database locked, disk slow), was dropped under load or failed: feedback on such an
answer is a 404 (unknown request_id), as it is after the row's retention period.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, ValidationError, field_validator, model_validator

from tunesmith.config.schema import MAX_LABEL_CHARS, label_problem
from tunesmith.data.io import read_rows
from tunesmith.errors import DataError, InputError
from tunesmith.serve.replies import error
from tunesmith.serve.routes import unicode_text
from tunesmith.serve.state import ServerState
from tunesmith.serve.store import (
    STORED_CHARS,
    VERDICTS,
    RequestLog,
    UnknownRequest,
    VerdictExists,
    check_log,
    no_access,
)

LABEL_CHARS = MAX_LABEL_CHARS
RETRY_AFTER_S = 1
_ID = re.compile(r"[0-9a-f]{32}")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # not \t \n \r: a correction may have lines
log = logging.getLogger("tunesmith.serve")


class Verdict(BaseModel):
    """One verdict on one answer: its request_id and exactly one of label, correction, rating."""

    model_config = ConfigDict(extra="forbid")

    request_id: str
    label: str | None = None
    correction: str | None = None
    rating: StrictInt | None = None  # strict: true, 1.0 and "1" are refused, not taken for 1

    @field_validator("request_id")
    @classmethod
    def _known_form(cls, v: str) -> str:
        v = v.lower()
        if not _ID.fullmatch(v):
            raise ValueError("request_id must be the 32 hex digits an answer carried (its request_id)")
        return v

    @field_validator("label")
    @classmethod
    def _one_line(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = unicode_text(v).strip()
        if not v or len(v) > LABEL_CHARS:
            raise ValueError(f"label must have 1 to {LABEL_CHARS} characters")
        if problem := label_problem(v):  # the data's own rule: it becomes a class of the challenger
            raise ValueError(f"label {problem}")
        return v

    @field_validator("correction")
    @classmethod
    def _bounded(cls, v: str | None) -> str | None:
        if v is None:
            return None
        unicode_text(v)
        if not v.strip() or len(v) > STORED_CHARS:
            raise ValueError(f"correction must have 1 to {STORED_CHARS} characters, not only blanks")
        if _CONTROL.search(v):
            raise ValueError("correction must not contain control characters (tabs and line breaks are fine)")
        return v

    @field_validator("rating")
    @classmethod
    def _zero_or_one(cls, v: int | None) -> int | None:
        if v not in (None, 0, 1):
            raise ValueError("rating must be 0 (the answer was wrong) or 1 (it was right)")
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> Verdict:
        if sum(getattr(self, k) is not None for k in VERDICTS) != 1:
            raise ValueError("give exactly one of `label`, `correction` or `rating`")
        return self

    def fields(self) -> dict:
        return {"label": self.label, "correction": self.correction, "rating": self.rating}


class FeedbackRequest(Verdict):
    """POST /v1/feedback: a verdict, and `replace: true` to overwrite an earlier one."""

    replace: StrictBool = False


def feedback_router(state: ServerState) -> APIRouter:
    """POST /v1/feedback. The SQLite work runs on a worker thread, waited for until the request's
    deadline; at most serve.max_queue writes pending, beyond that (or past the deadline) a 503 with
    Retry-After. 200 {request_id, stored: "new"|"replaced"}; 404 unknown id; 409 a verdict exists;
    503 when the server has no request log. A verdict is not tied to the API key that got the answer:
    any valid key that knows a request_id may add a verdict, or replace one with `replace: true`
    (request ids are random 128-bit values returned only to the caller)."""
    router, pending = APIRouter(), threading.BoundedSemaphore(state.cfg.max_queue)

    @router.post("/v1/feedback")
    async def feedback(body: FeedbackRequest, request: Request):
        if state.store is None:
            return error(503, "feedback needs the request log, and this server runs without one "
                              "(serve.request_log.enabled is false)", "server_error")
        if not pending.acquire(blocking=False):
            state.metrics.rejected.labels("queue_full").inc()
            return _retry(f"too many feedback writes pending ({state.cfg.max_queue}); retry shortly")
        job = asyncio.get_running_loop().run_in_executor(None, _store, state, body, request.state.key_id)
        job.add_done_callback(lambda done: _settled(done, pending))
        await asyncio.wait({job}, timeout=max(0.0, request.state.deadline - time.monotonic()))
        if not job.done():  # the write goes on; asking again tells whether it was stored (409)
            state.metrics.rejected.labels("deadline").inc()
            return _retry("the request log did not store the verdict in time (it may still): send it again")
        return _answer(state, body.request_id, job)

    return router


def _store(state: ServerState, body: FeedbackRequest, key_id: str | None) -> str:
    """On a worker thread: the verdict into the log, then the live-quality count (when the server keeps one)."""
    stored = state.store.add_feedback(body.request_id, **body.fields(), key_id=key_id, replace=body.replace)
    quality = getattr(state, "quality", None)
    if quality is not None:
        try:
            quality.seen(1)
        except Exception as e:  # the verdict is stored: counting it is advisory
            log.error("feedback: live-quality update failed: %s", type(e).__name__)
    return stored


def _settled(job, pending: threading.BoundedSemaphore) -> None:
    """A write ended (answered or not): free its slot, and mark a failure seen (no "never retrieved" line)."""
    pending.release()
    if not job.cancelled():
        job.exception()


def _answer(state: ServerState, request_id: str, job):
    try:
        return {"request_id": request_id, "stored": job.result()}
    except UnknownRequest:
        return error(404, f"no answered request with request_id {request_id} (unknown, past the log's retention, "
                          "or its log row was not written)", "invalid_request_error")
    except VerdictExists:
        return error(409, f"request {request_id} already has a verdict; send \"replace\": true to replace it",
                     "invalid_request_error")
    except sqlite3.Error as e:  # locked past the busy timeout, disk full
        state.store.failed("write", f"feedback write failed: {type(e).__name__}: {e}")
        return _retry("the request log could not store the verdict (database busy or disk full); retry")


def _retry(message: str):
    response = error(503, message, "server_error")
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


@dataclass(frozen=True)
class ImportResult:
    """What `import_file` stored, and where."""

    db: Path
    new: int
    replaced: int

    @property
    def total(self) -> int:
        return self.new + self.replaced


def import_file(path: Path, db: Path, replace: bool = False, redact_pii: bool = True) -> ImportResult:
    """Store the verdicts of a JSONL/CSV/Parquet file (rows {request_id, label | correction | rating};
    other columns are ignored) in the request log `db`, all in one transaction. Raises DataError naming
    the first bad row (file:line): unreadable, not exactly one valid verdict, a request_id twice in the
    file, unknown to the log, or with a verdict already stored and not `replace`; nothing is written then."""
    path, db = Path(path), Path(db)
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "not found"
        raise InputError(f"verdict file {what}: {path}", "FILE", "give a JSONL, CSV or Parquet file of verdicts")
    verdicts = read_verdicts(path)
    if not db.is_file():
        raise InputError(f"no request log at {db}", "--db", "give the request log the server wrote "
                         "(serve.request_log.path, default RUN_DIR/monitor/requests.db)")
    lines = {v.request_id: line for line, v in verdicts}
    try:
        store = _open_log(db, redact_pii)
    except sqlite3.OperationalError as e:  # opened for writing: a read-only file or folder (not "locked")
        if "readonly" not in str(e) and "unable to open" not in str(e):
            raise
        raise no_access(db, e) from None
    try:
        counts = store.import_feedback([{"request_id": v.request_id, **v.fields()} for _, v in verdicts], replace)
    except sqlite3.OperationalError as e:
        if "readonly" not in str(e) and "unable to open" not in str(e):
            raise
        raise no_access(db, e) from None
    except UnknownRequest as e:
        raise DataError(f"unknown request_id {e.request_id} (not in the request log)", str(path),
                        lines[e.request_id], "nothing was imported") from None
    except VerdictExists as e:
        raise DataError(f"request {e.request_id} already has a verdict", str(path), lines[e.request_id],
                        "nothing was imported; pass --replace to replace stored verdicts") from None
    finally:
        store.close()
    return ImportResult(db, counts["new"], counts["replaced"])


def _open_log(db: Path, redact_pii: bool) -> RequestLog:
    """The request log at `db`; InputError for any other file, a missing one included (it is never
    changed: no table is added)."""
    check_log(db)
    return RequestLog(db, redact_pii=redact_pii)


# Every bad row stops the whole import (nothing is written), so the hint says what a good row is.
ROW_HINT = "fix or remove the row (a row is request_id plus label or correction or rating); nothing was imported"


def read_verdicts(path: Path) -> list[tuple[int, Verdict]]:
    """(line, verdict) for each row of a verdict file; DataError naming the first bad row."""
    read = read_rows(Path(path))
    if read.problems:
        first = read.problems[0]
        raise DataError(first.reason, first.file, first.line, ROW_HINT)
    out, seen = [], {}
    for row in read.rows:
        if not isinstance(row.record, dict):
            raise DataError("a row must be an object with request_id and a verdict", row.file, row.line, ROW_HINT)
        try:
            verdict = Verdict.model_validate(_fields(row.record, text_cells=path.suffix.lower() in (".csv", ".tsv")))
        except ValidationError as e:
            raise DataError(_first_error(e), row.file, row.line, ROW_HINT) from None
        if verdict.request_id in seen:
            raise DataError(f"request_id {verdict.request_id} appears twice (first on line {seen[verdict.request_id]})",
                            row.file, row.line, "give one verdict per answer; nothing was imported")
        seen[verdict.request_id] = row.line
        out.append((row.line, verdict))
    return out


def _fields(record: dict, text_cells: bool) -> dict:
    """The verdict's fields of a row. A CSV cell is text: an empty one is absent, a rating "0"/"1" a number.
    A file's rating 0.0 or 1.0 is taken as 0 or 1 and NaN as absent: pandas writes a rating column with
    gaps as floats (the API's JSON stays strict)."""
    fields = {k: record[k] for k in ("request_id", *VERDICTS) if k in record}
    if text_cells:
        fields = {k: v for k, v in fields.items() if v != ""}
        if isinstance(fields.get("rating"), str) and fields["rating"].strip() in ("0", "1", "0.0", "1.0"):
            fields["rating"] = int(float(fields["rating"]))
    rating = fields.get("rating")
    if isinstance(rating, float) and (rating != rating or rating in (0.0, 1.0)):
        if rating != rating:  # NaN: no rating on this row
            del fields["rating"]
        else:
            fields["rating"] = int(rating)
    return fields


def _first_error(e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    message = first.get("msg", "invalid row").removeprefix("Value error, ")
    return message + (f" ({where})" if where else "")

