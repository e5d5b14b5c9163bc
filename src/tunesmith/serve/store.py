"""The request log: one SQLite row per answered text (embedded, no server to run).

Rows older than the retention period are deleted as new ones arrive; with `redact_pii` the input
and output are stored with emails, phone numbers, card numbers, IBANs and IP addresses replaced.
A text longer than `STORED_CHARS` characters is stored as its first `STORED_CHARS` characters
(redacted; up to `PII_SLACK` more when a finding crosses the cut, so it is redacted whole) followed by
a marker `[+N characters not stored]`: the rest is never written, so a huge request costs a bounded
amount of redaction work. `tunesmith monitor` reads this log to compute drift.

Each answered text has a `request_id` (a server-made uuid4 hex) and may get one verdict in the
`feedback` table (`add_feedback` from POST /v1/feedback, `import_feedback` from `tunesmith feedback
import`). A correction is redacted like an input; a label is stored as given (a class name: the
patterns would take a numeric code such as "10-20" for a phone number and spoil the truth).

`add` never raises: a write that fails (disk full, database locked) is reported to `on_failure` and
logged, and the request it belongs to is answered all the same. The server writes through a
`LogWriter`: on a small thread pool of its own, never on its event loop, waiting for a write at most
until the request's deadline (and `WAIT_CAP_S`), with at most `max_pending` writes in flight.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tunesmith import fsio
from tunesmith.config.settings import label_form
from tunesmith.data.pii import find_pii, redact
from tunesmith.errors import InputError

SCHEMA = """CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, route TEXT NOT NULL, key_id TEXT,
    input TEXT, output TEXT, label TEXT, confidence REAL, latency_ms REAL, status INTEGER,
    tokens_in INTEGER, tokens_out INTEGER, request_id TEXT, run_dir TEXT, prompt_kind TEXT, input_cut INTEGER)"""
# Columns added after the first release: a log written by an older server gains them when opened.
# prompt_kind: "tokens" when a completion prompt came as token ids (`input` is then the ids decoded,
# the prompt format already inside it), "text" for a text prompt, NULL for a classify row or an older log.
# input_cut: 1 when only the first STORED_CHARS characters of the input were stored, else 0 (NULL: an
# older log, whose rows tell a cut only by the marker text `_clean` ends it with).
ADDED_COLUMNS = {"request_id": "TEXT", "run_dir": "TEXT", "prompt_kind": "TEXT", "input_cut": "INTEGER"}
# One verdict per answered request (POST /v1/feedback, `tunesmith feedback import`): the true label,
# a corrected answer, or a rating (1: the answer was right, 0: it was wrong).
FEEDBACK_SCHEMA = """CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT PRIMARY KEY, ts REAL NOT NULL, key_id TEXT, label TEXT, correction TEXT,
    rating INTEGER, source TEXT NOT NULL)"""
INDEXES = ("CREATE UNIQUE INDEX IF NOT EXISTS requests_request_id ON requests (request_id)",
           "CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts)")
PURGE_EVERY = 200
STORED_CHARS = 8192   # characters of a text kept in the log
PII_SLACK = 512       # redaction looks this far past the cut, so a finding across it is redacted whole
LOG_EVERY_S = 10.0    # at most one log line per failure reason this often (a full disk fails every write)
BUSY_TIMEOUT_S = 5.0  # how long one write waits for a database another process holds locked
WAIT_CAP_S = 2.0      # most a request waits for its log row (the write goes on in the background)
VERDICTS = ("label", "correction", "rating")
log = logging.getLogger("tunesmith.serve")


class UnknownRequest(LookupError):
    """No answered request with this id in the log (never logged, purged, or its write still pending)."""

    def __init__(self, request_id: str):
        super().__init__(f"no answered request with id {request_id} in the request log")
        self.request_id = request_id


class VerdictExists(LookupError):
    """The request already has a verdict, and replacing it was not asked for."""

    def __init__(self, request_id: str):
        super().__init__(f"request {request_id} already has a verdict")
        self.request_id = request_id


class RequestLog:
    """`add(rows)` redacts and inserts rows; safe to call from several threads."""

    def __init__(self, path: Path, retention_days: float = 30, redact_pii: bool = True,
                 on_failure: Callable[[str], None] | None = None):
        why = fsio.uncreatable(Path(path).parent)
        if why is not None:  # e.g. a file where the run's monitor/ folder goes: mkdir's FileExistsError
            raise InputError(f"the request log's folder cannot be used or made ({why})", str(Path(path).parent),
                             "move what is in the way, or set serve.request_log.path")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path, self.retention_s, self.redact = Path(path), retention_days * 86400, redact_pii
        check_log(self.path, new_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None,
                                   timeout=BUSY_TIMEOUT_S)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL stays consistent; no fsync per request
        create_tables(self._db)
        self._lock = threading.Lock()
        self._log_lock = threading.Lock()  # not _lock: a write holds that while SQLite waits for a locked file
        self._writes = 0
        self.on_failure = on_failure
        self._last_logged: dict[str, float] = {}

    def add(self, rows: list[dict]) -> bool:
        """Store rows ({route, key_id, input, output, label, confidence, latency_ms, status, tokens_in,
        tokens_out, request_id, run_dir, prompt_kind}); False when they could not be (counted and logged,
        never raised)."""
        try:
            self.write(rows)
        except Exception as e:  # the request is answered all the same
            self.failed("write", f"request log write failed: {type(e).__name__}: {e}")
            return False
        return True

    def write(self, rows: list[dict]) -> None:
        """Redact and insert rows (raises on a failed write)."""
        now = time.time()
        values = [(now, r["route"], r.get("key_id"), *self._stored(r.get("input")), self._clean(r.get("output")),
                   r.get("label"), r.get("confidence"), r.get("latency_ms"), r.get("status", 200),
                   r.get("tokens_in"), r.get("tokens_out"), r.get("request_id"), r.get("run_dir"),
                   r.get("prompt_kind")) for r in rows]
        with self._lock:
            self._db.executemany("INSERT INTO requests (ts, route, key_id, input, input_cut, output, label, "
                                 "confidence, latency_ms, status, tokens_in, tokens_out, request_id, run_dir, "
                                 "prompt_kind) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", values)
            self._writes += len(rows)
            if self._writes >= PURGE_EVERY:
                self._writes = 0
                self._purge(now - self.retention_s)

    def purge(self) -> int:
        """Delete requests older than the retention period, and their verdicts; the requests deleted."""
        with self._lock:
            return self._purge(time.time() - self.retention_s)

    def _purge(self, before: float) -> int:
        self._db.execute("BEGIN")  # one transaction (the connection autocommits): no verdict outlives its request
        try:
            self._db.execute("DELETE FROM feedback WHERE request_id IN "
                             "(SELECT request_id FROM requests WHERE ts < ? AND request_id IS NOT NULL)", (before,))
            gone = self._db.execute("DELETE FROM requests WHERE ts < ?", (before,)).rowcount
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return gone

    def _rollback(self) -> None:
        """End a failed transaction; one that SQLite already ended (a failed COMMIT may) needs nothing more."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add_feedback(self, request_id: str, *, label: str | None = None, correction: str | None = None,
                     rating: int | None = None, key_id: str | None = None, replace: bool = False,
                     source: str = "api") -> str:
        """Store the verdict on one answered request: "new", or "replaced" when it had one and
        `replace` is true. Raises UnknownRequest, VerdictExists, ValueError (not exactly one verdict)."""
        row = {"request_id": request_id, "label": label, "correction": correction, "rating": rating}
        return self._store_verdicts([row], replace, key_id, source)[0]

    def import_feedback(self, rows: list[dict], replace: bool = False) -> dict:
        """Store verdicts ({request_id, label | correction | rating}) in one transaction: all of them,
        or none when one fails (UnknownRequest, VerdictExists, ValueError naming the row's request).
        The counts stored: {"new": n, "replaced": m}."""
        stored = self._store_verdicts(rows, replace, None, "import")
        return {"new": stored.count("new"), "replaced": stored.count("replaced")}

    def _store_verdicts(self, rows: list[dict], replace: bool, key_id: str | None, source: str) -> list[str]:
        values = [self._verdict(row) for row in rows]  # redaction before the lock: it may take a while
        now, stored = time.time(), []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # the checks and the writes see one state of the log
            try:
                for rid, label, correction, rating in values:
                    if not self._db.execute("SELECT 1 FROM requests WHERE request_id = ?", (rid,)).fetchone():
                        raise UnknownRequest(rid)
                    had = self._db.execute("SELECT 1 FROM feedback WHERE request_id = ?", (rid,)).fetchone()
                    if had and not replace:
                        raise VerdictExists(rid)
                    self._db.execute("INSERT OR REPLACE INTO feedback (request_id, ts, key_id, label, correction, "
                                     "rating, source) VALUES (?,?,?,?,?,?,?)",
                                     (rid, now, key_id, label, correction, rating, source))
                    stored.append("replaced" if had else "new")
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        return stored

    def _verdict(self, row: dict) -> tuple:
        """(request_id, label, correction, rating) to store; the correction redacted like an input."""
        given = [k for k in VERDICTS if row.get(k) is not None]
        if len(given) != 1:
            raise ValueError(f"request {row.get('request_id')}: give exactly one of label, correction, rating")
        if row.get("rating") is not None and (type(row["rating"]) is not int or row["rating"] not in (0, 1)):
            raise ValueError(f"request {row.get('request_id')}: rating must be 0 or 1")
        return row["request_id"], row.get("label"), self._clean(row.get("correction")), row.get("rating")

    def failed(self, reason: str, message: str) -> None:
        """Count a failure under `reason` (on_failure) and log `message`, once per LOG_EVERY_S a reason."""
        if self.on_failure:
            self.on_failure(reason)
        with self._log_lock:
            now, last = time.monotonic(), self._last_logged.get(reason)
            if last is not None and now - last < LOG_EVERY_S:
                return
            self._last_logged[reason] = now
        log.error("%s (counted in tunesmith_request_log_failures_total)", message)

    def _clean(self, text: str | None) -> str | None:
        return self._stored(text)[0]

    def _stored(self, text: str | None) -> tuple[str | None, bool]:
        """The text as the log stores it (redacted, at most STORED_CHARS characters and PII across the cut)
        and whether it was cut."""
        if text is None:
            return None, False
        # A lone surrogate cannot be encoded as UTF-8 and would fail the insert: it is stored as "?".
        text = text.encode("utf-8", "replace").decode("utf-8") if not _encodable(text) else text
        if self.redact:
            text = _folded_if_it_hides_pii(text)
        if len(text) <= STORED_CHARS:
            return (self._redacted(text) if self.redact else text), False
        cut, hits = STORED_CHARS, []
        if self.redact:
            hits = find_pii(text[:STORED_CHARS + PII_SLACK])
            cut = max([cut] + [f.end for f in hits if f.start < STORED_CHARS])
            hits = [f for f in hits if f.start < STORED_CHARS]
        return redact(text[:cut], hits) + f" [+{len(text) - cut} characters not stored]", True


    @staticmethod
    def _redacted(text: str) -> str:
        hits = find_pii(text)
        return redact(text, hits) if hits else text


