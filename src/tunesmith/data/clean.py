"""Cleaning: every step configurable, every removal and change logged per row with its reason.

`Curation` holds the log of one data stage: rows removed (with the original row, file, line and
reason), rows changed (which steps touched them), suspected label errors, duplicate clusters
whose labels disagree, and row counts before and after each step.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from tqdm.auto import tqdm

from tunesmith.config import CleanConfig
from tunesmith.data import dedup, pii
from tunesmith.data.decontaminate import contaminated
from tunesmith.data.examples import Example
from tunesmith.data.normalize import normalize_text

# Conflicting and kept duplicate pairs listed in report.json (all are counted).
MAX_LISTED = 1000


@dataclass
class Curation:
    """What cleaning did, row by row."""

    cfg: CleanConfig
    task_type: str = "classification"
    progress: bool = False
    removed: list[dict] = field(default_factory=list)
    changes: list[dict] = field(default_factory=list)
    suspects: list[dict] = field(default_factory=list)
    conflicts: list[dict] = field(default_factory=list)
    kept_duplicates: list[dict] = field(default_factory=list)   # found with action: report
    steps: list[dict] = field(default_factory=list)
    pii_counts: Counter = field(default_factory=Counter)
    _vectors: dict = field(default_factory=dict, repr=False)

    # -- one file's rows -------------------------------------------------------------------------
    def clean_rows(self, role: str, rows: list[Example]) -> list[Example]:
        """Normalise, filter by length, deduplicate (exact, near, semantic) and treat PII in one file."""
        if not self.cfg.enabled:
            return rows
        rows = self._step(role, "normalize", rows, self._normalize)
        # Test rows are validated, not filtered: only a defect (nothing left to ask or answer) removes one.
        rows = self._step(role, "length", rows, self._empty if role == "test" else self._length)
        if self.cfg.exact_dedup:
            rows = self._step(role, "exact_dedup", rows, lambda r: self._dedup(r, dedup.exact_duplicates(
                [self._text(e) for e in r])))
        # Near and semantic duplicates are looked for among training rows only: removing rows from
        # a given test file would change the benchmark that runs are compared on.
        if self.cfg.near_dedup.enabled and role == "train" and len(rows) > 1:
            near = self.cfg.near_dedup
            rows = self._step(role, "near_dedup", rows, lambda r: self._dedup(r, dedup.near_duplicates(
                [self._text(e) for e in r], near.threshold, near.num_perm, near.ngram), near.action))
        sem = self.cfg.semantic_dedup
        if sem.enabled and role == "train" and len(rows) > 1:
            rows = self._step(role, "semantic_dedup", rows, lambda r: self._dedup(r, dedup.semantic_duplicates(
                self.vectors([self._text(e) for e in r]), sem.threshold), sem.action))
        if self.cfg.pii.enabled:
            rows = self._step(role, "pii", rows, self._pii)
        return rows

    # -- across splits ---------------------------------------------------------------------------
    def decontaminate(self, train: list[Example], held_out: list[Example], role: str = "train") -> list[Example]:
        """Drop rows of `role` (training rows, or validation rows against test) that overlap held-out rows."""
        if not (self.cfg.enabled and self.cfg.decontaminate.enabled and held_out):
            return train
        d = self.cfg.decontaminate

        def run(rows: list[Example]) -> list[Example]:
            found = contaminated([_asked(e) for e in rows], [_asked(e) for e in held_out], d.ngram, d.min_overlap)
            for c in found:
                self._remove(rows[c.index], "test_overlap", overlap=c.overlap, overlaps=_where(held_out[c.held_out]))
            drop = {c.index for c in found}
            return [e for i, e in enumerate(rows) if i not in drop]
        return self._step(role, "decontaminate", train, run)

    def separate_groups(self, rows: list[Example], held_out: list[Example], role: str = "train") -> list[Example]:
        """Drop rows of `role` whose data.group_field value also appears in held-out rows: carved splits keep
        groups apart by construction, given files (a test file of the same users) do not. Runs whatever
        data.clean says, as the split's promise does."""
        seen: dict[str, Example] = {}
        for e in held_out:
            if e.group is not None:
                seen.setdefault(e.group, e)
        if not seen:
            return rows

        def run(rows: list[Example]) -> list[Example]:
            for e in rows:
                if e.group in seen:
                    self._remove(e, "group_in_held_out", group=e.group, overlaps=_where(seen[e.group]))
            return [e for e in rows if e.group not in seen]
        return self._step(role, "separate_groups", rows, run)

    def label_noise(self, train: list[Example]) -> list[Example]:
        """List suspected label errors in the training split (and drop them if configured)."""
        cfg = self.cfg.label_noise
        if not (self.cfg.enabled and cfg.enabled and self.task_type == "classification" and len(train) >= 10):
            return train
        from tunesmith.data.label_noise import find_suspects

        def run(rows: list[Example]) -> list[Example]:
            found = find_suspects(self.vectors([e.input for e in rows]), [e.target for e in rows], cfg.folds)
            for rank, s in enumerate(found, start=1):
                self.suspects.append({**rows[s.index].raw(), "reason": "label_noise", "rank": rank,
                                      "given_label": s.given, "suggested_label": s.suggested, "score": s.score,
                                      **_where(rows[s.index])})
                if cfg.action == "remove":
                    self._remove(rows[s.index], "label_noise", suggested_label=s.suggested, score=s.score)
                elif cfg.action == "relabel":
                    self._changed(rows[s.index], ["relabel"], old_label=s.given, new_label=s.suggested, score=s.score)
            if cfg.action == "relabel":
                fixed = {s.index: s.suggested for s in found}
                return [replace(e, target=fixed[i]) if i in fixed else e for i, e in enumerate(rows)]
            drop = {s.index for s in found} if cfg.action == "remove" else set()
            return [e for i, e in enumerate(rows) if i not in drop]
        return self._step("train", "label_noise", train, run)

    def vectors(self, texts: list[str]):
        """Embeddings of `texts`, each text embedded once per data stage."""
        import numpy as np

        from tunesmith.data.embed import embed

        todo = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if todo:
            self._vectors.update(zip(todo, embed(todo, progress=self.progress)))
        return np.stack([self._vectors[t] for t in texts])

    def cached_vectors(self, texts: list[str]):
        """Embeddings of `texts` if every one was already embedded (no model load), else None."""
        import numpy as np

        if not texts or any(t not in self._vectors for t in texts):
            return None
        return np.stack([self._vectors[t] for t in texts])

    def report(self) -> dict:
        removed = Counter(r["reason"] for r in self.removed)
        removed_test = Counter(r["reason"] for r in self.removed if r.get("removed_from_split") == "test")
        changed = Counter(c for row in self.changes for c in row["changes"])
        return {"steps": self.steps, "removed_by_reason": dict(sorted(removed.items())),
                "test_rows_removed": sum(removed_test.values()),
                "test_rows_removed_by_reason": dict(sorted(removed_test.items())),
                "changes_by_kind": dict(sorted(changed.items())), "pii_found": dict(sorted(self.pii_counts.items())),
                "pii_not_checked": self._not_checked(),
                "suspected_label_errors": len(self.suspects), "conflicting_duplicates_total": len(self.conflicts),
                "conflicting_duplicates": self.conflicts[:MAX_LISTED],
                "kept_duplicates_by_kind": dict(sorted(Counter(d["kind"] for d in self.kept_duplicates).items())),
                "kept_duplicates": self.kept_duplicates[:MAX_LISTED]}

    def _not_checked(self) -> list[str]:
        pii = self.cfg.pii
        kinds = [k for k in ("email", "phone", "card", "iban", "ip") if not pii.enabled or k not in pii.types]
        if not pii.enabled or "person" not in pii.types:
            kinds.append("person names (opt-in: data.clean.pii.types: [..., person])")
        return kinds

    # -- steps -----------------------------------------------------------------------------------
    def _step(self, role: str, name: str, rows: list[Example], fn) -> list[Example]:
        changes_before, removed_before = len(self.changes), len(self.removed)
        out = fn(rows)
        for row in self.removed[removed_before:]:
            row["removed_from_split"] = role
        self.steps.append({"split": role, "step": name, "rows_in": len(rows), "rows_out": len(out),
                           "rows_changed": len(self.changes) - changes_before})
        return out

    def _normalize(self, rows: list[Example]) -> list[Example]:
        out = []
        for e in tqdm(rows, desc="normalize", unit="row", disable=not self.progress or len(rows) < 10_000):
            kinds: set[str] = set()

            def fix(text: str) -> str:
                new, made = normalize_text(text, self.cfg.normalize, self.task_type)
                kinds.update(made)
                return new
            # Inputs only: a generation or chat answer (markup, code, layout) is kept byte for byte.
            cleaned = _map_text(e, fix, self.task_type, targets=False)
            if kinds:
                self._changed(e, sorted(kinds))
            out.append(cleaned)
        return out

    def _empty(self, rows: list[Example]) -> list[Example]:
        """Rows with an input and a target left; the others are logged as empty_after_cleaning."""
        out = []
        for e in rows:
            if not e.input.strip() or (self.task_type != "text" and not e.target.strip()):  # text: no target
                self._remove(e, "empty_after_cleaning")
            else:
                out.append(e)
        return out

    def _length(self, rows: list[Example]) -> list[Example]:
        out = []
        for e in self._empty(rows):
            n = len(e.input)
            if n < self.cfg.min_chars:
                self._remove(e, "too_short", chars=n, min_chars=self.cfg.min_chars)
            elif self.cfg.max_chars is not None and n > self.cfg.max_chars:
                self._remove(e, "too_long", chars=n, max_chars=self.cfg.max_chars)
            else:
                out.append(e)
        return out

    def _dedup(self, rows: list[Example], found: list[dedup.Duplicate], action: str = "remove") -> list[Example]:
        drop = set()
        for d in found:
            row, kept = rows[d.index], rows[d.of]
            pair = {"kind": d.kind, "similarity": d.similarity, "rows": [_labelled(kept), _labelled(row)]}
            same = row.target == kept.target and row.desirable == kept.desirable  # KTO: the label too
            if not same and d.kind != "exact_duplicate":
                # Similar texts with different labels are often deliberate contrasts: keep both, report.
                self.conflicts.append(pair)
                continue
            if action == "report":
                self.kept_duplicates.append(pair)
                continue
            reason = d.kind if same else "exact_duplicate_conflicting_label"
            self._remove(row, reason, duplicate_of=_where(kept), similarity=d.similarity)
            drop.add(d.index)
            if reason == "exact_duplicate_conflicting_label":
                self.conflicts.append({**pair, "similarity": 1.0})
        return [e for i, e in enumerate(rows) if i not in drop]

    def _pii(self, rows: list[Example]) -> list[Example]:
        kinds, action = tuple(self.cfg.pii.types), self.cfg.pii.action
        out = []
        for e in tqdm(rows, desc="pii", unit="row", disable=not self.progress or len(rows) < 10_000):
            found: Counter = Counter()

            def scrub(text: str) -> str:
                hits = pii.find_pii(text, kinds)
                found.update(pii.count_kinds(hits))
                return pii.redact(text, hits) if action == "redact" and hits else text
            cleaned = _map_text(e, scrub, self.task_type)
            self.pii_counts.update(found)
            if found and action == "drop":
                self._remove(e, "pii", pii=dict(found))
                continue
            if found:
                self._changed(e, [f"pii:{k}" for k in sorted(found)], redacted=action == "redact")
            out.append(cleaned)
        return out

    def _text(self, e: Example) -> str:
        """What deduplication compares: the input (a conversation's every turn), plus the answer for
        generation and chat data."""
        return _asked(e) if self.task_type == "classification" else f"{_asked(e)}\n{e.target}" + (
            f"\n{e.rejected}" if e.rejected is not None else "")  # distinct pairs of one prompt and answer

    def _remove(self, e: Example, reason: str, **detail) -> None:
        self.removed.append({**e.raw(), "reason": reason, **_where(e), **detail})

    def _changed(self, e: Example, kinds: list[str], **detail) -> None:
        self.changes.append({**_where(e), "changes": kinds, **detail})


