"""Drift gauges inside the server: every `update_every` logged requests, a background thread
compares the newest `window` requests with the training reference and sets the gauges."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from tunesmith.serve.drift import drift_report, reference
from tunesmith.serve.store import recent

log = logging.getLogger("tunesmith.serve")


class DriftWatch:
    def __init__(self, run_dir: Path, store, settings, metrics):
        self.run_dir, self.store, self.settings, self.metrics = Path(run_dir), store, settings, metrics
        self._count, self._lock, self._busy = 0, threading.Lock(), False
        self._thread: threading.Thread | None = None
        self.last: dict | None = None

    def seen(self, n: int) -> None:
        with self._lock:
            self._count += n
            due = self._count >= self.settings.update_every and not self._busy
            if due:
                self._count, self._busy = 0, True
        if due:
            self._thread = threading.Thread(target=self._update, name="drift", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 30) -> None:
        """Let a running update finish (a thread killed inside torch at exit aborts the process)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def update_now(self) -> dict:
        rows = recent(self.store.path, self.settings.window)
        report = drift_report(reference(self.run_dir, self.settings.clusters), rows, self.settings, self.run_dir)
        for name, s in report["signals"].items():
            self.metrics.drift.labels(name).set(s["score"])
            self.metrics.drift_flag.labels(name).set(1 if s["drift"] else 0)
        self.last = report
        return report

    def _update(self) -> None:
        try:
            self.update_now()
        except Exception as e:  # drift is advisory: a failure here must not touch request handling
            self.metrics.drift_failures.inc()
            log.error("drift update failed: %s: %s (counted in tunesmith_drift_update_failures_total)",
                      type(e).__name__, e)
        finally:
            with self._lock:
                self._busy = False