def _folded_if_it_hides_pii(text: str) -> str:
    """The text NFKC-normalised when that shows PII the patterns miss in it (full-width look-alikes:
    ｊｏｈｎ＠ｅｘａｍｐｌｅ．ｃｏｍ), else the text as given: a correction may be a training target, kept
    byte for byte unless it must be redacted."""
    head = text[:STORED_CHARS + PII_SLACK]  # only what may be stored: bounded work whatever the body's size
    if unicodedata.is_normalized("NFKC", head):
        return text
    folded = unicodedata.normalize("NFKC", head)
    shows_more = len(find_pii(folded[:STORED_CHARS + PII_SLACK])) > len(find_pii(head))
    return folded + text[len(head):] if shows_more else text


class LogWriter:
    """`await record(rows, deadline)`: `store.add(rows)` on a pool of `threads`, then `after(len(rows))`
    when it succeeded. The caller waits for it only until `deadline` (time.monotonic()) and at most
    WAIT_CAP_S: a slow write (database locked, slow disk) then goes on in the background and the
    request is answered in time. At most `max_pending` writes wait or run (the pool's own queue is
    unbounded); past that a request's rows are dropped, counted under "dropped" and logged."""

    def __init__(self, store: RequestLog, threads: int, max_pending: int,
                 after: Callable[[int], None] | None = None):
        self.store, self.after, self.max_pending = store, after, max_pending
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="request-log")
        self.slots = threading.BoundedSemaphore(max_pending)

    async def record(self, rows: list[dict], deadline: float | None = None) -> None:
        if not self.slots.acquire(blocking=False):
            self.store.failed("dropped", f"request log: rows dropped, {self.max_pending} writes already pending "
                                         "(database locked or disk slow?)")
            return
        try:
            job = self.pool.submit(self._write, rows)
        except RuntimeError:  # the pool is shut down: the server is stopping
            self.slots.release()
            return
        job.add_done_callback(lambda _: self.slots.release())
        wait = WAIT_CAP_S if deadline is None else min(WAIT_CAP_S, deadline - time.monotonic())
        if wait > 0:  # asyncio.wait never cancels the write, it only stops waiting for it
            await asyncio.wait({asyncio.wrap_future(job)}, timeout=wait)

    def close(self) -> None:
        """Let pending writes finish (each bounded by BUSY_TIMEOUT_S)."""
        self.pool.shutdown(wait=True)

    def _write(self, rows: list[dict]) -> None:
        if self.store.add(rows) and self.after:
            try:
                self.after(len(rows))
            except Exception as e:  # drift counting is advisory
                log.error("request log: after-write hook failed: %s", type(e).__name__)