def _asked(e: Example) -> str:
    """What a row asks: its input, or for a conversation every turn before the answer (system prompt and
    earlier turns included: two chats ending in the same "Thanks!" are not one row)."""
    if e.messages is None:
        return e.input
    # Contents only: role names on every row would be shared words that push short rows over the
    # near-duplicate threshold.
    return "\n".join(m["content"] for m in e.messages)


def _labelled(e: Example) -> dict:
    """Where a row is and its label (the answer; a KTO row's desirability too), as a conflict lists it."""
    return _where(e) | {"label": e.target} | ({"desirable": e.desirable} if e.desirable is not None else {})


def _where(e: Example) -> dict:
    return {"file": e.file, "line": e.line}


def _map_text(e: Example, fn, task_type: str, targets: bool = True) -> Example:
    """A copy of `e` with `fn` applied to every text it holds: its input and chat turns, and with `targets`
    the answer and earlier assistant turns of generation and chat data (never a classification label,
    which is an identifier that task.labels and the other files must match exactly)."""
    def apply(m: dict) -> dict:
        return {**m, "content": fn(m["content"])} if targets or m["role"] != "assistant" else m
    messages = None if e.messages is None else [apply(m) for m in e.messages]
    target = fn(e.target) if targets and task_type != "classification" else e.target
    return replace(e, input=fn(e.input), target=target, messages=messages)
