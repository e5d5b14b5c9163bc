"""report.html and model_card.md from the files of a run directory."""

from __future__ import annotations

import html
from pathlib import Path

from tunesmith import fsio
from tunesmith.config import load_config
from tunesmith.evaluate.metrics_file import read_metrics
from tunesmith.report import plots
from tunesmith.report.answers_section import answers_section
from tunesmith.report.data_section import data_section
from tunesmith.report.fairness_section import fairness_section
from tunesmith.report.html import fmt, img, page, read_log
from tunesmith.report.optimize_section import optimize_section
from tunesmith.runs import read_summary
from tunesmith.tasks.metrics import METRICS


def report_stage(run_dir: Path) -> Path:
    """Write report.html and model_card.md; return the report's path."""
    # the folder the run is in now, not the one eval wrote it in (a copied or moved run)
    summary = {**read_summary(run_dir), "run_dir": str(Path(run_dir).resolve())}
    metrics = read_metrics(run_dir)
    data = fsio.read_json(run_dir / "data" / "report.json")
    log = read_log(run_dir / "train_log.jsonl")
    body = [_header(summary), _verdict(summary["objective"]), _metrics_table(metrics), _plots(metrics, log, summary),
            answers_section(run_dir, summary["objective_metric"], _report_examples(run_dir)),
            data_section(data, summary.get("data")),
            _watch_section(summary.get("training", {}), metrics.get("forgetting")),
            _suites_section(metrics.get("benchmarks", {})), _harness_section(metrics.get("harness")),
            _judge_section(metrics.get("judge")),
            _search_section(run_dir, summary["objective_metric"]), fairness_section(run_dir),
            optimize_section(run_dir, summary["objective_metric"]),
            _train_section(metrics.get("train", {}))]
    html_page, card = page(f"tunesmith: {summary['name']}", "".join(body)), model_card(summary, metrics, data)
    fsio.write_text(run_dir / "report.html", html_page)  # both built before either is written
    fsio.write_text(run_dir / "model_card.md", card)
    return run_dir / "report.html"


def _report_examples(run_dir: Path) -> int:
    """eval.report_examples of the run's config (every caller has checked the run holds config.yaml)."""
    return load_config(run_dir / "config.yaml", check_files=False).eval.report_examples


def _header(summary: dict) -> str:
    return (f"<h1>tunesmith run: {html.escape(summary['name'])}</h1><p>model <code>{html.escape(summary['model'])}"
            f"</code>, method <code>{summary['method']}</code>, run <code>{html.escape(summary['run_dir'])}</code></p>")


def _verdict(objective: dict) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(c['name'])}</td><td>{fmt(c['value'])}</td><td>{c['op']} {fmt(c['target'])}</td>"
        f"<td class='{'met' if c['met'] else 'unmet'}'>{'met' if c['met'] else 'NOT met'}</td></tr>"
        for c in objective["criteria"])
    state = "<span class='met'>met</span>" if objective["met"] else "<span class='unmet'>not met</span>"
    return (f"<h2>Objective: {state}</h2><table><tr><th>criterion</th><th>measured</th><th>target</th><th>verdict</th>"
            f"</tr>{rows}</table>")


def _metrics_table(metrics: dict) -> str:
    base, tuned, comp = metrics["baseline"], metrics["finetuned"], metrics.get("comparison", {})

    def stats(k: str) -> str:
        c = comp.get(k)
        if not c:
            return "<td></td><td></td><td></td>"
        return (f"<td>{c['diff']:+.4f}</td><td>[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]</td>"
                f"<td>{c['p_value']:.3g} ({fmt(c['test'])})</td>")
    rows = "".join(f"<tr><td>{fmt(k)}</td><td>{fmt(base.get(k))}</td><td>{fmt(v)}</td>{stats(k)}</tr>"
                   for k, v in tuned.items())
    note = ""
    if comp:
        any_c = next(iter(comp.values()))
        note = (f"<p>Differences are fine-tuned minus baseline on the same examples; intervals are paired "
                f"bootstrap {int(any_c['level'] * 100)}% intervals ({any_c['resamples']} resamples).</p>")
    return (f"<h2>Test split ({metrics['test_examples']} examples)</h2><table><tr><th>figure</th><th>baseline</th>"
            f"<th>fine-tuned</th><th>difference</th><th>95% CI</th><th>p-value</th></tr>{rows}</table>{note}")