def create_tables(db: sqlite3.Connection) -> None:
    """The request and feedback tables and their indexes; an older log gains the newer columns."""
    db.execute(SCHEMA)
    have = {row[1] for row in db.execute("PRAGMA table_info(requests)")}
    for column, kind in ADDED_COLUMNS.items():
        if column not in have:
            db.execute(f"ALTER TABLE requests ADD COLUMN {column} {kind}")
    db.execute(FEEDBACK_SCHEMA)
    for index in INDEXES:
        db.execute(index)


def not_a_log(db: sqlite3.Connection) -> str | None:
    """Why the database open on `db` is not a request log, or None: it needs a requests table with
    every column of the first release (a log written since has more: `create_tables` adds them) and,
    if it has a feedback table, that table's columns. Only reads."""
    expected = sqlite3.connect(":memory:")
    try:
        create_tables(expected)
        wanted = {table: _columns(expected, table) for table in ("requests", "feedback")}
    finally:
        expected.close()
    wanted["requests"] -= set(ADDED_COLUMNS)
    for table, columns in wanted.items():
        have = _columns(db, table)
        if not have and table == "feedback":
            continue  # a log from before verdicts: the table is added when the log is opened
        if missing := sorted(columns - have):
            return f"its {table} table lacks the column(s) {', '.join(missing)}" if have else f"it has no {table} table"
    return None


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


