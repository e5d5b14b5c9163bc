"""Label corrections: reviewed decisions about training rows (`data.corrections: FILE`), applied by the
data stage of the next run.

The file is JSONL, one decision a line, written by `tunesmith ui`'s Review labels page (or by hand):

    {"text": "...", "given_label": "alpha", "action": "relabel", "label": "beta", "source": "train.jsonl:4"}

A decision names its row by the row's text exactly as the data file holds it (before any cleaning) and
the label it was given; `source` (file:line) is for people only, since line numbers move when a file is
edited. `action` is `keep` (the label is right: never dropped or relabelled as a label-noise suspect),
`relabel` (to `label`) or `drop`.

Where it applies: to the training and validation rows, after the splits are made and before
decontamination and label-noise detection. After the split, so no row moves between splits and the
test set holds the same rows with or without corrections (runs compare on one benchmark). Validation
rows are corrected like training rows (a wrong label there misleads evaluation during training), so
validation differs by exactly the rows a decision relabels or drops, each logged in changes.jsonl
(drops in removed.jsonl too) with reason "correction". Before label-noise detection, so it learns
from the corrected labels; a row a reviewer decided (kept or relabelled) is never relabelled or
removed again by label-noise detection in the same run. Test rows are never changed: a decision that
names only a test row is reported, as is one that names no row at all.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from tunesmith.config.schema import label_problem
from tunesmith.config.settings import label_form
from tunesmith.data.clean import Curation
from tunesmith.data.examples import Example
from tunesmith.data.io import loads_unique
from tunesmith.errors import DataError

ACTIONS = ("keep", "relabel", "drop")
FIELDS = ("text", "given_label", "action", "label", "source", "suggested_label", "score")
MAX_BYTES = 64 << 20           # a corrections file larger than this is not a review's output
MAX_DECISIONS = 100_000
REASON = "correction"


@dataclass(frozen=True)
class Decision:
    """One reviewed row: its text and given label (the key), what to do, the new label for relabel."""

    text: str
    given_label: str
    action: str
    label: str | None = None
    source: str | None = None
    line: int = field(default=0, compare=False)     # where it stands in its file, for error messages

    @property
    def key(self) -> tuple[str, str]:
        return (self.text, self.given_label)

    def to_json(self) -> dict:
        row = {"text": self.text, "given_label": self.given_label, "action": self.action}
        if self.label is not None:
            row["label"] = self.label
        if self.source is not None:
            row["source"] = self.source
        return row


def parse_decision(obj: object) -> Decision:
    """One decision from a parsed JSON value; ValueError saying what is wrong with it."""
    if not isinstance(obj, dict):
        raise ValueError(f"a decision must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(k for k in obj if k not in FIELDS)
    if unknown:
        raise ValueError(f"unknown key '{unknown[0]}' (allowed: {', '.join(FIELDS)})")
    text, given, action = obj.get("text"), obj.get("given_label"), obj.get("action")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("'text' must be the row's non-empty text")
    if not isinstance(given, str) or not given.strip():
        raise ValueError("'given_label' must be the row's label")
    if action not in ACTIONS:
        raise ValueError(f"'action' must be one of {', '.join(ACTIONS)}, got {json.dumps(action)[:40]}")
    label = obj.get("label")
    if action == "relabel":
        if not isinstance(label, str) or not label.strip():
            raise ValueError("relabel needs 'label', the new label")
        if label.strip() == given.strip():
            raise ValueError(f"relabel to the given label '{given}': use action keep")
    elif label is not None:
        raise ValueError(f"'label' is for relabel only, not {action}")
    for key, value in (("given_label", given), ("label", label)):
        problem = label_problem(value.strip()) if isinstance(value, str) else None
        if problem:  # as in a data row or task.labels: it would split prompts, reports and warnings
            raise ValueError(f"'{key}' {problem}")
    source = obj.get("source")
    if source is not None and not isinstance(source, str):
        raise ValueError("'source' must be a string (file:line)")
    return Decision(text, label_form(given.strip()), action, label_form(label.strip()) if label else None, source)


def read_corrections(path: Path) -> list[Decision]:
    """Every decision of a corrections file, validated.

    Raises:
        DataError: naming file:line for an unreadable file, a bad line, or a row decided twice.
    """
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise DataError(f"corrections file is larger than {MAX_BYTES >> 20} MiB", str(path),
                            hint="split the review into smaller files")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("corrections file not found", str(path), hint="check data.corrections") from None
    except UnicodeDecodeError as e:
        raise DataError(f"corrections file is not UTF-8 text ({e.reason})", str(path)) from None
    except OSError as e:
        raise DataError(f"cannot read the corrections file ({e.strerror})", str(path)) from None
    out: list[Decision] = []
    seen: dict[tuple[str, str], int] = {}
    for lineno, raw in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 may be in a text
        if not raw.strip():
            continue
        try:
            d = parse_decision(loads_unique(raw))
        except (ValueError, RecursionError) as e:   # JSONDecodeError is a ValueError
            raise DataError(f"invalid decision: {e}", str(path), lineno,
                            "one JSON object a line: {text, given_label, action: keep|relabel|drop, label}") from None
        if d.key in seen:
            raise DataError(f"this row was already decided at line {seen[d.key]}", str(path), lineno,
                            "keep one decision per row (text and given label)")
        if len(out) >= MAX_DECISIONS:
            raise DataError(f"more than {MAX_DECISIONS} decisions", str(path), lineno)
        seen[d.key] = lineno
        out.append(Decision(d.text, d.given_label, d.action, d.label, d.source, lineno))
    return out


def merge(decisions: list[Decision], new: list[Decision]) -> list[Decision]:
    """`decisions` with each of `new` added, or replacing the decision for the same row in place."""
    order = {d.key: d for d in decisions}
    for d in new:
        order[d.key] = d
    return list(order.values())


def original_text(e: Example, text_field: str) -> str:
    """The row's text exactly as its file holds it (cleaning may have normalised `e.input` since)."""
    rec = e.record
    value = rec.get(text_field) if isinstance(rec, dict) else None
    return value if isinstance(value, str) else e.input


