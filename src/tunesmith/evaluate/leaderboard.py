"""The technique bake-off's leaderboard: one entry per method's run, the paired comparison of
each with the best, a printed table and a plot."""

from __future__ import annotations

import math
from pathlib import Path

from tunesmith import fsio
from tunesmith.evaluate.compare import compare
from tunesmith.evaluate.predictions_file import read_test_predictions
from tunesmith.registry import METRIC_SPECS
from tunesmith.runs import read_summary


def entry(method: str, run_dir: Path) -> dict:
    """A method's row from its run directory."""
    s = read_summary(run_dir)
    metric, tuned, base = s["objective_metric"], s["metrics"]["finetuned"], s["metrics"]["baseline"]
    gain = s.get("comparison", {}).get(metric, {})
    return {"method": method, "run_dir": str(run_dir), "metric": metric, "value": tuned.get(metric),
            "baseline": base.get(metric), "gain": gain.get("diff"),
            "gain_ci": [gain.get("ci_low"), gain.get("ci_high")],
            "gain_p_value": gain.get("p_value"), "train_seconds": tuned.get("train_seconds"),
            "peak_rss_mb": tuned.get("peak_rss_mb"), "trainable_params": tuned.get("trainable_params"),
            "latency_p50_ms": tuned.get("latency_p50_ms"), "latency_p95_ms": tuned.get("latency_p95_ms"),
            "objective_met": s["objective"]["met"]}


def rank(entries: list[dict], task_type: str, resamples: int = 1000, seed: int = 0) -> list[dict]:
    """Best first (objective metric, in its direction: the lowest perplexity leads), missing or NaN values
    last; each other entry gets its paired difference from the best."""
    def key(e: dict) -> float:
        value = e["value"]
        if value is None or math.isnan(value):
            return math.inf
        spec = METRIC_SPECS.get(e["metric"])
        return value if spec is not None and not spec.higher_is_better else -value
    ordered = sorted(entries, key=key)
    best = _predictions(Path(ordered[0]["run_dir"]))
    for e in ordered:
        mine = _predictions(Path(e["run_dir"]))
        unpaired = not best or "prediction" not in best[0]  # no file, or a text run (scored by perplexity)
        if e is ordered[0] or unpaired or [r["text"] for r in mine] != [r["text"] for r in best]:
            e["vs_best"] = None
            continue
        row = compare(task_type, [r["gold"] for r in best], [r["prediction"] for r in best],
                      [r["prediction"] for r in mine], [e["metric"]], resamples, seed)[e["metric"]]
        e["vs_best"] = {k: row[k] for k in ("diff", "ci_low", "ci_high", "p_value")}
    return ordered


def table(entries: list[dict]) -> str:
    m = entries[0]["metric"]
    lines = [f"{'method':<22}{m:>10}{'gain (95% CI)':>28}{'vs best (p)':>22}{'train s':>9}{'peak MB':>9}"
             f"{'trainable':>12}{'p50 ms':>8}  objective"]
    for e in entries:
        ci = e["gain_ci"]
        gain = f"{e['gain']:+.4f} [{ci[0]:+.3f}, {ci[1]:+.3f}]" if e["gain"] is not None else "n/a"
        vs = f"{e['vs_best']['diff']:+.4f} ({e['vs_best']['p_value']:.2g})" if e.get("vs_best") else "best"
        lines.append(f"{e['method']:<22}{_f(e['value'], '.4f'):>10}{gain:>28}{vs:>22}{_f(e['train_seconds'], '.0f'):>9}"
                     f"{_f(e['peak_rss_mb'], '.0f'):>9}{_f(e['trainable_params'], ','):>12}"
                     f"{_f(e['latency_p50_ms'], '.0f'):>8}"
                     f"  {'met' if e['objective_met'] else 'not met'}")
    return "\n".join(lines)


def plot(entries: list[dict], path: Path) -> None:
    """Quality (with the gain's CI) against training time, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Method and metric names are user text: `$` and `\` must show as typed, not start mathtext/LaTeX.
    with plt.rc_context({"text.parse_math": False, "text.usetex": False}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for e in entries:
            if e["value"] is None:
                continue
            lo, hi = e["gain_ci"]
            err = [[e["gain"] - lo], [hi - e["gain"]]] if None not in (lo, hi, e["gain"]) else None
            ax.errorbar(e["train_seconds"] or 0, e["value"], yerr=err, fmt="o", capsize=3)
            ax.annotate(e["method"], (e["train_seconds"] or 0, e["value"]), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
        ax.set(xlabel="training seconds", ylabel=entries[0]["metric"], title="Techniques: quality vs training time")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)


def write(entries: list[dict], out_dir: Path) -> None:
    fsio.write_json(Path(out_dir) / "compare.json", entries)
    plot(entries, Path(out_dir) / "compare.png")


def _f(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _predictions(run: Path) -> list[dict]:
    """The run's test predictions, each row checked as `runs diff` checks them (a missing file: none)."""
    return read_test_predictions(run) or []
