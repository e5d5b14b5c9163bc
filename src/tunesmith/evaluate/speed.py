"""Latency figures, computed once: per-example wall time at batch 1, p50 and p95."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence


def latency_ms(run_one: Callable[[object], object], items: Sequence) -> dict:
    """Time `run_one(item)` for each item; p50/p95 in milliseconds and the samples themselves."""
    if not items:
        return {}
    times = []
    for item in items:
        started = time.perf_counter()
        run_one(item)
        times.append((time.perf_counter() - started) * 1000)
    ordered = sorted(times)
    return {"latency_p50_ms": round(quantile(ordered, 0.5), 2), "latency_p95_ms": round(quantile(ordered, 0.95), 2),
            "latency_samples_ms": [round(t, 2) for t in times]}


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