@dataclass
class Corrections:
    """A corrections file's decisions and what applying them did (for data/report.json)."""

    path: Path
    decisions: list[Decision]
    text_field: str = "text"
    sha256: str = ""
    applied: Counter = field(default_factory=Counter)       # action -> rows changed (keep: rows protected)
    matched: set = field(default_factory=set)               # keys that met a training or validation row
    # Rows a decision kept or relabelled, by id() of the row apply() returned (the row is held here too,
    # so its id stays its own): label-noise detection must not undo a reviewer's decision.
    reviewed: dict = field(default_factory=dict)
    in_test: set = field(default_factory=set)               # keys that met only test rows

    @classmethod
    def load(cls, path: Path, text_field: str, labels: list[str] | None = None) -> Corrections:
        """Read and validate `path`; a relabel to a label outside task.labels is an error at its line."""
        decisions = read_corrections(path)
        for d in decisions:
            if labels is not None and d.action == "relabel" and d.label not in labels:
                raise DataError(f"relabel to '{d.label}', which is not in task.labels", str(path), d.line,
                                f"use one of: {', '.join(labels)}")
        return cls(Path(path), decisions, text_field, hashlib.sha256(Path(path).read_bytes()).hexdigest())

    def _by_key(self) -> dict[tuple[str, str], Decision]:
        return {d.key: d for d in self.decisions}

    def key(self, e: Example) -> tuple[str, str]:
        return (original_text(e, self.text_field), e.target)

    def apply(self, curation: Curation, role: str, rows: list[Example]) -> list[Example]:
        """Relabel and drop `role`'s rows (train or validation) as decided, each change logged in the
        curation's changes (and drops in removed) with reason "correction"."""
        if role == "test":
            raise ValueError("corrections never change test rows")
        by_key, out, changed = self._by_key(), [], 0
        for e in rows:
            d = by_key.get(self.key(e))
            if d is None:
                out.append(e)
                continue
            self.matched.add(d.key)
            where = {"file": e.file, "line": e.line}
            if d.action == "keep":
                self.applied["keep"] += 1
                out.append(e)
                self.reviewed[id(e)] = (e, d)
                continue
            self.applied[d.action] += 1
            changed += 1
            curation.changes.append({**where, "changes": [REASON], "reason": REASON, "action": d.action,
                                     "old_label": d.given_label, **({"new_label": d.label} if d.label else {}),
                                     "split": role, "corrections": f"{self.path}:{d.line}"})
            if d.action == "drop":
                curation.removed.append({**e.raw(), "reason": REASON, **where, "removed_from_split": role,
                                         "corrections": f"{self.path}:{d.line}"})
                continue
            out.append(replace(e, target=d.label))
            self.reviewed[id(out[-1])] = (out[-1], d)
        curation.steps.append({"split": role, "step": "corrections", "rows_in": len(rows), "rows_out": len(out),
                               "rows_changed": changed})
        return out

    def note_test(self, test: list[Example]) -> None:
        """Remember decisions that name test rows (never applied there)."""
        by_key = self._by_key()
        self.in_test |= {self.key(e) for e in test if self.key(e) in by_key}

    def honour_keeps(self, curation: Curation, before: list[Example], after: list[Example],
                     action: str) -> list[Example]:
        """Undo label-noise's removal or relabelling of every row a decision kept or relabelled (a
        reviewer's word stands over the detector's guess); mark their suspects as reviewed.

        `before`/`after` are the training rows given to and returned by Curation.label_noise."""
        protected = [e for e in before if id(e) in self.reviewed]
        places = {(e.file, e.line): self.reviewed[id(e)][1].action for e in protected}
        for s in curation.suspects:
            if (s.get("file"), s.get("line")) in places:
                s["reviewed"] = places[(s.get("file"), s.get("line"))]
        if not protected or action == "report" or before is after:
            return after
        ids = {id(e) for e in protected}
        changes_before = len(curation.changes)
        if action == "remove":
            left = {id(e) for e in after}
            out = [e for e in before if id(e) in left or id(e) in ids]
            curation.removed[:] = [r for r in curation.removed if not (
                r.get("reason") == "label_noise" and (r.get("file"), r.get("line")) in places)]
        else:  # relabel: label_noise keeps the rows in order, with suggested labels in place
            out = [b if id(b) in ids else a for b, a in zip(before, after)]
            curation.changes[:] = [c for c in curation.changes if not (
                c.get("changes") == ["relabel"] and (c.get("file"), c.get("line")) in places)]
        step = next((s for s in reversed(curation.steps) if s["step"] == "label_noise"), None)
        if step is not None:
            step["rows_out"] = len(out)
            step["rows_changed"] -= changes_before - len(curation.changes)
        return out

    def report(self) -> dict:
        """What data/report.json records under "corrections"."""
        missing = [d for d in self.decisions if d.key not in self.matched and d.key not in self.in_test]
        test_only = [d for d in self.decisions if d.key not in self.matched and d.key in self.in_test]
        return {"file": str(self.path), "sha256": self.sha256, "decisions": len(self.decisions),
                "rows_relabelled": self.applied["relabel"], "rows_dropped": self.applied["drop"],
                "rows_kept": self.applied["keep"], "not_found": len(missing),
                "not_found_lines": [d.line for d in missing[:100]],
                "test_rows_not_changed": len(test_only), "test_rows_lines": [d.line for d in test_only[:100]]}

    def warnings(self) -> list[str]:
        """Decisions that changed nothing, said as data-report warnings (never silently ignored)."""
        rep, out = self.report(), []
        if rep["not_found"]:
            out.append(f"data.corrections: {rep['not_found']} decisions match no training or validation row, "
                       f"not applied (first: {self.path}:{rep['not_found_lines'][0]})")
        if rep["test_rows_not_changed"]:
            out.append(f"data.corrections: {rep['test_rows_not_changed']} decisions name test rows, which "
                       f"corrections never change (first: {self.path}:{rep['test_rows_lines'][0]})")
        return out

