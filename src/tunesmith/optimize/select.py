"""optimize.select: the fastest offered variant that still meets the objective and its constraints."""

from __future__ import annotations

from tunesmith.config import ObjectiveConfig
from tunesmith.evaluate.objective import Verdict, judge
from tunesmith.optimize.result import VariantRow

# The fine-tuned model's figures that describe its fp32 weights and that a variant's measurement (its
# answers on the test split, its speed and size) does not give again.
FP32_ONLY = frozenset({"ece", "perplexity", "token_loss", "weights_size_mb"})


def variant_verdict(objective: ObjectiveConfig, baseline: dict, finetuned: dict, row: VariantRow,
                    comparison: dict) -> Verdict:
    """The objective judged on a variant's own figures (training figures are the run's). Figures of the
    fp32 model the variant's measurement does not repeat (calibration, perplexity) are not the variant's:
    a constraint on them counts as not measured, never as met by the fp32 model's figure."""
    own = finetuned if row.name == "fp32" else {k: v for k, v in finetuned.items() if k not in FP32_ONLY}
    figures = {**own, **row.metrics, "latency_p50_ms": row.latency_p50_ms,
               "latency_p95_ms": row.latency_p95_ms, "model_size_mb": row.size_mb,
               "peak_rss_mb": row.peak_rss_mb, "throughput_eps": row.throughput_per_s}
    return judge(objective, baseline, figures, comparison)


def select_variant(rows: list[VariantRow]) -> tuple[str | None, str]:
    """(name, reason): the lowest p50 latency among variants that passed their checks and meet the
    objective; else the fp32 model when it meets it; else none."""
    offered = [r for r in rows if r.parity_ok and r.objective_met]
    if not offered:
        return None, "no variant (fp32 included) meets the objective"
    best = min(offered, key=lambda r: r.latency_p50_ms)
    ref = next(r for r in rows if r.name == "fp32")
    if best.name == "fp32":
        return "fp32", "no optimised variant is faster while meeting the objective"
    speedup = ref.latency_p50_ms / best.latency_p50_ms if best.latency_p50_ms else float("inf")
    return best.name, (f"fastest variant meeting the objective: {speedup:.2f}x the fp32 p50 latency, "
                       f"quality change {best.quality_delta:+.4f}")