@dataclass(frozen=True)
class LabelledRequest:
    """One answered request with its verdict. `truth` is the true label or corrected answer: the
    verdict's label or correction, or the model's own answer when it was rated right (rating 1);
    None when the verdict is only "wrong" (rating 0). `verified` tells a truth someone gave (a label or
    a correction) from a rating: only verified rows make a fair test set, since rated-right rows are by
    construction answers the model got right (pipeline/traffic.py trains on them but never holds them out)."""

    request_id: str
    ts: float            # when the request was answered (time.time())
    route: str
    input: str | None    # as stored: PII redacted, cut at STORED_CHARS (see `complete`)
    output: str | None
    confidence: float | None
    run_dir: str | None  # the run that answered (None in logs written before runs were recorded)
    label: str | None
    correction: str | None
    rating: int | None
    feedback_ts: float
    prompt_kind: str | None = None  # "tokens": a token-id prompt (`input` is the ids decoded); see ADDED_COLUMNS
    input_cut: int | None = None    # 1: the input was cut when stored; None: a log from before the column

    @property
    def truth(self) -> str | None:
        if self.label is not None:  # NFC, as labels read from data are: the model answers them in that form
            return label_form(self.label)
        if self.correction is not None:
            return self.correction
        # The answer as served keeps the space a plain prompt format puts before an answer (" Paris"); as a
        # truth it is the answer alone, as eval reads predictions (a challenger would learn "  Paris").
        return self.output.strip() if self.rating == 1 and self.output is not None else None

    @property
    def verified(self) -> bool:
        """True when the verdict gives the truth (a label or a correction), not only a rating."""
        return self.label is not None or self.correction is not None

    @property
    def complete(self) -> bool:
        """False when the stored input was cut (the log keeps STORED_CHARS characters of a text). The column
        says so; only rows of a log from before it are read by the marker (a request may end with that text)."""
        if self.input is None:
            return False
        if self.input_cut is not None:
            return not self.input_cut
        return not _CUT_MARK.search(self.input[-64:])


