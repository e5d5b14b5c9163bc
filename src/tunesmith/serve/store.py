"""The request log: one SQLite row per answered text (embedded, no server to run).

Rows older than the retention period are deleted as new ones arrive; with `redact_pii` the input
and output are stored with emails, phone numbers, card numbers, IBANs and IP addresses replaced.
`tunesmith monitor` reads this log to compute drift.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from tunesmith.data.pii import find_pii, redact

SCHEMA = """CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, route TEXT NOT NULL, key_id TEXT,
    input TEXT, output TEXT, label TEXT, confidence REAL, latency_ms REAL, status INTEGER,
    tokens_in INTEGER, tokens_out INTEGER)"""
PURGE_EVERY = 200


class RequestLog:
    def __init__(self, path: Path, retention_days: float = 30, redact_pii: bool = True):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path, self.retention_s, self.redact = Path(path), retention_days * 86400, redact_pii
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL stays consistent; no fsync per request
        self._db.execute(SCHEMA)
        self._lock = threading.Lock()
        self._writes = 0

    def add(self, rows: list[dict]) -> None:
        """Insert rows ({route, key_id, input, output, label, confidence, latency_ms, status, tokens_in, tokens_out})."""
        now = time.time()
        values = [(now, r["route"], r.get("key_id"), self._clean(r.get("input")), self._clean(r.get("output")),
                   r.get("label"), r.get("confidence"), r.get("latency_ms"), r.get("status", 200),
                   r.get("tokens_in"), r.get("tokens_out")) for r in rows]
        with self._lock:
            self._db.executemany("INSERT INTO requests (ts, route, key_id, input, output, label, confidence, "
                                 "latency_ms, status, tokens_in, tokens_out) VALUES (?,?,?,?,?,?,?,?,?,?,?)", values)
            self._writes += len(rows)
            if self._writes >= PURGE_EVERY:
                self._writes = 0
                self._db.execute("DELETE FROM requests WHERE ts < ?", (now - self.retention_s,))

    def purge(self) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM requests WHERE ts < ?", (time.time() - self.retention_s,)).rowcount

    def _clean(self, text: str | None) -> str | None:
        if text is None or not self.redact:
            return text
        hits = find_pii(text)
        return redact(text, hits) if hits else text

    def close(self) -> None:
        with self._lock:
            self._db.close()


def recent(path: Path, limit: int) -> list[dict]:
    """The newest `limit` successful rows, oldest first."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM requests WHERE status = 200 AND input IS NOT NULL "
                          "ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
    finally:
        db.close()
    return [dict(r) for r in reversed(rows)]
