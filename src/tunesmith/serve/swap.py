"""Hot swap of the served model (`tunesmith serve --registry NAME`): the app is given a `ServiceSlot`
in place of a Service, and a `RegistryFollower` thread polls the champion registry and swaps in a
newly promoted (or rolled back to) run.

What a swap guarantees: every model call runs whole on one model (the slot pins the current service
for the call: a micro-batch's call, or a stream from its first token to its end), calls that started
before a swap finish on the model that took them, calls after it go to the new one, and the old
model is closed when its last call ends. Nothing is refused meanwhile. The new run is loaded on the
follower's thread, never on the event loop; a run that fails to load, has another task type, or
does not fit serve.max_batch_tokens is refused (logged, counted) and the old model keeps serving.

Every result the slot returns names the run that computed it (`answered_by`), so a request-log row
names the run that answered even when a swap happened while it was being answered.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Generator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

from prometheus_client import Counter, Gauge

from tunesmith import champions
from tunesmith.errors import EngineError
from tunesmith.serve.service import Completion, Finish

log = logging.getLogger("tunesmith.serve")
POLL_S = 2.0            # how often the follower reads the registry
RETRY_AFTER_S = 60.0    # a refused run is tried again after this (doubling, at most RETRY_MAX_S)
RETRY_MAX_S = 900.0


class Scored(tuple):
    """(label, probabilities) of one classified text, with `run_dir`: the run that computed it."""

    run_dir: Path | None

    def __new__(cls, pair: tuple, run_dir: Path | None):
        self = super().__new__(cls, pair)
        self.run_dir = run_dir
        return self


@dataclass
class Served(Completion):
    """A Completion with `run_dir`: the run that computed it."""

    run_dir: Path | None = None


def answered_by(result, service) -> Path | None:
    """The run that computed `result` (a classify pair, a Completion, a stream's finish reason): the
    one a ServiceSlot names on it, else `service.run_dir` (a server that does not swap)."""
    return getattr(result, "run_dir", None) or getattr(service, "run_dir", None)


class ServiceSlot:
    """Stands where the app expects a Service and answers with the current one. Attribute reads
    (name, labels, fmt, ...) see the current service; each model call pins one service for its
    whole length (`use`), and a service swapped out is closed when its last call ends. After
    `close` (the server stopping) a new call raises EngineError; calls already running end quietly."""

    def __init__(self, service):
        self._lock = threading.Lock()
        self._current = service
        self._users: dict[int, list] = {id(service): [service, 0]}  # by id: a Service dataclass is unhashable
        self._closed = False
        self.swaps = 0

    def __getattr__(self, name: str):
        if name.startswith("_"):  # never reached for the slot's own fields once they are set
            raise AttributeError(name)
        return getattr(self._current, name)

    @property
    def current(self):
        """The service new calls go to."""
        return self._current

    @contextmanager
    def use(self):
        """The current service, kept open until the block ends even if another is swapped in meanwhile.

        Raises:
            EngineError: the slot is closed (the server is stopping; a late call of the model thread).
        """
        with self._lock:
            if self._closed:
                raise EngineError("the server is stopping")
            service = self._current
            self._users[id(service)][1] += 1
        try:
            yield service
        finally:
            self._release(service)

    def in_use(self, service) -> int:
        """Calls running on `service` now (0 once it is closed)."""
        with self._lock:
            entry = self._users.get(id(service))
            return entry[1] if entry and entry[0] is service else 0

    def swap(self, service):
        """Send new calls to `service`; returns the one it replaces, closed now if idle, else when its
        last call ends (None after `close`: then `service` itself is closed, nothing will use it)."""
        with self._lock:
            old = None if self._closed else self._current
            if old is not None:
                self._current = service
                self._users.setdefault(id(service), [service, 0])
                self.swaps += 1
            idle = old is not None and old is not service and self._users[id(old)][1] == 0
            if idle:
                del self._users[id(old)]
        if old is None:  # a load that finished after the server stopped
            _close(service)
        elif idle:
            _close(old)
        return old

    def _release(self, service) -> None:
        with self._lock:
            entry = self._users.get(id(service))
            if entry is None:  # the slot was closed meanwhile, and closed every service with it
                return
            entry[1] -= 1
            done = entry[1] == 0 and service is not self._current
            if done:
                del self._users[id(service)]
        if done:
            _close(service)

    def close(self) -> None:
        """The app's shutdown: close every service still held, the current one included."""
        with self._lock:
            held = [entry[0] for entry in self._users.values()]
            self._users.clear()
            self._closed = True
        for service in held:
            _close(service)

    # The calls the routes and the model thread make, each on one pinned service.
    def ready(self) -> bool:
        with self.use() as service:
            return service.ready()

    def example(self, *args, **kwargs):
        with self.use() as service:
            return service.example(*args, **kwargs)

    def row_tokens(self, kind: str, items: list) -> list:
        with self.use() as service:
            return service.row_tokens(kind, items)

    def classify(self, texts: list[str]) -> list[Scored]:
        with self.use() as service:
            return [Scored(pair, service.run_dir) for pair in service.classify(texts)]

    def complete(self, examples: list, max_tokens: list[int], *sampling, **abandoned) -> list[Served]:
        with self.use() as service:
            done = service.complete(examples, max_tokens, *sampling, **abandoned)
            return [Served(**{f.name: getattr(c, f.name) for f in fields(Completion)}, run_dir=service.run_dir)
                    for c in done]

    def stream(self, example, max_tokens: int, cancelled: threading.Event, *sampling) -> Generator[str, None, str]:
        """The current service's stream, pinned from its first piece to its end (or until it is closed)."""
        with self.use() as service:
            finish = yield from service.stream(example, max_tokens, cancelled, *sampling)
        return Finish(finish, getattr(finish, "tokens", None), service.run_dir) if finish else finish


def _close(service) -> None:
    try:
        service.close()
    except Exception as e:  # a failing close must not break the call that released it
        log.error("closing the model swapped out failed: %s: %s", type(e).__name__, e)


class SwapMetrics:
    """The follower's series, in the app's Prometheus registry."""

    def __init__(self, registry, name: str):
        self.name = name
        self.swaps = Counter("tunesmith_model_swaps_total", "Models swapped in from the champion registry",
                             registry=registry)
        self.failures = Counter("tunesmith_model_swap_failures_total",
                                "Promoted runs not swapped in (the old model kept serving), by reason",
                                ["reason"], registry=registry)
        self.read_failures = Counter("tunesmith_registry_read_failures_total",
                                     "Champion registry reads that failed (the server kept serving)", registry=registry)
        self.run = Gauge("tunesmith_served_run_info", "The run served, and the registry name it follows",
                         ["registry", "run"], registry=registry)
        for reason in ("load", "refused"):
            self.failures.labels(reason)

    def serving(self, run_dir: Path | None) -> None:
        self.run.clear()
        self.run.labels(self.name, str(run_dir)).set(1)


class RegistryFollower:
    """A background thread that reads `champions.current(name)` every `poll_s` seconds and swaps the
    run it names into `slot` (see the module's docstring). `load(run_dir, variant)` makes a Service;
    `fits(service)` raises InputError for one this server cannot serve (its budget); `metrics` is the
    app's ServeMetrics."""

    def __init__(self, name: str, slot: ServiceSlot, metrics, load: Callable, *, fits: Callable | None = None,
                 variant: str | None = None, poll_s: float = POLL_S, announce: Callable[[str], None] | None = None,
                 on_swap: Callable[[Path], None] | None = None):
        self.name, self.slot, self.load, self.fits, self.variant = name, slot, load, fits, variant
        self.on_swap = on_swap  # told the new run after each swap (the live-quality and drift watches follow it)
        self.poll_s, self.metrics = poll_s, metrics
        self.series = SwapMetrics(metrics.registry, name)
        self.series.serving(slot.run_dir)
        self.announce = announce or (lambda line: print(line, file=sys.stderr))
        self._refused: dict[str, tuple[int, float]] = {}  # run -> (failures, monotonic time to try again)
        self._unreadable: str | None = None  # why the last read failed, until one succeeds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="registry-follower", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60) -> None:
        """Stop polling; a load in progress is waited for (a thread killed inside torch at exit aborts
        the process)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception as e:  # the follower never dies: the server goes on serving what it has
                log.error("registry follower: %s: %s", type(e).__name__, e)

    def check(self) -> str:
        """One poll: "unchanged", "swapped", "refused", "waiting" (a refused run, before its retry
        time), "unreadable" (the registry read failed) or "stopped" (the server stopped while the
        new run loaded)."""
        try:
            wanted = champions.current(self.name, must_exist=True)
        except Exception as e:
            self.series.read_failures.inc()
            why = f"{type(e).__name__}: {getattr(e, 'what', e)}"
            if why != self._unreadable:  # once per cause, not every poll
                log.error("reading the champion registry '%s' failed: %s (still serving %s)", self.name, why,
                          self.slot.run_dir)
            self._unreadable = why
            return "unreadable"
        if self._unreadable is not None:
            log.warning("the champion registry '%s' is readable again", self.name)
            self._unreadable = None
        if wanted is None or _same(wanted, self.slot.run_dir):
            self._refused.clear()  # back on the served run: a run refused before is tried afresh when promoted
            return "unchanged"
        failures, retry_at = self._refused.get(str(wanted), (0, 0.0))
        if time.monotonic() < retry_at:
            return "waiting"
        return self._swap_to(wanted, failures)

    def _swap_to(self, wanted: Path, failures: int) -> str:
        try:
            service = self.load(wanted, self.variant)
        except Exception as e:
            return self._refuse(wanted, failures, "load", f"it failed to load: {type(e).__name__}: "
                                                          f"{getattr(e, 'what', e)}")
        why = self._mismatch(service)
        if why:
            _close(service)
            return self._refuse(wanted, failures, "refused", why)
        old = self.slot.swap(service)
        if old is None:  # the server stopped during the load: the slot closed `service`, nothing to follow
            return "stopped"
        self._refused.pop(str(wanted), None)
        self.series.swaps.inc()
        self.series.serving(service.run_dir)
        self.metrics.info.clear()
        self.metrics.info.labels(service.name, service.variant).set(1)
        self.metrics.load_seconds.set(service.load_seconds)
        self.announce(f"now serving {service.run_dir} ({service.variant}, loaded in {service.load_seconds:.1f} s) "
                      f"as '{self.name}', was {old.run_dir}")
        if self.on_swap is not None:
            try:
                self.on_swap(service.run_dir)
            except Exception as e:  # monitoring is advisory: the swap itself has happened
                log.error("after the swap to %s: updating the monitors failed: %s: %s", service.run_dir,
                          type(e).__name__, e)
        return "swapped"

    def _mismatch(self, service) -> str | None:
        """Why `service` cannot replace the current one, or None."""
        have, new = self.slot.current.fmt.task_type, service.fmt.task_type
        if have != new or bool(self.slot.current.labels) != bool(service.labels):
            return f"its task type is {new}, the server's is {have} (clients would get another kind of answer)"
        if self.fits is not None:
            try:
                self.fits(service)
            except Exception as e:
                return f"it does not fit this server: {getattr(e, 'what', e)}"
        return None

    def _refuse(self, wanted: Path, failures: int, reason: str, why: str) -> str:
        wait = min(RETRY_MAX_S, RETRY_AFTER_S * 2 ** failures)
        self._refused[str(wanted)] = (failures + 1, time.monotonic() + wait)
        self.series.failures.labels(reason).inc()
        log.error("not swapping to %s, promoted as '%s': %s; still serving %s (tried again in %.0f s, "
                  "or when the registry changes)", wanted, self.name, why, self.slot.run_dir, wait)
        return "refused"


def _same(a: Path | None, b: Path | None) -> bool:
    if a is None or b is None:
        return a is b
    return Path(a).resolve() == Path(b).resolve()