_CUT_MARK = re.compile(r" \[\+\d+ characters not stored\]$")


@contextmanager
def _read_only(path: Path, new_ok: bool = False) -> Iterator[sqlite3.Connection]:
    """The log at `path`, opened read-only; InputError naming it when it is not an SQLite request log
    (with `new_ok`, a database with no table yet passes: opening it as a log makes a new one).
    The URI is built from the resolved path (percent-encoded), so `?`, `#` or `%` in a folder name are
    part of the path, never read as URI syntax."""
    try:
        db = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    except sqlite3.Error as e:  # missing, a folder, unreadable
        raise _not_a_log(path, e) from None
    try:
        fresh = new_ok and db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0
        if not fresh and (why := not_a_log(db)):
            raise _not_a_log(path, why)
        yield db
    except sqlite3.DatabaseError as e:
        if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
            raise  # busy, not bad input
        raise _not_a_log(path, e) from None
    finally:
        db.close()


def check_log(path: Path, new_ok: bool = False) -> None:
    """InputError when `path` is not a request log, before anything opens it for writing (that would give
    another app's database our tables, columns and WAL mode). With `new_ok`, a missing or empty file or
    a database with no table yet passes: it becomes a new log. A log held locked passes: another server
    writes it, and a writer's connection waits for it."""
    path = Path(path)
    if new_ok and (not path.exists() or (path.is_file() and path.stat().st_size == 0)):
        return
    try:
        with _read_only(path, new_ok):
            pass
    except sqlite3.OperationalError:  # only "locked" comes through _read_only
        return


def _not_a_log(path: Path, why) -> InputError:
    if isinstance(why, sqlite3.OperationalError) and "unable to open" in str(why) and Path(path).is_file():
        return no_access(path, why)  # a file SQLite cannot open: a log of a folder this user cannot write
    return InputError(f"not a request log ({why})", str(path),
                      "give the SQLite request log the server wrote (serve.request_log.path)")


def no_access(path: Path, why) -> InputError:
    """The log exists but this user cannot open or write it (file or folder permissions)."""
    return InputError(f"cannot open the request log for this user ({why})", str(path),
                      "SQLite writes beside a log (its -wal and -shm files): give this user write access to the "
                      "log and its folder")


def labelled(path: Path, run_dir: str | None = None, since: float | None = None) -> list[LabelledRequest]:
    """Every answered request of the log at `path` that has a verdict, oldest first; only those
    answered by `run_dir` and/or at or after `since` (time.time()) when given. InputError when `path`
    is not a request log."""
    with _read_only(path) as db:
        have = {row[1] for row in db.execute("PRAGMA table_info(requests)")}
        if "request_id" not in have or not db.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='feedback'").fetchone():
            return []  # a log from before feedback existed
        # Opened read-only: an older log is not migrated, and its missing columns read as NULL.
        kind, cut = (f"r.{c}" if c in have else "NULL" for c in ("prompt_kind", "input_cut"))
        query = ("SELECT r.request_id, r.ts, r.route, r.input, r.output, r.confidence, r.run_dir, f.label, "
                 f"f.correction, f.rating, f.ts, {kind}, {cut} FROM requests r JOIN feedback f "
                 "ON f.request_id = r.request_id WHERE r.status = 200")
        args: list = []
        if run_dir is not None:
            query, args = query + " AND r.run_dir = ?", args + [run_dir]
        if since is not None:
            query, args = query + " AND r.ts >= ?", args + [since]
        rows = db.execute(query + " ORDER BY r.ts, r.id", args).fetchall()
    for row in rows:
        _check_types(path, row[0], {"ts": row[1], "input": row[3], "output": row[4], "confidence": row[5],
                                    "label": row[7], "correction": row[8], "rating": row[9],
                                    "feedback_ts": row[10], "input_cut": row[12]})
        if sum(v is not None for v in row[7:10]) != 1:  # the API and import store exactly one verdict
            raise _edited(path, row[0], "its verdict holds none or several of label, correction, rating")
    return [LabelledRequest(*row) for row in rows]


