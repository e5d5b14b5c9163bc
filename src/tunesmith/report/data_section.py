"""The data section of report.html (also a page of its own for `tunesmith data report`)."""

from __future__ import annotations

import html
from pathlib import Path

from tunesmith import fsio
from tunesmith.report import plots
from tunesmith.report.html import fmt, img, page


def data_section(data: dict, test_removed: dict | None = None) -> str:
    """Splits, test rows removed, what curation did step by step, PII, suspects, groups, and the profile
    plots. `test_removed` is summary.json's `data` (test_rows_removed and by reason) where a run has one."""
    parts = ["<h2>Data</h2>", _splits_table(data["splits"]), _test_rows_removed(test_removed or data.get("curation")),
             img(plots.data_profile(data["splits"]), "data profile")]
    cur = data.get("curation")
    if cur:
        parts.append(_curation(cur))
    parts.append(_groups(data["splits"]))
    warns = "".join(f"<li class='warn'>{html.escape(w)}</li>" for w in data.get("warnings", []))
    if warns:
        parts.append(f"<ul>{warns}</ul>")
    return "".join(parts)


def _splits_table(splits: dict) -> str:
    cols = ("rows", "augmented_rows", "chars_median", "chars_max", "distinct_1", "distinct_2", "embedding_spread")
    head = "".join(f"<th>{c.replace('_', ' ')}</th>" for c in cols)
    body = "".join(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{html.escape(str(s.get(c, '')))}</td>"
                                                                   for c in cols) + "</tr>"
                   for name, s in splits.items())
    return f"<table><tr><th>split</th>{head}</tr>{body}</table>"


def _test_rows_removed(counts: dict | None) -> str:
    """The count of test rows the data stage removed, said even when it is 0: a figure measured on fewer
    test rows than the file holds must say so (they are removed only for a real defect)."""
    if not counts or "test_rows_removed" not in counts:
        return ""
    n = counts["test_rows_removed"]
    if not n:
        return "<p>test rows removed: 0</p>"
    reasons = _counts(counts.get("test_rows_removed_by_reason", {}))
    return f"<p class='warn'>test rows removed: {fmt(n)} ({reasons}; every row in data/removed.jsonl)</p>"


def _curation(cur: dict) -> str:
    steps = "".join(f"<tr><td>{html.escape(str(s['split']))}</td><td>{html.escape(str(s['step']))}</td>"
                    f"<td>{fmt(s['rows_in'])}</td><td>{fmt(s['rows_out'])}</td>"
                    f"<td>{s['rows_in'] - s['rows_out']}</td><td>{fmt(s['rows_changed'])}</td></tr>"
                    for s in cur["steps"])
    items = [f"<li>removed: {_counts(cur['removed_by_reason']) or 'nothing'} (every row in data/removed.jsonl)</li>",
             f"<li>changed: {_counts(cur['changes_by_kind']) or 'nothing'} (data/changes.jsonl)</li>",
             f"<li>PII found: {_counts(cur['pii_found']) or 'none'}; not checked: "
             f"{html.escape(', '.join(cur.get('pii_not_checked', [])))}</li>",
             f"<li>suspected label errors: {fmt(cur['suspected_label_errors'])} "
             "(data/suspects.jsonl, most suspect first)</li>",
             f"<li>similar rows with different labels, kept: {fmt(cur.get('conflicting_duplicates_total', 0))}</li>",
             "<li>duplicates found and kept (action: report): "
             f"{_counts(cur.get('kept_duplicates_by_kind', {})) or 'none'}"
             "</li>"]
    return ("<h3>Curation</h3><table><tr><th>split</th><th>step</th><th>rows in</th><th>rows out</th><th>removed</th>"
            f"<th>changed</th></tr>{steps}</table><ul>{''.join(items)}</ul>")


def _groups(splits: dict) -> str:
    groups = sorted({g for s in splits.values() for g in s.get("group_counts", {})})
    if not groups:
        return ""
    head = "".join(f"<th>{html.escape(name)}</th>" for name in splits)
    body = "".join(f"<tr><td>{html.escape(g)}</td>" + "".join(
        f"<td>{fmt(s.get('group_counts', {}).get(g, 0))}</td>" for s in splits.values()) + "</tr>" for g in groups)
    return f"<h3>Representation per group</h3><table><tr><th>group</th>{head}</tr>{body}</table>"


def _counts(counts: dict) -> str:
    return ", ".join(f"{html.escape(str(k))} {html.escape(str(v))}" for k, v in counts.items())


def data_page(data: dict, title: str) -> str:
    """The data section as a page of its own, headed `title` (`tunesmith data report --out`)."""
    return page(title, f"<h1>{html.escape(title)}</h1>{data_section(data)}")


def write_data_page(folder: Path, data: dict, project_name: str) -> Path:
    """Write folder/report.html, the data report of project `project_name` as a page; return its path."""
    path = Path(folder) / "report.html"
    fsio.write_text(path, data_page(data, f"tunesmith data report: {project_name}"))
    return path
