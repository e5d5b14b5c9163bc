"""Gauges the server recomputes in the background: drift (every `serve.drift.update_every` logged
requests, the newest `window` requests against the training reference) and, through the same
`CountedUpdate`, live quality (serve/quality.py, every `monitor.update_every` verdicts)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from tunesmith.serve.drift import drift_report, reference
from tunesmith.serve.store import recent

log = logging.getLogger("tunesmith.serve")


class CountedUpdate:
    """`seen(n)` counts events; every `every` of them `update_now()` runs on a thread of its own,
    never on the event loop and one at a time. A request for an update while one runs (`start()`,
    or `every` more events) is not lost: one more update runs right after it, so what changed
    meanwhile (events, a swapped-in run) is in the figures. A failure is counted by `on_failure()`
    and logged, never raised: the gauges are advisory and must not touch request handling."""

    name = "update"
    failures_series = ""

    def __init__(self, every: int, on_failure, clock=time.monotonic):
        self.every, self.on_failure, self.clock = every, on_failure, clock
        self._count, self._lock, self._busy, self._again = 0, threading.Lock(), False, False
        self._thread: threading.Thread | None = None
        self.last_started: float | None = None  # clock() when the newest update began

    def seen(self, n: int) -> None:
        with self._lock:
            self._count += n
            due = self._count >= self.every
            if due:
                self._count = 0
        if due:
            self.start()

    def start(self) -> bool:
        """One update in the background now; False when one is running, which then runs once more
        when it is done (requests meanwhile make one rerun, not one each)."""
        with self._lock:
            if self._busy:
                self._again = True
                return False
            self._busy, self._again = True, False
        self._thread = threading.Thread(target=self._update, name=self.name, daemon=True)
        self._thread.start()
        return True

    def wait(self, timeout: float = 30) -> None:
        """Let a running update (and a rerun it owes) finish."""
        if self._thread is not None:
            self._thread.join(timeout)

    def close(self, timeout: float = 30) -> None:
        """The server's shutdown: let a running update finish (a thread killed inside torch at exit
        aborts the process)."""
        self.wait(timeout)

    def update_now(self):
        raise NotImplementedError

    def _update(self) -> None:
        done = False
        try:
            while not done:
                self._once()
                with self._lock:  # "done" and "not busy" in one step: a start() now is never lost
                    done, self._again = not self._again, False
                    if done:
                        self._busy = False
        finally:
            if not done:  # left by a BaseException: the next start() must still run
                with self._lock:
                    self._busy = False

    def _once(self) -> None:
        self.last_started = self.clock()
        try:
            self.update_now()
        except Exception as e:  # advisory: a failure here must not touch request handling
            self.on_failure()
            log.error("%s update failed: %s: %s (counted in %s)", self.name, type(e).__name__, e,
                      self.failures_series)


class DriftWatch(CountedUpdate):
    """The drift gauges: every `settings.update_every` logged requests."""

    name = "drift"
    failures_series = "tunesmith_drift_update_failures_total"

    def __init__(self, run_dir: Path, store, settings, metrics):
        super().__init__(settings.update_every, metrics.drift_failures.inc)
        self.run_dir, self.store, self.settings, self.metrics = Path(run_dir), store, settings, metrics
        self.last: dict | None = None

    def update_now(self) -> dict:
        rows = recent(self.store.path, self.settings.window, self.run_dir)
        report = drift_report(reference(self.run_dir, self.settings.clusters), rows, self.settings, self.run_dir)
        for name, s in report["signals"].items():
            self.metrics.drift.labels(name).set(s["score"])
            self.metrics.drift_flag.labels(name).set(1 if s["drift"] else 0)
        self.last = report
        return report