def _plots(metrics: dict, log: list[dict], summary: dict) -> str:
    out = []
    # Task metrics on a 0-1 scale only (reward margins and perplexities would dwarf them); the rest,
    # latencies, sizes and throughput are in the table.
    names = [k for k in metrics["baseline"] if k in METRICS and METRICS[k].spec.unit_interval
             and isinstance(metrics["baseline"][k], float)]
    out.append(img(plots.metric_bars(metrics["baseline"], metrics["finetuned"], names), "test metrics"))
    curves = plots.training_curves([r for r in log if "loss" in r], [r for r in log if "val_loss" in r],
                                   summary["objective_metric"], [r["overfitting"] for r in log if "overfitting" in r],
                                   summary.get("training", {}).get("best_step"))
    if curves:
        out.append("<h2>Training</h2>" + img(curves, "training curves"))
    extra = []
    if metrics.get("calibration"):
        extra.append(img(plots.reliability(metrics["calibration"]), "reliability diagram"))
    if metrics.get("per_class"):
        extra.append(img(plots.per_class_f1(metrics["per_class"]), "per-class F1"))
    if any(metrics.get("latency_ms", {}).values()):
        extra.append(img(plots.latency_histogram(metrics["latency_ms"]), "latency histogram"))
    if extra:
        out.append("<h2>Calibration, classes, latency</h2>" + "".join(extra))
    cm = metrics.get("confusion_matrix")
    if cm:
        out.append("<h2>Confusion matrices (test)</h2>")
        for which in ("baseline", "finetuned"):
            out.append(img(plots.confusion(cm[which], cm["labels"], which), f"confusion matrix {which}"))
    return "".join(out)


def _watch_section(training: dict, forgetting: dict | None) -> str:
    """Overfitting flags, why training stopped, pre-flight warnings, and the forgetting probe."""
    items = [f"<li class='warn'>overfitting at step {f['step']} ({f['signal']}): {html.escape(f['detail'])}</li>"
             for f in training.get("overfitting", [])]
    if training.get("stop_reason"):
        items.append(f"<li>stopped early at step {training['steps']}: {html.escape(training['stop_reason'])}; "
                     f"best checkpoint (step {training['best_step']}) restored</li>")
    items += [f"<li class='warn'>pre-flight: {html.escape(w)}</li>" for w in training.get("preflight", [])]
    if forgetting:
        items.append(f"<li>forgetting probe ({forgetting['probe']}, {forgetting['examples']} examples): accuracy "
                     f"{forgetting['baseline_accuracy']:.3f} before, {forgetting['finetuned_accuracy']:.3f} after "
                     f"({forgetting['delta']:+.3f})</li>")
    if not items:
        items.append("<li>no overfitting signal; training ran its planned steps</li>")
    return f"<h2>Training watch</h2><ul>{''.join(items)}</ul>"


def _suites_section(suites: dict) -> str:
    """Extra evaluation sets (`benchmarks:`): each one's lead metric for both models and the paired difference."""
    if not suites:
        return ""
    rows = []
    for name, s in suites.items():
        m, c = s["metric"], s["comparison"][s["metric"]]
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{fmt(s['examples'])}</td><td>{fmt(m)}</td>"
                    f"<td>{fmt(s['baseline'][m])}</td>"
                    f"<td>{fmt(s['finetuned'][m])}</td><td>{c['diff']:+.4f}</td><td>[{c['ci_low']:+.4f}, "
                    f"{c['ci_high']:+.4f}]</td><td>{c['p_value']:.3g} ({fmt(c['test'])})</td></tr>")
    return ("<h2>Other evaluation sets</h2><table><tr><th>set</th><th>examples</th><th>metric</th><th>baseline</th>"
            "<th>fine-tuned</th><th>difference</th><th>95% CI</th><th>p-value</th></tr>" + "".join(rows) + "</table>")


