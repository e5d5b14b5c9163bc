"""A challenger's data: the champion's training split plus labelled traffic from the request log.

Labelled requests (serve/store.py `labelled`) with a truth, an input stored whole and a text prompt
(a token-id prompt's stored input already holds the prompt format, so it cannot become a plain row) are
usable. Of the usable rows whose verdict gives the truth (a `label` or a `correction`), the newest
`retrain.holdout` share (at least `retrain.min_holdout` rows, counted again after the test-file
cleaning) becomes `traffic_test`, a second test set. Rows rated right (rating 1: the truth is the
model's own answer) are never held out: they are all answers the champion got right while its wrong
answers rated 0 carry no truth, so a test set holding them would favour the champion. They may train,
with the rest of the traffic, the champion's curated training rows and any `--data` rows. Training
rows go through the data stage's cleaning (normalise, length, exact/near/semantic duplicates, PII, as
the champion's `data.clean` says) and are then removed when they overlap the champion's test split or
traffic_test: word n-gram overlap (data/decontaminate.py) or a near duplicate by character shingles
(data/dedup.py). That decontamination always runs, whatever `data.clean` says: a challenger that saw
its test rows would win its comparison unfairly.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunesmith import fsio
from tunesmith.config import CleanConfig, Project
from tunesmith.config.settings import label_form
from tunesmith.data.clean import Curation
from tunesmith.data.decontaminate import contaminated
from tunesmith.data.dedup import near_duplicates
from tunesmith.data.examples import MISSING_GROUP, Example, load_examples, raise_for_problems
from tunesmith.data.prepare import read_split
from tunesmith.data.split import group_split, stratified_split
from tunesmith.errors import InputError
from tunesmith.registry import METHOD_SPECS
from tunesmith.serve import store

TRAFFIC_SOURCE = "request-log:"  # Example.source prefix of a traffic row


@dataclass
class Counts:
    """What assembling the data did, in rows."""

    labelled: int = 0            # requests with a verdict in the log
    feedback: dict = field(default_factory=dict)  # verdicts by kind: label, correction, rated_right, rated_wrong
    no_truth: int = 0            # rated wrong without a label or correction: no truth to learn
    incomplete: int = 0          # input cut in the log (STORED_CHARS): not the text the model saw
    token_prompts: int = 0       # token-id completion prompts: their stored input has the prompt format in it
    usable: int = 0
    rating_only: int = 0         # usable rows rated right (truth = the model's answer): may train, never held out
    held_out: int = 0            # traffic_test rows (after the test-file cleaning)
    held_out_removed: int = 0    # rows held out, then removed by that cleaning (duplicates, length, PII drop)
    traffic_for_training: int = 0   # traffic rows offered to training
    extra_rows: int = 0          # --data rows offered
    champion_rows: int = 0       # the champion's curated training rows (augmented copies left out)
    duplicates_removed: int = 0
    other_removed: int = 0       # cleaning removals other than duplicates (length, PII drop, empty)
    test_overlap_removed: int = 0
    test_overlap_removed_traffic: int = 0
    traffic_used: int = 0        # traffic rows in training, each repeated traffic_weight times
    extra_used: int = 0
    champion_used: int = 0
    traffic_weight: int = 1
    train_rows: int = 0          # rows written, repeats included
    validation_carved: int = 0   # rows carved for validation before repeating traffic (0: the data stage carves)
    new_labels: list[str] = field(default_factory=list)  # labels the champion was not trained on

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Assembly:
    """The challenger's training rows (traffic rows repeated traffic_weight times), the traffic test set,
    the counts, and the validation rows when they had to be carved here (see `_carve_validation`)."""

    train: list[Example]
    traffic_test: list[Example]
    counts: Counts
    validation: list[Example] | None = None


def check_supported(project: Project) -> None:
    """Refuse the runs whose training rows the request log cannot give back faithfully."""
    task = project.task
    if task.type == "chat":
        raise InputError("retrain does not support task.type chat: the request log keeps only the last user "
                         "turn of a conversation, not its system prompt and earlier turns, so logged chats cannot "
                         "be turned back into training rows", "task.type",
                         "retrain on new data with `tunesmith run`, adding the labelled conversations to data.train")
    if task.type == "text":
        raise InputError("retrain does not support task.type text (raw documents have no answer to label)",
                         "task.type", "add new documents to data.train and use `tunesmith run`")
    if METHOD_SPECS[project.train.method].preference:
        raise InputError(f"retrain does not support train.method {project.train.method}: preference rows need a "
                         "chosen and a rejected answer, and a verdict gives one truth", "train.method",
                         "retrain a supervised run (lora, full, ...) of the same task")


def assemble(project: Project, champion: Path, db: Path, extra: Path | None = None) -> Assembly:
    """The challenger's rows from the champion run, the request log `db` and optional `extra` rows.

    Raises:
        InputError: too few labelled requests or held-out rows (the counts named), a log that is not a
            request log, or a bad --data file (DataError).
    """
    counts = Counts(traffic_weight=project.retrain.traffic_weight)
    traffic = _usable(store.labelled(db), counts)
    verified = [i for i, r in enumerate(traffic) if r.verified]  # rated-right rows are never held out
    hold = _holdout_size(len(traffic), len(verified), project, counts, db)
    held_at = set(verified[len(verified) - hold:])  # the newest verified rows
    curation = Curation(project.data.clean, project.task.type)
    test = curation.clean_rows("test", [_example(r, db, i, project) for i, r in enumerate(traffic) if i in held_at])
    counts.held_out, counts.held_out_removed = len(test), len(curation.removed)
    _check_held_out(counts, project, db)
    extras = _extra_rows(extra, project)
    own = [e for e in _curated(champion / "data" / "train.jsonl") if e.augmented is None]
    fresh = [_example(r, db, i, project) for i, r in enumerate(traffic) if i not in held_at]
    offered = extras + fresh[::-1] + own
    counts.traffic_for_training, counts.extra_rows, counts.champion_rows = len(fresh), len(extras), len(own)
    before = len(curation.removed)
    train = curation.clean_rows("train", offered)
    removed = Counter(r["reason"] for r in curation.removed[before:])
    counts.duplicates_removed = sum(n for reason, n in removed.items() if "duplicate" in reason)
    counts.other_removed = sum(removed.values()) - counts.duplicates_removed
    train = _decontaminate(train, _curated(champion / "data" / "test.jsonl") + test, project.data.clean, counts)
    if project.task.type == "classification":
        known = set(champion_labels(champion, project))
        counts.new_labels = sorted({e.target for e in train + test} - known)
    train, validation = _carve_validation(train, project)
    counts.validation_carved = len(validation or [])
    _count_used(train, extra, counts)
    weight = project.retrain.traffic_weight
    rows = [e for e in train for _ in range(weight if is_traffic(e) else 1)]
    counts.train_rows = len(rows)
    return Assembly(rows, test, counts, validation)


def _carve_validation(train: list[Example], project: Project) -> tuple[list[Example], list[Example] | None]:
    """With traffic rows repeated and data.validation a fraction, the validation rows are carved here, as
    the data stage would carve them (same split code and seed), before the repeats: carved after, a
    row's copies would straddle training and validation, and decontamination would drop the training
    ones. Otherwise the data stage carves them itself (None)."""
    fraction = project.data.validation
    if project.retrain.traffic_weight == 1 or not isinstance(fraction, float):
        return train, None
    keys = [e.target if project.task.type == "classification" else "" for e in train]
    seed = project.data.seed + 1  # the data stage's validation seed (data/prepare.py)
    if project.data.group_field:
        return group_split(train, [e.group or e.source for e in train], keys, fraction, seed)
    return stratified_split(train, keys, fraction, seed)


def is_traffic(e: Example) -> bool:
    return e.source.startswith(TRAFFIC_SOURCE)


def _usable(rows: list[store.LabelledRequest], counts: Counts) -> list[store.LabelledRequest]:
    """Requests with a truth, a whole input and a text prompt, oldest first; the others counted by why
    they are left out, and the usable ones that are rated right only (never held out) counted too."""
    counts.labelled = len(rows)
    counts.feedback = dict(Counter(_kind(r) for r in rows))
    out = []
    for r in rows:
        if r.truth is None or not r.truth.strip():
            counts.no_truth += 1
        elif not r.complete:
            counts.incomplete += 1
        elif r.prompt_kind == "tokens":  # the ids decoded: the prompt format would be applied a second time
            counts.token_prompts += 1
        else:
            out.append(r)
    counts.usable = len(out)
    counts.rating_only = sum(not r.verified for r in out)
    return out


def _kind(r: store.LabelledRequest) -> str:
    if r.label is not None:
        return "label"
    if r.correction is not None:
        return "correction"
    return "rated_right" if r.rating == 1 else "rated_wrong"


def _holdout_size(n: int, verified: int, project: Project, counts: Counts, db: Path) -> int:
    """Rows to hold out: the holdout share of the `verified` rows (a label or a correction), at least
    min_holdout, all of them verified, and at least one of the `n` usable rows left to train on."""
    cfg = project.retrain
    hold = max(cfg.min_holdout, math.ceil(cfg.holdout * verified))
    if n < cfg.min_labelled or hold > verified or hold >= n:
        raise InputError(
            f"too few labelled requests to retrain on: {n} usable of {counts.labelled} with feedback "
            f"({_left_out(counts)}), {verified} of them with a label or correction ({counts.rating_only} only rated "
            f"right, never held out); retrain needs at least "
            f"{cfg.min_labelled} (retrain.min_labelled), and {hold} with a label or correction to hold out for "
            f"testing (retrain.holdout {cfg.holdout:g}, retrain.min_holdout {cfg.min_holdout}) with one or more "
            "left to train on", str(db),
            "collect more feedback (POST /v1/feedback, `tunesmith feedback import`) or lower those settings")
    return hold


def _check_held_out(counts: Counts, project: Project, db: Path) -> None:
    """The held-out rows left after the test-file cleaning (duplicates, length, PII) still reach min_holdout."""
    need = project.retrain.min_holdout
    if counts.held_out < need:
        raise InputError(
            f"too few held-out traffic rows after cleaning: {counts.held_out} of the newest labelled requests "
            f"kept as traffic_test, retrain.min_holdout is {need} ({counts.usable} usable of {counts.labelled} "
            f"with feedback: {_left_out(counts)}; {counts.rating_only} only rated right, never held out)", str(db),
            "collect more labelled feedback, or lower retrain.min_holdout")


def _left_out(c: Counts) -> str:
    """Why labelled requests are not usable, counted."""
    return (f"{c.no_truth} rated wrong without a label, {c.incomplete} with an input cut in the log, "
            f"{c.token_prompts} token-id prompts")


def _example(r: store.LabelledRequest, db: Path, i: int, project: Project) -> Example:
    """A labelled request as a training example: the stored input, the truth as the target."""
    target = label_form(r.truth.strip()) if project.task.type == "classification" else r.truth
    group = f"{TRAFFIC_SOURCE}{r.request_id}" if project.data.group_field else None
    return Example(r.input, target, f"{TRAFFIC_SOURCE}{r.request_id}", group=group, file=str(db), line=i + 1)


def _extra_rows(path: Path | None, project: Project) -> list[Example]:
    """--data rows, validated like a data file (a bad row: DataError naming file:line)."""
    if path is None:
        return []
    if not Path(path).is_file():
        raise InputError(f"file not found: {path}", "--data", "give labelled rows in the task's data format")
    rows, problems = load_examples(Path(path), project.task, project.data.max_errors, project.data.group_field,
                                   project.fairness.group_fields)
    raise_for_problems(problems, project.data.max_errors)
    return rows


def _curated(path: Path) -> list[Example]:
    """A run's curated split, each row pointing back at its line."""
    out = read_split(path.parent, path.stem)
    for i, e in enumerate(out):
        e.file, e.line = str(path), i + 1
    return out


