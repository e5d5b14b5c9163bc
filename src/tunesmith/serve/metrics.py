"""Prometheus series of the server, in a registry of its own (so two apps in one process do not clash)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
REJECT_REASONS = ("queue_full", "deadline", "connections")  # connections: past serve.max_concurrency
LOG_FAILURE_REASONS = ("write", "dropped")  # failed; or not tried, too many writes pending
OTHER_LABEL = "other"  # a predicted label outside the model's label set (free text from an upstream engine)
log = logging.getLogger("tunesmith.serve")


class ServeMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self.requests = Counter("tunesmith_requests_total", "Requests by route and HTTP status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("tunesmith_request_latency_seconds", "Request latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_in = Counter("tunesmith_tokens_in_total", "Prompt tokens received", registry=r)
        self.tokens_out = Counter("tunesmith_tokens_out_total", "Completion tokens returned", registry=r)
        self.batch_size = Histogram("tunesmith_batch_size", "Requests per model call", ["kind"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.in_flight = Gauge("tunesmith_in_flight_requests", "Requests being handled", registry=r)
        self.errors = Counter("tunesmith_errors_total", "Requests that failed inside the server", ["route"],
                              registry=r)
        self.load_seconds = Gauge("tunesmith_model_load_seconds", "Time to load the model", registry=r)
        self.labels = Counter("tunesmith_predicted_label_total", "Predicted labels", ["label"], registry=r)
        self.drift = Gauge("tunesmith_drift_score", "Drift of live inputs against training, per signal",
                           ["signal"], registry=r)
        self.drift_flag = Gauge("tunesmith_drift_detected", "1 when a drift signal is over its threshold",
                                ["signal"], registry=r)
        self.info = Gauge("tunesmith_model_info", "The model being served", ["model", "variant"], registry=r)
        self.rejected = Counter("tunesmith_rejected_total", "Requests answered 503 under overload, by reason",
                                ["reason"], registry=r)
        self.log_failures = Counter("tunesmith_request_log_failures_total",
                                    "Request-log writes that failed or were dropped (the requests were answered)",
                                    ["reason"], registry=r)
        self.drift_failures = Counter("tunesmith_drift_update_failures_total", "Drift gauge updates that failed",
                                      registry=r)
        # Live quality on feedback-labelled traffic (serve/quality.py), for the latest monitor.window_hours.
        self.live_quality = Gauge("tunesmith_live_quality", "Live quality on feedback-labelled requests, latest window",
                                  ["metric"], registry=r)
        self.live_quality_low = Gauge("tunesmith_live_quality_ci_low", "Lower end of the live quality's 95% interval",
                                      ["metric"], registry=r)
        self.live_quality_high = Gauge("tunesmith_live_quality_ci_high",
                                       "Upper end of the live quality's 95% interval", ["metric"], registry=r)
        self.live_quality_labelled = Gauge("tunesmith_live_quality_labelled",
                                           "Feedback-labelled requests the latest live quality is computed on",
                                           ["metric"], registry=r)
        self.accepted_quality = Gauge("tunesmith_accepted_quality", "The test figure the run was accepted on",
                                      ["metric"], registry=r)
        self.quality_failures = Counter("tunesmith_quality_update_failures_total",
                                        "Live quality gauge updates that failed", registry=r)
        for reason in REJECT_REASONS:  # every series exists from the start, at 0
            self.rejected.labels(reason)
        for reason in LOG_FAILURE_REASONS:
            self.log_failures.labels(reason)
        self.before_scrape: list = []  # callables run by exposition() (QualityWatch.refresh)

    def exposition(self) -> bytes:
        """The series in Prometheus' text format; first each `before_scrape` hook is called (each one
        starts a background refresh at most, never waits; a failing one is logged and skipped)."""
        for hook in list(self.before_scrape):
            try:
                hook()
            except Exception as e:  # a scrape must answer even when a refresh cannot start
                log.error("refreshing gauges before a scrape failed: %s: %s", type(e).__name__, e)
        return generate_latest(self.registry)
