"""The answers section of report.html: the first N test prompts with the baseline's and the fine-tuned
model's answers beside the reference, and the examples where the two models differ most on the
objective metric, from predictions/test.jsonl. Every piece of text is HTML-escaped here."""

from __future__ import annotations

import html
from pathlib import Path

from tunesmith.evaluate.predictions_file import read_test_predictions
from tunesmith.registry import PREFERENCE_METRICS
from tunesmith.tasks.metrics import METRICS

MAX_CHARS = 600  # a cell holds at most this much of one text; the full texts stay in predictions/test.jsonl


def answers_section(run_dir: Path, metric: str, first_n: int = 10) -> str:
    """Both tables ("" when the run has no predictions or `first_n` is 0)."""
    rows = read_test_predictions(run_dir) or []
    if not rows or first_n <= 0 or "gold" not in rows[0]:  # task.type text: per-document losses, no answers
        return ""
    first = _table(rows[:first_n], None)
    # A metric that needs the whole set (none here today) would have no per-example value: no ranking.
    scored = per_example_gaps(rows, metric) if metric in METRICS else []
    if metric in PREFERENCE_METRICS:  # a pair's figure is its margin
        scored, metric = [(r["margin"] - r["baseline_margin"], r) for r in rows
                          if r.get("margin") is not None and r.get("baseline_margin") is not None], "margin (nats)"
    most = sorted((r for r in scored if r[0] != 0), key=lambda r: -abs(r[0]))[:first_n]
    out = [f"<h2>Answers: the first {min(first_n, len(rows))} test prompts</h2>", first]
    if most:
        out += [f"<h2>Where the models differ most ({html.escape(metric)} per example)</h2>",
                "<p>Fine-tuned minus baseline on single examples, largest differences first.</p>",
                _table([r for _, r in most], metric, [g for g, _ in most])]
    return "".join(out)


def per_example_gaps(rows: list[dict], metric: str) -> list[tuple[float, dict]]:
    """(tuned - baseline `metric` on that example alone, row) for each row, in file order."""
    if metric in PREFERENCE_METRICS:  # computed on margins, not on answers (see answers_section)
        return []
    fn = METRICS[metric].fn
    return [(fn([r["gold"]], [r["prediction"]]) - fn([r["gold"]], [r["baseline_prediction"]]), r) for r in rows]


def _table(rows: list[dict], metric: str | None, gaps: list[float] | None = None) -> str:
    head = "<th>#</th><th>prompt</th><th>reference</th><th>baseline</th><th>fine-tuned</th>"
    head += f"<th>{html.escape(metric)} difference</th>" if gaps else ""
    body = "".join(
        f"<tr><td>{i + 1}</td>{_cell(r['text'])}{_cell(r['gold'])}{_cell(r['baseline_prediction'])}"
        f"{_cell(r['prediction'])}" + (f"<td>{gaps[i]:+.3f}</td>" if gaps else "") + "</tr>"
        for i, r in enumerate(rows))
    return f"<table class='answers'><tr>{head}</tr>{body}</table>"


def _cell(value) -> str:
    """One text cell, escaped; several reference answers are joined by " | "."""
    text = " | ".join(map(str, value)) if isinstance(value, list) else str(value)
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS] + " ..."
    return f"<td style='text-align:left;white-space:pre-wrap'>{html.escape(text)}</td>"
