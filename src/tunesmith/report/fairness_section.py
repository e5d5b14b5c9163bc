"""The report's fairness section (audit.json): headline disparities, per-group charts, probes."""

from __future__ import annotations

import html
from pathlib import Path

from tunesmith import fsio
from tunesmith.data.groups import shown_groups
from tunesmith.registry import DISPARITY_FIGURES
from tunesmith.report import plots
from tunesmith.report.html import img


def fairness_section(run_dir: Path) -> str:
    path = Path(run_dir) / "audit.json"
    if not path.is_file():
        return ""
    audit = fsio.read_json(path)
    rows = "".join(_headline_row(k.replace("_", " "), audit[k]) for k in DISPARITY_FIGURES)
    parts = [f"<h2>Fairness audit</h2><table><tr><th>figure (worst attribute and label)</th><th>value</th>"
             f"<th>95% CI</th><th>where</th></tr>{rows}</table>"]
    for attr, groups in audit["groups"].items():
        label = audit["demographic_parity_difference"].get("label") or audit["positive_labels"][0]
        small = audit["attributes"][attr]["small_groups"]
        parts.append(img(plots.group_rates(groups, attr, label), f"per-group rates: {html.escape(attr)}")
                     + (f"<p class='warn'>groups under {audit['min_group_size']} test rows, not compared: "
                        f"{html.escape(shown_groups(small, 30))}</p>" if small else ""))
    parts.append(_data_part(audit["data"]))
    parts.append(_probes(audit))
    return "".join(parts)


def _headline_row(name: str, f: dict) -> str:
    if f.get("value") is None:
        return f"<tr><td>{name}</td><td>n/a</td><td></td><td></td></tr>"
    return (f"<tr><td>{name}</td><td>{f['value']:.4f}</td><td>[{_f4(f.get('ci_low'))}, {_f4(f.get('ci_high'))}]</td>"
            f"<td>{html.escape(str(f.get('attribute')))}, label {html.escape(str(f.get('label')))}</td></tr>")


def _f4(value) -> str:
    """A figure to 4 places; n/a where it could not be measured (e.g. no group selected anyone)."""
    return "n/a" if value is None else f"{value:.4f}"


def _data_part(data: dict) -> str:
    items = []
    for attr, d in data.items():
        a = d["association"]
        assoc = (f"chi-square p = {a['p_value']:.3g}, mutual information {a['mutual_information']:.4f} nats"
                 if a["p_value"] is not None else "one group or one label only")
        flagged = f"; under-represented: {html.escape(shown_groups(d['under_represented'], 20))}" \
            if d["under_represented"] else ""
        items.append(f"<li>{html.escape(attr)}: {len(d['groups'])} groups over {d['rows']} "
                     "training rows; group vs label "
                     f"{assoc}{flagged}</li>")
    return f"<h3>Training data by group</h3><ul>{''.join(items)}</ul>"


def _probes(audit: dict) -> str:
    out = []
    cf = audit.get("counterfactual", {})
    if cf.get("flip_rate") is not None:
        out.append(f"<li>counterfactual probe: the prediction changed in {cf['flip_rate']:.1%} of {cf['swaps']} "
                   f"identity-term swaps</li>")
    t = audit.get("threshold_optimizer")
    if t and "skipped" in t:
        out.append(f"<li>threshold post-processing not run: {html.escape(t['skipped'])}</li>")
    elif t:
        b, a = t["before"], t["after"]
        change = ", ".join(f"{name.replace('_', ' ')} {_f4(b.get(name))} -> {_f4(a.get(name))}"
                           for name in ("demographic_parity_difference", "equalized_odds_difference", "accuracy"))
        note = f" ({html.escape(t['note'])})" if t.get("note") else ""
        out.append(f"<li>threshold post-processing ({html.escape(str(t['constraint']))}, by "
                   f"{html.escape(t['attribute'])}): {change}{note}</li>")
    s = audit.get("stereotype")
    if s:
        out.append(f"<li>stereotype probe (CrowS-Pairs, {s['finetuned']['pairs']} pairs; 0.5 = no preference): base "
                   f"model {s['baseline']['stereotype_preference']:.3f}, fine-tuned "
                   f"{s['finetuned']['stereotype_preference']:.3f}</li>")
    return f"<h3>Probes and mitigation</h3><ul>{''.join(out)}</ul>" if out else ""
