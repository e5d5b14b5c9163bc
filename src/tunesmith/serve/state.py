"""What the server's routes, middleware and exception handlers share: one `ServerState` per app,
built around a loaded Service by `build_state` and closed when the app stops."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.config import ServeConfig
from tunesmith.cores import CoreShare, shared
from tunesmith.errors import InputError
from tunesmith.serve.auth import KeyChecker, RateLimiter
from tunesmith.serve.batcher import MicroBatcher
from tunesmith.serve.metrics import ServeMetrics
from tunesmith.serve.model_calls import Pacer, run_batch
from tunesmith.serve.monitoring import DriftWatch
from tunesmith.serve.quality import QualityWatch, quality_target
from tunesmith.serve.service import Service
from tunesmith.serve.store import LogWriter, RequestLog

LOG_THREADS = 2  # request-log writes at once (SQLite takes one writer at a time anyway)
PENDING_WRITES_PER_QUEUED = 2  # request-log writes waiting or running, per serve.max_queue


@dataclass
class ServerState:
    """The loaded model and everything around it that lives as long as the app: keys and rate
    limits, the model thread and its micro-batcher, the bound on streams, the request log and its
    writer, drift and live-quality gauges and metrics. `store`, `watch`, `writer` and `quality` are
    None without a request log; `watch` and `quality` also without a run directory."""

    service: Service
    cfg: ServeConfig
    metrics: ServeMetrics
    checker: KeyChecker
    limiter: RateLimiter
    executor: ThreadPoolExecutor
    batcher: MicroBatcher
    streams: threading.BoundedSemaphore
    store: RequestLog | None
    watch: DriftWatch | None
    writer: LogWriter | None
    quality: QualityWatch | None = None  # the feedback route calls quality.seen(1) after a stored verdict
    cores: CoreShare | None = None  # the model thread's torch threads (None for an upstream engine)
    # Called first when the app stops, before the model and the log close (the registry follower's
    # stop: no swap may start on a closed slot, no monitor follow a swap into a closed state).
    before_close: list[Callable[[], None]] = field(default_factory=list)

    async def record(self, rows: list[dict], deadline: float | None = None) -> None:
        """The request-log write (redaction included) off the event loop, waited for until the
        deadline at most (see LogWriter); it never raises (see RequestLog.add)."""
        if self.writer:
            await self.writer.record(rows, deadline)

    def close(self) -> None:
        """Run `before_close`, stop the model thread, let pending log writes and a drift or quality
        update finish, close the engine and the log (the app's shutdown)."""
        for stop in self.before_close:
            stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.writer:
            self.writer.close()
        self.service.close()
        if self.watch:
            self.watch.close()
        if self.quality:
            self.quality.close()
        if self.store:
            self.store.close()


def build_state(service: Service, cfg: ServeConfig, keys: list[str] | None = None,
                log_path: Path | None = None) -> ServerState:
    """The state of an app serving `service` under the limits of `cfg`; raises InputError when one
    request cannot fit in a model call (serve.max_batch_tokens)."""
    check_budget(service, cfg)
    metrics = _metrics(service)
    checker, limiter = KeyChecker(keys or []), RateLimiter(cfg.rate_limit_per_minute)
    executor = ThreadPoolExecutor(max_workers=service.threads, thread_name_prefix="model")
    cores = shared() if _torch_on_cpu(service) else None  # see cores.py
    batcher = _batcher(service, cfg, executor, metrics, cores)
    streams = threading.BoundedSemaphore(cfg.max_queue)  # streams bypass the batcher: bounded on their own
    store, watch, writer = _request_log(service, cfg, log_path, metrics)
    quality = _quality(service, store, metrics)
    return ServerState(service, cfg, metrics, checker, limiter, executor, batcher, streams, store, watch, writer,
                       quality, cores=cores)


def _torch_on_cpu(service) -> bool:
    """Whether the service computes with a torch module on the CPU (not an upstream engine, a
    CTranslate2 or ONNX variant, or a GPU), the one case where torch's thread count is the work's."""
    module = getattr(getattr(service, "predictor", None), "module", None)
    if module is None or not hasattr(module, "parameters"):
        return False
    first = next(module.parameters(), None)
    return first is not None and first.device.type == "cpu"


def check_budget(service, cfg: ServeConfig) -> None:
    """One row must fit in a model call: a prompt of task.max_length tokens (plus max_tokens to
    generate, for a generation model)."""
    if not hasattr(service, "row_tokens"):  # an upstream engine bounds its own batches
        return
    row = service.fmt.max_length + (0 if service.labels else cfg.max_tokens)
    if cfg.max_batch_tokens < row:
        raise InputError(f"serve.max_batch_tokens ({cfg.max_batch_tokens}) is smaller than one request "
                         f"({row} tokens: task.max_length" + ("" if service.labels else " + serve.max_tokens") + ")",
                         "serve.max_batch_tokens", f"set it to at least {row}")


def _metrics(service: Service) -> ServeMetrics:
    metrics = ServeMetrics()
    metrics.load_seconds.set(service.load_seconds)
    metrics.info.labels(service.name, service.variant).set(1)
    return metrics


def _batcher(service: Service, cfg: ServeConfig, executor: ThreadPoolExecutor, metrics: ServeMetrics,
             cores: CoreShare | None) -> MicroBatcher:
    """The micro-batcher in front of the model thread; its calls are paced to a quarter of the deadline."""
    pacer = Pacer(cfg.request_timeout_s / 4)
    return MicroBatcher(lambda kind, items, deliver, alive: run_batch(service, kind, items, deliver, alive,
                                                                      cfg.max_batch_tokens, pacer, cores),
                        cfg.max_batch, cfg.max_wait_ms, executor, max_queue=cfg.max_queue,
                        rows=lambda kind, item: len(item) if kind == "classify" else 1,
                        on_batch=lambda kind, n: metrics.batch_size.labels(kind).observe(n))


def _request_log(service: Service, cfg: ServeConfig, log_path: Path | None, metrics: ServeMetrics):
    """(store, drift watch, writer), all None when the request log is off or has no path."""
    if not (cfg.request_log.enabled and log_path):
        return None, None, None
    store = RequestLog(log_path, cfg.request_log.retention_days, cfg.request_log.redact_pii,
                       on_failure=lambda reason: metrics.log_failures.labels(reason).inc())
    watch = DriftWatch(service.run_dir, store, cfg.drift, metrics) if service.run_dir else None
    # Redaction and SQLite writes run there, two at a time, never on the event loop, and a bounded number pending.
    writer = LogWriter(store, LOG_THREADS, PENDING_WRITES_PER_QUEUED * cfg.max_queue,
                       after=watch.seen if watch else None)
    return store, watch, writer


def _quality(service: Service, store: RequestLog | None, metrics: ServeMetrics) -> QualityWatch | None:
    """The live-quality gauges of a served run (None without a request log, a run directory, or a
    figure to judge answers by); set once in the background at startup from the verdicts already logged."""
    target = quality_target(service.run_dir) if store and service.run_dir else None
    if target is None:
        return None
    watch = QualityWatch(target, store.path, metrics)
    watch.start()
    return watch