def champion_labels(champion: Path, project: Project) -> list[str]:
    """The label set the champion was trained with."""
    report = champion / "data" / "report.json"
    labels = fsio.read_json(report).get("labels") if report.is_file() else None
    return list(labels or project.task.labels or [])


def _decontaminate(train: list[Example], held: list[Example], cfg: CleanConfig, counts: Counts) -> list[Example]:
    found = overlapping([e.input for e in train], [e.input for e in held], cfg)
    counts.test_overlap_removed = len(found)
    counts.test_overlap_removed_traffic = sum(is_traffic(train[i]) for i in found)
    return [e for i, e in enumerate(train) if i not in found]


def overlapping(train: list[str], held: list[str], cfg: CleanConfig) -> dict[int, float]:
    """{training row: similarity} for rows overlapping a held-out text: by word n-grams as the data stage
    decontaminates (exact copies included: a text shorter than n words is one n-gram), or as a near
    duplicate at the near-dedup threshold. Runs with the champion's settings even where they are disabled."""
    d = cfg.decontaminate
    found = {c.index: c.overlap for c in contaminated(train, held, d.ngram, d.min_overlap)}
    for i, sim in _near_held_out(train, held, cfg.near_dedup.threshold).items():
        found.setdefault(i, sim)
    return found


def _near_held_out(train: list[str], held: list[str], threshold: float) -> dict[int, float]:
    """Training rows that near-duplicate a held-out text. Held-out texts come first, so a training row
    is matched to one of them; a held-out text that near-duplicates an earlier one is hidden behind it
    in a pass, so such texts get further passes of their own."""
    hits: dict[int, float] = {}
    pending, rest = list(range(len(held))), list(range(len(train)))
    while pending and rest:
        h = len(pending)
        found = near_duplicates([held[j] for j in pending] + [train[i] for i in rest], threshold)
        shadowed = [pending[d.index] for d in found if d.index < h]
        for d in found:
            if d.index >= h and d.of < h:
                hits[rest[d.index - h]] = d.similarity
        rest = [i for i in rest if i not in hits]
        pending = shadowed
    return hits


def _count_used(train: list[Example], extra: Path | None, counts: Counts) -> None:
    counts.traffic_used = sum(is_traffic(e) for e in train)
    counts.extra_used = sum(extra is not None and e.file == str(Path(extra)) for e in train)
    counts.champion_used = len(train) - counts.traffic_used - counts.extra_used


def task_row(e: Example, project: Project) -> dict:
    """An example as a row of the task's data format (what data.train reads back into the same example)."""
    task = project.task
    if task.type == "classification":
        row = {task.text_field: e.input, task.label_field: e.target}
    elif e.messages is not None:  # a conversation in a generation run's data: kept whole
        row = {"messages": [*e.messages, {"role": "assistant", "content": e.target}]}
    else:
        row = {task.prompt_field: e.input, task.completion_field: e.target}
    if project.data.group_field:
        row[project.data.group_field] = e.group or e.source
    for name, value in (e.attributes or {}).items():
        if value != MISSING_GROUP:
            row.setdefault(name, value)
    return row


def write_rows(path: Path, rows: list[Example], project: Project) -> None:
    fsio.write_jsonl(path, [task_row(e, project) for e in rows])
