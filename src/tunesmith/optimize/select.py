"""optimize.select: the fastest offered variant that still meets the objective and its constraints."""

from __future__ import annotations

from tunesmith.config import ObjectiveConfig
from tunesmith.evaluate.objective import judge


def variant_verdict(objective: ObjectiveConfig, baseline: dict, finetuned: dict, entry: dict,
                    comparison: dict) -> dict:
    """The objective judged on a variant's own figures (training figures are the run's)."""
    figures = {**finetuned, **entry["metrics"], "latency_p50_ms": entry["latency_p50_ms"],
               "latency_p95_ms": entry["latency_p95_ms"], "model_size_mb": entry["size_mb"],
               "peak_rss_mb": entry["peak_rss_mb"], "throughput_eps": entry["throughput_per_s"]}
    return judge(objective, baseline, figures, comparison)


def select_variant(entries: list[dict]) -> tuple[str | None, str]:
    """(name, reason): the lowest p50 latency among variants that passed their checks and meet the
    objective; else the fp32 model when it meets it; else none."""
    offered = [e for e in entries if e["parity_ok"] and e["objective_met"]]
    if not offered:
        return None, "no variant (fp32 included) meets the objective"
    best = min(offered, key=lambda e: e["latency_p50_ms"])
    ref = next(e for e in entries if e["name"] == "fp32")
    if best["name"] == "fp32":
        return "fp32", "no optimised variant is faster while meeting the objective"
    speedup = ref["latency_p50_ms"] / best["latency_p50_ms"] if best["latency_p50_ms"] else float("inf")
    return best["name"], (f"fastest variant meeting the objective: {speedup:.2f}x the fp32 p50 latency, "
                          f"quality change {best['quality_delta']:+.4f}")