def _harness_section(harness: dict | None) -> str:
    if not harness:
        return ""
    rows = "".join(f"<tr><td>{html.escape(task)}</td><td>{html.escape(m)}</td><td>{fmt(v['baseline'])}</td>"
                   f"<td>{fmt(v['finetuned'])}</td><td>{_signed(v['diff'])}</td></tr>"
                   for task, figures in harness["tasks"].items() for m, v in figures.items())
    note = f"<p class='warn'>{html.escape(harness['skipped'])}</p>" if harness.get("skipped") else ""
    return (f"<h2>lm-evaluation-harness tasks</h2>{note}<table><tr><th>task</th><th>metric</th><th>baseline</th>"
            f"<th>fine-tuned</th><th>difference</th></tr>{rows}</table>")


def _signed(v: float | None) -> str:
    return "" if v is None else f"{v:+.4f}"


def _judge_section(judge: dict | None) -> str:
    if not judge:
        return ""
    items = [f"<li>{name}: mean score {s['mean_score']} of 10 ({s['graded']} graded, {s['unparsed']} unparsed)</li>"
             for name, s in judge.get("single", {}).items()]
    p = judge.get("pairwise")
    if p:
        items.append(f"<li>pairwise over {p['pairs']} examples, asked in both orders: fine-tuned wins {p['win']:.0%}, "
                     f"ties {p['tie']:.0%}, loses {p['loss']:.0%}; the judge kept its verdict when the answers "
                     f"swapped places in {p['position_consistency']:.0%}</li>")
    return f"<h2>LLM judge ({html.escape(str(judge['judge']))})</h2><ul>{''.join(items)}</ul>"


def _search_section(run_dir: Path, metric: str) -> str:
    """The candidates of a prompt_optimization run, best first."""
    path = run_dir / "train.json"
    history = fsio.read_json(path).get("history", []) if path.is_file() else []
    rows = sorted((h for h in history if "instruction" in h), key=lambda h: -h[metric])
    if not rows:
        return ""
    body = "".join(f"<tr><td>{fmt(h['instruction'])}</td><td>{fmt(h['list_labels'])}</td><td>{fmt(h['shots'])}</td>"
                   f"<td>{fmt(h['prompt_tokens'])}</td><td>{fmt(h[metric])}</td></tr>" for h in rows)
    return (f"<h2>Prompt candidates (validation)</h2><table><tr><th>instruction</th><th>labels listed</th>"
            f"<th>shots</th><th>prompt tokens</th><th>{metric}</th></tr>{body}</table>")


def _train_section(stats: dict) -> str:
    if not stats:
        return ""
    rows = "".join(f"<tr><td>{fmt(k)}</td><td>{fmt(v)}</td></tr>" for k, v in stats.items())
    return f"<h2>Training figures</h2><table>{rows}</table>"


def model_card(summary: dict, metrics: dict, data: dict) -> str:
    """A Markdown model card: what the model is, how it was made, how well it does, its limits."""
    base, tuned = metrics["baseline"], metrics["finetuned"]
    lines = [f"# {summary['name']}", "",
             f"Fine-tuned from `{summary['model']}` with `{summary['method']}` by tunesmith.", "",
             "## Intended use", "", summary.get("instruction") or "(no instruction given)", "",
             "## Data", ""]
    lines += [f"- {name}: {s['rows']} examples" for name, s in data["splits"].items()]
    cur = data.get("curation")
    if cur:
        removed = ", ".join(f"{k} {v}" for k, v in cur["removed_by_reason"].items()) or "nothing"
        pii = ", ".join(f"{k} {v}" for k, v in cur["pii_found"].items()) or "none found"
        lines += [f"- curation removed: {removed}; PII: {pii}; suspected label errors: "
                  f"{cur['suspected_label_errors']} (see data/ in the run directory)"]
    lines += ["", "## Results on the test split", "", "| figure | baseline | fine-tuned |", "|---|---|---|"]
    lines += [f"| {k} | {fmt(base.get(k))} | {fmt(v)} |" for k, v in tuned.items()]
    lines += ["", f"Objective {'met' if summary['objective']['met'] else 'NOT met'}:", ""]
    lines += [f"- {c['name']}: {fmt(c['value'])} (target {c['op']} {c['target']}) {'met' if c['met'] else 'not met'}"
              for c in summary["objective"]["criteria"]]
    lines += ["", "## Limitations", "",
              "Measured on the test split above only; performance on other data, and bias across groups of "
              "people, have not been established by this card.", ""]
    return "\n".join(lines)
