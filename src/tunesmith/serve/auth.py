"""API keys and per-key rate limits.

Keys come from the environment variable TUNESMITH_API_KEYS (comma-separated) and/or a file (one
key per line; a line whose first non-blank character is `#` is a comment, so a key may contain `#`).
Keys shorter than MIN_KEY_LENGTH characters are refused: a short key can be guessed; so are keys with
a character outside visible ASCII (a space, a control character, a non-ASCII letter): clients send a
header as bytes the server reads as Latin-1, so such a key could never match. With no keys
configured the server is open, which `tunesmith serve` allows only on a loopback address. Keys are
compared in constant time, against every configured key, so neither the match nor its position
leaks through timing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import threading
import time
from pathlib import Path

from tunesmith.errors import InputError

ENV_VAR = "TUNESMITH_API_KEYS"
MIN_KEY_LENGTH = 16
MAX_KEY_FILE_BYTES = 1024 * 1024  # ~16,000 keys of 64 characters


def load_keys(file: Path | None = None, environ: dict | None = None) -> list[str]:
    """Every configured key: TUNESMITH_API_KEYS, then the file's. InputError (exit 2) for a missing
    or unreadable file and for a key shorter than MIN_KEY_LENGTH, naming where it came from."""
    environ = os.environ if environ is None else environ
    raw = environ.get(ENV_VAR, "")
    keys = [_checked(k.strip(), ENV_VAR) for k in raw.split(",") if k.strip()]
    if raw.strip() and not keys:  # ",,," is a key list gone wrong, not a wish for an open server
        raise InputError(f"{ENV_VAR} is set but holds no key", ENV_VAR,
                         "give comma-separated keys, or unset it for an open server on 127.0.0.1")
    if file is not None:
        found = _file_keys(Path(file))
        if not found:
            raise InputError("the API key file holds no key", str(file), "give one key per line")
        keys += [_checked(key, f"{file}:{n}") for n, key in found]
    return keys


def _file_keys(file: Path) -> list[tuple[int, str]]:
    """(line number, key) for each key line; `#` starts a comment only at the start of a line."""
    try:
        # O_NONBLOCK: opening a fifo would wait for a writer; /dev/zero would be read until memory ran out
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InputError("the API key file is not a regular file (a folder, a device or a pipe)", str(file),
                                 "give a UTF-8 text file with one key per line")
            data = _read_at_most(fd, MAX_KEY_FILE_BYTES + 1)
        finally:
            os.close(fd)
        if len(data) > MAX_KEY_FILE_BYTES:
            raise InputError(f"the API key file is over {MAX_KEY_FILE_BYTES // 1024} KiB", str(file),
                             "give a file with one key per line")
        text = data.decode("utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"API key file not found: {file}", "--api-keys-file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the API key file: {type(e).__name__}", str(file),
                         "give a UTF-8 text file with one key per line") from None
    lines = ((n, line.strip()) for n, line in enumerate(text.splitlines(), 1))
    return [(n, line) for n, line in lines if line and not line.startswith("#")]


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks, size = [], 0
    while size < limit and (chunk := os.read(fd, min(65536, limit - size))):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _checked(key: str, where: str) -> str:
    if len(key) < MIN_KEY_LENGTH:  # the message never shows the key itself
        raise InputError(f"an API key is shorter than {MIN_KEY_LENGTH} characters ({len(key)})", where,
                         "use a long random key, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    bad = next((i for i, c in enumerate(key) if not "!" <= c <= "~"), None)
    if bad is not None:  # the position, never the key or the character itself
        raise InputError(f"an API key has a character at position {bad + 1} that is not visible ASCII (a space, a "
                         "control character or a non-ASCII letter): no HTTP client can send it in a header", where,
                         "use a long random key, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return key


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
