"""The report's section on inference variants (variants.json and optimize.json)."""

from __future__ import annotations

import html
from pathlib import Path

from tunesmith import fsio
from tunesmith.report import plots
from tunesmith.report.html import img


def optimize_section(run_dir: Path, metric: str) -> str:
    path = Path(run_dir) / "variants.json"
    if not path.is_file():
        return ""
    variants = fsio.read_json(path)
    chosen = fsio.read_json(Path(run_dir) / "optimize.json")
    ref = variants[0]["latency_p50_ms"]
    rows = "".join(
        f"<tr><td>{html.escape(v['name'])}</td><td>{v['metrics'][metric]:.4f}</td><td>{v['quality_delta']:+.4f}</td>"
        f"<td>[{v['quality_delta_ci'][0]:+.4f}, {v['quality_delta_ci'][1]:+.4f}]</td><td>{v['agreement']:.3f}</td>"
        f"<td>{v['latency_p50_ms']:.1f}</td><td>{v['latency_p95_ms']:.1f}</td>"
        f"<td>{ref / v['latency_p50_ms']:.2f}x</td><td>{v['throughput_per_s']:.1f}</td><td>{v['size_mb']:.1f}</td>"
        f"<td>{v['peak_rss_mb']:.0f}</td><td>{v['load_seconds']:.2f}</td>"
        f"<td class='{'met' if v['parity_ok'] else 'unmet'}'>{'yes' if v['parity_ok'] else 'no'}</td></tr>"
        for v in variants)
    skipped = "".join(f"<li>{html.escape(s['name'])}: {html.escape(s['reason'])}</li>" for s in chosen["skipped"])
    return (f"<h2>Inference variants</h2><p>Selected: <b>{html.escape(str(chosen['selected']))}</b> "
            f"({html.escape(chosen['reason'])}). Each variant is measured in its own process on the same test "
            f"examples; the change and its 95% CI are paired against the fp32 fine-tuned model.</p>"
            f"<table><tr><th>variant</th><th>{metric}</th><th>change</th><th>95% CI</th><th>agreement</th>"
            "<th>p50 ms</th><th>p95 ms</th><th>speed-up</th><th>per s (batch 16)</th><th>MB</th><th>peak RSS MB</th>"
            f"<th>load s</th><th>offered</th></tr>{rows}</table>"
            + (f"<ul>{skipped}</ul>" if skipped else "")
            + img(plots.quality_vs_latency(variants, metric), "quality vs latency"))