# What the log's columns hold as tunesmith writes them (SQLite keeps whatever a hand edit puts in any column).
_COLUMN_TYPES = {"ts": (int, float), "feedback_ts": (int, float), "confidence": (int, float, type(None)),
                 "rating": (int, type(None)), "input": (str, type(None)), "output": (str, type(None)),
                 "label": (str, type(None)), "correction": (str, type(None)), "input_cut": (int, type(None))}
# ... and the values it writes there: times are past (a day's slack for clocks set apart), a confidence is a
# probability, a rating and a cut flag 0 or 1. NaN fails every comparison, so it fails these too.
_FUTURE_SLACK_S = 86400.0
_COLUMN_VALUES = {"ts": lambda v: v <= time.time() + _FUTURE_SLACK_S,
                  "feedback_ts": lambda v: v <= time.time() + _FUTURE_SLACK_S,
                  "confidence": lambda v: v is None or 0.0 <= v <= 1.0,
                  "rating": lambda v: v in (None, 0, 1), "input_cut": lambda v: v in (None, 0, 1)}


def _check_types(path: Path, row_id, values: dict) -> None:
    """InputError naming the log and the row whose column holds another type (bytes, text for a number)."""
    for name, value in values.items():
        if not isinstance(value, _COLUMN_TYPES[name]) or isinstance(value, bool):
            raise _edited(path, row_id, f"'{name}' is {type(value).__name__}")
        if name in _COLUMN_VALUES and not _COLUMN_VALUES[name](value):
            raise _edited(path, row_id, f"'{name}' is {value!r}"[:80])


def _edited(path: Path, row_id, what: str) -> InputError:
    return InputError(f"the request log holds a row tunesmith did not write (request {str(row_id)[:40]}: {what})",
                      str(path), "restore the log, or delete the edited rows")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def recent(path: Path, limit: int, run_dir: Path | None = None) -> list[dict]:
    """The newest `limit` successful rows, oldest first; with `run_dir`, of those that run answered (a log
    `serve --registry` shares holds every champion's answers: drift of another model's labels and
    confidences is not this run's). InputError when `path` is not a request log."""
    query = "SELECT * FROM requests WHERE status = 200 AND input IS NOT NULL"
    with _read_only(path) as db:
        db.row_factory = sqlite3.Row
        if run_dir is None:
            rows = db.execute(query + " ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        else:  # the paths the log holds, matched once each (a path as typed, a link), then SQLite's LIMIT
            where, mine = "", []
            if "run_dir" in {r[1] for r in db.execute("PRAGMA table_info(requests)")}:  # not in an older log
                ours = RunMatch(run_dir)
                mine = [n for (n,) in db.execute("SELECT DISTINCT run_dir FROM requests") if n is not None and ours(n)]
                where = f" AND (run_dir IS NULL OR run_dir IN ({','.join('?' * len(mine))}))"
            rows = db.execute(query + where + " ORDER BY id DESC LIMIT ?", (*mine, limit)).fetchall()
    out = [dict(r) for r in reversed(rows)]
    for r in out:
        _check_types(path, r.get("request_id", r.get("id")),
                     {k: r[k] for k in ("ts", "input", "output", "confidence", "label", "input_cut") if k in r})
    return out


class RunMatch:
    """`match(stored)`: whether a log row's run_dir names `run_dir` (None: a row from before runs were
    recorded, counted), each distinct stored path resolved once."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.seen = str(run_dir), {}

    def __call__(self, stored: str | None) -> bool:
        if stored is None or stored == self.run_dir:
            return True
        if stored not in self.seen:
            self.seen[stored] = _resolved(stored) == _resolved(self.run_dir)
        return self.seen[stored]


def _resolved(path: str) -> str:
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):  # a loop of links, an unreadable folder: compare as written
        return path
