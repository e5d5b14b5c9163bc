"""API keys and per-key rate limits.

Keys come from the environment variable TUNESMITH_API_KEYS (comma-separated) and/or a file (one
key per line, `#` comments). With no keys configured the server is open (it binds 127.0.0.1 by
default). Keys are compared in constant time, against every configured key, so neither the match
nor its position leaks through timing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from pathlib import Path

ENV_VAR = "TUNESMITH_API_KEYS"


def load_keys(file: Path | None = None, environ: dict | None = None) -> list[str]:
    environ = os.environ if environ is None else environ
    keys = [k.strip() for k in environ.get(ENV_VAR, "").split(",") if k.strip()]
    if file is not None:
        for line in Path(file).read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.append(line)
    return keys


def key_id(key: str) -> str:
    """A short, non-reversible name for a key (for logs and metrics; never the key itself)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class KeyChecker:
    def __init__(self, keys: list[str]):
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> str | None:
        """The key id for a valid `Bearer KEY` header, else None."""
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        found = None
        for key in self._keys:  # no early exit: the time does not depend on which key matched
            if hmac.compare_digest(given, key) and found is None:
                found = key
        return key_id(found.decode()) if found is not None else None


class RateLimiter:
    """A token bucket per key: `per_minute` requests a minute, bursts up to the same number."""

    def __init__(self, per_minute: int):
        self.rate, self.capacity = per_minute / 60.0, float(per_minute)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> tuple[bool, float]:
        """(allowed, seconds until the next request would be allowed)."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                return True, 0.0
            self._buckets[key] = (tokens, now)
            return False, (1 - tokens) / self.rate
