"""examples/qa: its rows are the XQuAD questions they claim to be, and no paragraph is in two splits."""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.config import load_config
from tunesmith.data.prepare import prepare_data

QA = Path(__file__).resolve().parents[1] / "examples" / "qa"


def test_splits_never_share_a_context():
    project = load_config(QA / "project.yaml")
    assert project.data.group_field == "context_id"
    splits = prepare_data(project)
    # The split keeps paragraphs apart itself: decontamination (which would drop training rows sharing
    # a held-out paragraph) finds nothing to remove.
    assert "test_overlap" not in splits.curation.report()["removed_by_reason"]
    contexts = {name: {e.record["context_id"] for e in rows} for name, rows in splits.by_name().items()}
    assert all(contexts.values())
    assert not contexts["train"] & contexts["test"]
    assert not contexts["train"] & contexts["validation"]
    assert not contexts["validation"] & contexts["test"]
    # The paragraph text itself (not only its id) appears in one split only.
    text = {name: {e.input.split("\n\nQuestion:")[0] for e in rows} for name, rows in splits.by_name().items()}
    assert not text["train"] & text["test"] and not text["validation"] & text["test"]


def test_rows_are_extractive_answers_with_their_paragraph_id():
    rows = [json.loads(line) for line in (QA / "data" / "qa.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 367 and len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["completion"] in r["prompt"].split("\n\nQuestion:")[0]   # a span of its context
        assert r["context_id"].startswith(r["article"] + "#")
