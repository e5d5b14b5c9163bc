"""What the optimize stage returns: one row per measured variant and the selection.

`to_json()` gives exactly what variants.json (one entry per row) and optimize.json hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class VariantRow:
    """One measured variant: its figures next to the fp32 model's, its checks and its verdict."""

    name: str
    path: str                   # relative to the run directory ("model" for fp32)
    engine: str                 # variant.json's engine; "run-model" for the run's own model
    size_mb: float
    load_seconds: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    throughput_per_s: float | None
    throughput_batch_size: int
    peak_rss_mb: float
    metrics: dict[str, float]
    quality_delta: float        # objective metric minus the fp32 model's, paired on the test rows
    quality_delta_ci: list[float]
    agreement: float            # share of test predictions equal to the fp32 model's
    notes: dict = field(default_factory=dict)  # what the variant's build reported (parity, steps, scheme, ...)
    parity_ok: bool = False     # passed its parity check (merge, export) or its quality-loss bound
    objective_met: bool = False
    criteria: list[dict] = field(default_factory=list)  # the verdict's criteria, as summary.json writes them

    def to_json(self) -> dict:
        """The variants.json entry: the figures, then the build's notes, then the checks."""
        figures = {k: getattr(self, k) for k in ("name", "path", "engine", "size_mb", "load_seconds",
                                                 "latency_p50_ms", "latency_p95_ms", "throughput_per_s",
                                                 "throughput_batch_size", "peak_rss_mb", "metrics", "quality_delta",
                                                 "quality_delta_ci", "agreement")}
        return {**figures, **self.notes, "parity_ok": self.parity_ok, "objective_met": self.objective_met,
                "criteria": self.criteria}


@dataclass(frozen=True)
class SkippedVariant:
    """A configured variant that does not apply to this run (e.g. nothing to merge), and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class OptimizeResult:
    """The measured variants (fp32 first), the skipped ones, and the one selected for serving."""

    objective_metric: str
    selected: str | None        # a variant's name, or None when none meets the objective
    reason: str
    selected_path: str | None   # the selected variant's folder, relative to the run directory
    skipped: list[SkippedVariant]
    variants: list[VariantRow]

    def to_json(self) -> dict:
        """optimize.json (the variants themselves go to variants.json)."""
        return {"objective_metric": self.objective_metric, "selected": self.selected, "reason": self.reason,
                "selected_path": self.selected_path,
                "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped]}
