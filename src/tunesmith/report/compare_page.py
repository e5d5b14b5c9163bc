"""`tunesmith report --compare A B`: two runs on one page. What the configs change, each run's
objective verdict, test metrics side by side with the paired difference (bootstrap interval and
McNemar/permutation p-value when both scored the same test examples), cost (training time, memory,
latency, size), training curves overlaid, and the test examples on which they disagree."""

from __future__ import annotations

import hashlib
import html
import re
from pathlib import Path

from tunesmith import fsio
from tunesmith.config import load_config
from tunesmith.errors import InputError
from tunesmith.evaluate.metrics_file import read_metrics
from tunesmith.evaluate.predictions_file import read_test_predictions
from tunesmith.evaluate.run_diff import config_diff, metric_diff
from tunesmith.report import plots
from tunesmith.report.html import fmt, img, page, read_log
from tunesmith.runs import enclosing_run, read_summary, reading_run_files
from tunesmith.tasks.metrics import METRICS

COST = ("train_seconds", "peak_rss_mb", "trainable_params", "tokens_per_second", "latency_p50_ms", "latency_p95_ms",
        "throughput_eps", "model_size_mb")
SHOWN_DISAGREEMENTS = 10
# Near the top of every comparison page: only a file holding it is ever replaced by a new page.
MARKER = "<!-- tunesmith report --compare -->"
# A page written before the marker: the shell report/html.page writes, titled "tunesmith: A vs B".
OLD_PAGE = re.compile(rb"<!doctype html><html><head><meta charset='utf-8'><title>tunesmith: [^<]* vs [^<]*</title>")


def compare_report(a: Path, b: Path, out: Path) -> Path:
    """Write the comparison page of runs A and B (differences are B - A) to `out`.

    Raises:
        InputError: `out` is a folder, or a file that is not an earlier comparison page (never replaced),
            or cannot be written; nothing has been touched.
    """
    check_out(out)
    with reading_run_files(a, b):
        for run in (a, b):  # a config edited past what a run can hold is named, as `report RUN` names it
            load_config(run / "config.yaml", check_files=False)
        sa, sb = read_summary(a), read_summary(b)
        ma, mb = read_metrics(a), read_metrics(b)
        names = (_name(sa, a), _name(sb, b))
        diff = metric_diff(a, b)
        body = [f"<h1>tunesmith: {html.escape(names[0])} vs {html.escape(names[1])}</h1>",
                # the folders compared: summary.json names where eval wrote it (copied or moved since?)
                _runs_table({**sa, "run_dir": str(Path(a).resolve())}, {**sb, "run_dir": str(Path(b).resolve())},
                            names), _config_table(config_diff(a, b)),
                _metrics_table(diff, ma["finetuned"], mb["finetuned"], names),
                _plots(ma["finetuned"], mb["finetuned"], {names[0]: read_log(a / "train_log.jsonl"),
                                                          names[1]: read_log(b / "train_log.jsonl")},
                       sa["objective_metric"], names),
                _disagreements(a, b, names) if diff["same_test_examples"] else ""]
    fsio.write_text(out, page(f"tunesmith: {names[0]} vs {names[1]}", MARKER + _a_mark(a) + "".join(body)))
    return out


def default_page(a: Path, b: Path) -> Path:
    """B/compare_<A's folder name>.html; where that page already compares another run of that folder name
    (two runs made with `--out X/run`), a name with a digest of A's path, so neither page is replaced."""
    plain = Path(b) / f"compare_{Path(a).name}.html"
    if not plain.is_file():
        return plain
    with open(plain, "rb") as f:
        head = f.read(65536)
    # A page of another A says so; one written before pages named their A is refreshed, as it was then.
    if MARKER.encode() in head and b"<!-- a: " in head and _a_mark(a).encode() not in head:
        return plain.with_name(f"compare_{Path(a).name}-{_digest(a)}.html")
    return plain


def _digest(a: Path) -> str:
    return hashlib.sha256(str(Path(a).resolve()).encode()).hexdigest()[:8]


def _a_mark(a: Path) -> str:
    """Which run a page's A is, in a comment (a digest: a path may hold `-->`)."""
    return f"<!-- a: {_digest(a)} -->"


def check_out(out: Path) -> None:
    """Refuse a page path that would replace anything but an earlier comparison page."""
    where = f"--out {out}"
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise InputError("exists and is not a plain file", where, "give a new .html file path")
    if out.exists():
        with open(out, "rb") as f:
            head = f.read(65536)  # the marker follows the style sheet
        if MARKER.encode() not in head and not OLD_PAGE.match(head):
            raise InputError("exists and is not an earlier comparison page; left untouched", where,
                             "give a new .html file path")
    run = enclosing_run(out.parent)
    if run is not None and out.parent.resolve() != run:  # a run's folders (model/, data/) hold only what it wrote
        raise InputError(f"is inside the run directory {run}, whose folders hold only what the run wrote", where,
                         "give a path outside any run, or directly in a run's folder (the default)")
    if out.exists():
        return
    why = fsio.unwritable_file(out)
    if why:
        raise InputError(f"cannot be written: {why}", where, "give a file path in a folder you can write to")


