"""Gauges the server recomputes in the background: drift (every `serve.drift.update_every` logged
requests, the newest `window` requests against the training reference) and, through the same
`CountedUpdate`, live quality (serve/quality.py, every `monitor.update_every` verdicts)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from tunesmith.serve.drift import drift_report, reference
from tunesmith.serve.store import recent

log = logging.getLogger("tunesmith.serve")


class CountedUpdate:
    """`seen(n)` counts events; every `every` of them `update_now()` runs on a thread of its own,
    never on the event loop and one at a time (events seen meanwhile count towards the next one).
    A failure is counted by `on_failure()` and logged, never raised: the gauges are advisory and
    must not touch request handling."""

    name = "update"
    failures_series = ""

    def __init__(self, every: int, on_failure):
        self.every, self.on_failure = every, on_failure
        self._count, self._lock, self._busy = 0, threading.Lock(), False
        self._thread: threading.Thread | None = None

    def seen(self, n: int) -> None:
        with self._lock:
            self._count += n
            due = self._count >= self.every and not self._busy
            if due:
                self._count = 0
        if due:
            self.start()

    def start(self) -> bool:
        """One update in the background now, unless one is running (False then)."""
        with self._lock:
            if self._busy:
                return False
            self._busy = True
        self._thread = threading.Thread(target=self._update, name=self.name, daemon=True)
        self._thread.start()
        return True

    def close(self, timeout: float = 30) -> None:
        """Let a running update finish (a thread killed inside torch at exit aborts the process)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def update_now(self):
        raise NotImplementedError

    def _update(self) -> None:
        try:
            self.update_now()
        except Exception as e:  # advisory: a failure here must not touch request handling
            self.on_failure()
            log.error("%s update failed: %s: %s (counted in %s)", self.name, type(e).__name__, e,
                      self.failures_series)
        finally:
            with self._lock:
                self._busy = False


class DriftWatch(CountedUpdate):
    """The drift gauges: every `settings.update_every` logged requests."""

    name = "drift"
    failures_series = "tunesmith_drift_update_failures_total"

    def __init__(self, run_dir: Path, store, settings, metrics):
        super().__init__(settings.update_every, metrics.drift_failures.inc)
        self.run_dir, self.store, self.settings, self.metrics = Path(run_dir), store, settings, metrics
        self.last: dict | None = None

    def update_now(self) -> dict:
        rows = recent(self.store.path, self.settings.window)
        report = drift_report(reference(self.run_dir, self.settings.clusters), rows, self.settings, self.run_dir)
        for name, s in report["signals"].items():
            self.metrics.drift.labels(name).set(s["score"])
            self.metrics.drift_flag.labels(name).set(1 if s["drift"] else 0)
        self.last = report
        return report
