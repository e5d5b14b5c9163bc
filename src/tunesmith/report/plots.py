"""Plots as base64 PNG strings, ready to embed in a self-contained HTML page."""

from __future__ import annotations

import base64
import functools
import io
import math
import threading
from collections import Counter

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Labels, group names and run names come from user data: `$` or `\` in them must show as typed, not
# start mathtext (which garbles them or raises on an unmatched `$`) or LaTeX.
LITERAL_TEXT = {"text.parse_math": False, "text.usetex": False}
_ONE_AT_A_TIME = threading.RLock()
TICK_CHARS = 40  # a label or group name longer than this is shortened on a plot: a 1M-character label made an
                 # image of 9 million pixels matplotlib refused to draw


def _tick(text: str) -> str:
    return text if len(text) <= TICK_CHARS else text[:TICK_CHARS - 1] + "\u2026"


def _ticks(texts: list[str]) -> list[str]:
    """Each text as `_tick` shortens it; shortened texts that would read the same (long labels sharing their
    first 39 characters) are numbered in order, [1], [2], ..., so no two ticks of a plot look alike."""
    short = [_tick(t) for t in texts]
    counts = Counter(short)
    seen: Counter = Counter()
    out = []
    for s in short:
        if counts[s] > 1:
            seen[s] += 1
            s = f"{s} [{seen[s]}]"
        out.append(s)
    return out


def _literal(plot):
    """Build (and render) the figure with every text drawn literally. A plot that fails (figures of a
    damaged run) closes what it opened: pyplot keeps every open figure for the life of the process,
    and `tunesmith ui` draws pages for as long as it serves. One plot at a time: pyplot's figures and
    rc_context's settings are process-wide, and the workbench draws pages on several threads."""
    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        with _ONE_AT_A_TIME:
            before = set(plt.get_fignums())
            try:
                with plt.rc_context(LITERAL_TEXT):
                    return plot(*args, **kwargs)
            except BaseException:
                for num in set(plt.get_fignums()) - before:
                    plt.close(num)
                raise
    return wrapper


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@_literal
def training_curves(steps: list[dict], evals: list[dict], metric: str, flags: list[dict] = (),
                    best_step: int | None = None) -> str | None:
    """Training loss per step with validation loss and metric per evaluation; overfitting flags
    as red dashed lines, the restored best step as a green dotted one."""
    if not steps:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=0.8, alpha=0.6, label="train loss (step)")
    if evals:
        ax1.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", label="validation loss")
        ax2.plot([e["step"] for e in evals], [e[metric] for e in evals], "o-", color="tab:green")
    for ax in (ax1, ax2):
        for flag in flags:
            ax.axvline(flag["step"], color="tab:red", ls="--", lw=1, label=f"overfitting ({flag['signal']})")
        if best_step:
            ax.axvline(best_step, color="tab:green", ls=":", lw=1.2, label="best (restored)")
    ax1.set(xlabel="step", ylabel="loss", title="Loss")
    ax1.legend(fontsize=7)
    ax2.set(xlabel="step", ylabel=metric, title=f"Validation {metric}")
    ax2.grid(alpha=0.3)
    return _png(fig)


@_literal
def curves_of_runs(logs: dict[str, list[dict]], metric: str) -> str | None:
    """Training loss per step and validation metric per evaluation, one line per run."""
    if not any(logs.values()):
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, log in logs.items():
        steps, evals = [r for r in log if "loss" in r], [r for r in log if metric in r and "val_loss" in r]
        ax1.plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=0.8, label=name)
        ax2.plot([e["step"] for e in evals], [e[metric] for e in evals], "o-", label=name)
    ax1.set(xlabel="step", ylabel="training loss", title="Loss")
    ax2.set(xlabel="step", ylabel=metric, title=f"Validation {metric}")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _png(fig)


@_literal
def confusion(matrix: list[list[int]], labels: list[str], title: str) -> str:
    n = len(labels)
    size = min(12, 3 + 0.35 * n)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="gold", title=title)
    ax.set_xticklabels(_ticks(labels), rotation=90, fontsize=7)
    ax.set_yticklabels(_ticks(labels), fontsize=7)
    if n <= 20:
        peak = max(max(r) for r in matrix) or 1
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                if v:
                    ax.text(j, i, v, ha="center", va="center", fontsize=7, color="white" if v > peak / 2 else "black")
    return _png(fig)


@_literal
def metric_bars(baseline: dict, finetuned: dict, names: list[str],
                legend: tuple[str, str] = ("baseline", "fine-tuned")) -> str:
    """Bars of each unit-interval figure for both models; a figure one model lacks (eval writes a NaN one as
    null) has no bar."""
    fig, ax = plt.subplots(figsize=(6, 3))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [_height(baseline.get(n)) for n in names], width=0.4, label=legend[0])
    ax.bar([i + 0.2 for i in x], [_height(finetuned.get(n)) for n in names], width=0.4, label=legend[1])
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Test metrics")
    return _png(fig)


def _height(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


@_literal
def data_profile(splits: dict) -> str:
    """Label distribution (when labels exist) and text-length histogram per split, side by side."""
    with_labels = any("label_counts" in s for s in splits.values())
    fig, axes = plt.subplots(1, 2 if with_labels else 1, figsize=(11 if with_labels else 6, 3.6))
    axes = list(axes) if with_labels else [axes]
    bins = sorted({b for s in splits.values() for b in s.get("chars_histogram", {})},
                  key=lambda b: int(b.split("-")[0].rstrip("+")))
    width = 0.8 / max(1, len(splits))
    for k, (name, s) in enumerate(splits.items()):
        total = max(1, s["rows"])
        hist = s.get("chars_histogram", {})
        axes[-1].bar([i + k * width for i in range(len(bins))], [hist.get(b, 0) / total for b in bins],
                     width=width, label=name)
    axes[-1].set_xticks([i + 0.4 - width / 2 for i in range(len(bins))])
    axes[-1].set_xticklabels(bins, rotation=45, fontsize=7)
    axes[-1].set(xlabel="characters", ylabel="share of rows", title="Input length")
    axes[-1].legend(fontsize=7)
    if with_labels:
        labels = sorted({lab for s in splits.values() for lab in s.get("label_counts", {})})
        for k, (name, s) in enumerate(splits.items()):
            total = max(1, s["rows"])
            counts = s.get("label_counts", {})
            axes[0].bar([i + k * width for i in range(len(labels))], [counts.get(lab, 0) / total for lab in labels],
                        width=width, label=name)
        axes[0].set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
        axes[0].set_xticklabels(_ticks(labels), rotation=90, fontsize=6 if len(labels) > 20 else 7)
        axes[0].set(ylabel="share of rows", title="Labels")
        axes[0].legend(fontsize=7)
    return _png(fig)


@_literal
def reliability(calibration: dict) -> str:
    """Accuracy against confidence per bin for baseline and fine-tuned; the diagonal is perfect calibration."""
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    for name, cal in calibration.items():
        bins = cal["bins"]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-",
                label=f"{name} (ECE {cal['ece']:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title="Reliability (test)")
    ax.legend(fontsize=7)
    return _png(fig)


@_literal
def per_class_f1(per_class: dict) -> str:
    """Horizontal bars of each label's F1, worst first, with its support."""
    rows = sorted(per_class.items(), key=lambda kv: kv[1]["f1"])
    fig, ax = plt.subplots(figsize=(6, min(14, 1 + 0.25 * len(rows))))
    ax.barh(range(len(rows)), [r["f1"] for _, r in rows], color="tab:blue")
    ax.set_yticks(range(len(rows)))
    ticks = _ticks([k for k, _ in rows])
    ax.set_yticklabels([f"{t} ({r['support']})" for t, (_, r) in zip(ticks, rows)],
                       fontsize=7 if len(rows) <= 30 else 5)
    ax.set(xlim=(0, 1), xlabel="F1", title="Per-class F1 (fine-tuned, test; support in brackets)")
    return _png(fig)


@_literal
def latency_histogram(samples: dict) -> str:
    """Per-example latency at batch 1, baseline and fine-tuned."""
    fig, ax = plt.subplots(figsize=(5, 3))
    for name, values in samples.items():
        if values:
            ax.hist(values, bins=min(20, max(3, len(values) // 2)), alpha=0.6, label=name)
    ax.set(xlabel="milliseconds per example (batch 1)", ylabel="examples", title="Latency")
    ax.legend(fontsize=7)
    return _png(fig)


@_literal
def quality_vs_latency(variants: list[dict], metric: str) -> str:
    """Each variant's objective metric against its p50 latency at batch 1; offered variants filled."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for v in variants:
        ax.errorbar(v["latency_p50_ms"], v["metrics"][metric], fmt="o" if v["parity_ok"] else "x", capsize=3,
                    yerr=[[max(0.0, -v["quality_delta_ci"][0] + v["quality_delta"])],
                          [max(0.0, v["quality_delta_ci"][1] - v["quality_delta"])]]
                         if "quality_delta_ci" in v else None,
                    color="tab:blue" if v["parity_ok"] else "tab:red")
        ax.annotate(v["name"], (v["latency_p50_ms"], v["metrics"][metric]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set(xlabel="p50 latency per example, batch 1 (ms, log scale)", ylabel=metric,
           title="Quality vs latency (x: not offered; bars: 95% CI of the change vs fp32)")
    ax.title.set_fontsize(8)
    return _png(fig)


@_literal
def group_rates(groups: dict, attribute: str, label: str) -> str:
    """Selection rate, TPR and FPR per group (n in brackets) for one attribute and label of interest."""
    names = sorted(groups, key=lambda g: -groups[g]["n"])[:25]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.28 * len(names)))
    y = range(len(names))
    for offset, key, colour in ((-0.27, "selection_rate", "tab:blue"), (0, "tpr", "tab:green"),
                                (0.27, "fpr", "tab:red")):
        ax.barh([i + offset for i in y], [groups[g][key] or 0 for g in names], height=0.26, color=colour, label=key)
    ax.set_yticks(list(y))
    ax.set_yticklabels([f"{t} ({groups[g]['n']})" for t, g in zip(_ticks(names), names)], fontsize=7)
    ax.set(xlim=(0, 1), xlabel=f"rate of '{_tick(label)}'", title=f"Per-group rates by {_tick(attribute)} (test)")
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)