def _name(summary: dict, run: Path) -> str:
    return f"{summary['name']}/{run.name}"


def _runs_table(sa: dict, sb: dict, names: tuple[str, str]) -> str:
    def row(label: str, f) -> str:
        return f"<tr><td>{label}</td><td>{fmt(f(sa))}</td><td>{fmt(f(sb))}</td></tr>"

    def verdict(s: dict) -> str:
        return "met" if s["objective"]["met"] else "NOT met"
    return (f"<h2>Runs</h2><table><tr><th></th><th>A: {html.escape(names[0])}</th><th>B: {html.escape(names[1])}</th>"
            f"</tr>{row('model', lambda s: s['model'])}{row('method', lambda s: s['method'])}"
            f"{row('run directory', lambda s: s['run_dir'])}{row('objective', verdict)}</table>")


def _config_table(changes: list[dict]) -> str:
    if not changes:
        return "<h2>Configuration</h2><p>The resolved configurations are identical.</p>"
    rows = "".join(f"<tr><td>{html.escape(c['key'])}</td><td>{fmt(c['a'])}</td><td>{fmt(c['b'])}</td></tr>"
                   for c in changes)
    return (f"<h2>Configuration: {len(changes)} key(s) differ</h2><table><tr><th>key</th><th>A</th><th>B</th></tr>"
            f"{rows}</table>")


def _metrics_table(diff: dict, fa: dict, fb: dict, names: tuple[str, str]) -> str:
    rows = "".join(f"<tr><td>{k}</td><td>{fmt(v['a'])}</td><td>{fmt(v['b'])}</td><td>{v['diff']:+.4g}</td></tr>"
                   for k, v in diff["metrics"].items() if k in METRICS)
    cost = "".join(f"<tr><td>{k}</td><td>{fmt(fa.get(k))}</td><td>{fmt(fb.get(k))}</td><td>"
                   f"{fmt(fb[k] / fa[k]) + 'x' if fa.get(k) and fb.get(k) else ''}</td></tr>" for k in COST)
    p = (diff["paired"] or {}).get(diff["metric"])
    where = "the same test examples" if diff["same_test_examples"] else \
        f"the {diff['paired_examples']} test examples both runs scored"
    paired = (f"<p><b>{diff['metric']}, B - A on {where}: {p['diff']:+.4f}, 95% CI "
              f"[{p['ci_low']:+.4f}, {p['ci_high']:+.4f}], p = {p['p_value']:.3g} ({p['test']})</b>"
              f"{' (the interval excludes 0)' if p['ci_low'] > 0 or p['ci_high'] < 0 else ''}.</p>" if p else
              f"<p>No paired test: {html.escape(str(diff['unpaired']))}.</p>")
    head = "<tr><th>figure</th><th>A</th><th>B</th><th>{}</th></tr>"
    return (f"<h2>Test metrics (fine-tuned models)</h2>{paired}<table>{head.format('B - A')}{rows}</table>"
            f"<h2>Cost</h2><table>{head.format('B / A')}{cost}</table>")


def _plots(fa: dict, fb: dict, logs: dict, metric: str, names: tuple[str, str]) -> str:
    quality = [k for k in fa if k in METRICS and METRICS[k].spec.unit_interval  # one 0-1 axis
               and isinstance(fa[k], float) and isinstance(fb.get(k), float)]
    out = [img(plots.metric_bars(fa, fb, quality, legend=(f"A: {names[0]}", f"B: {names[1]}")),
                "test metrics A and B")]
    curves = plots.curves_of_runs(logs, metric)
    if curves:
        out.append("<h2>Training</h2>" + img(curves, "training curves of A and B"))
    return "".join(out)


def _disagreements(a: Path, b: Path, names: tuple[str, str]) -> str:
    """Test examples one run gets right and the other wrong (classification: by label match)."""
    pa, pb = read_test_predictions(a), read_test_predictions(b)
    if not pa or not pb or "correct" not in pa[0]:
        return ""
    only_a = [(x, y) for x, y in zip(pa, pb) if x["correct"] and not y["correct"]]
    only_b = [(x, y) for x, y in zip(pa, pb) if y["correct"] and not x["correct"]]

    def table(rows: list, title: str) -> str:
        body = "".join(f"<tr><td>{html.escape(_short(x['text']))}</td><td>{html.escape(str(x['gold']))}</td>"
                       f"<td>{html.escape(str(x['prediction']))}</td><td>{html.escape(str(y['prediction']))}</td></tr>"
                       for x, y in rows[:SHOWN_DISAGREEMENTS])
        return (f"<h3>{title}: {len(rows)}</h3>" + (f"<table><tr><th>text</th><th>gold</th><th>A</th><th>B</th></tr>"
                                                     f"{body}</table>" if rows else ""))
    return ("<h2>Where they disagree</h2>" + table(only_a, f"right in A ({html.escape(names[0])}) only")
            + table(only_b, f"right in B ({html.escape(names[1])}) only"))


def _short(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
