"""Cleaning never rewrites a generation or chat answer, and test rows are validated, not filtered:
a test row leaves only for a defect, and the count is shown on the CLI, in report.json and summary.json."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from conftest import make_texts, write_jsonl
from tunesmith.cli import app
from tunesmith.config import CleanConfig, NormalizeSettings
from tunesmith.data.clean import Curation
from tunesmith.data.examples import Example

IMG = '<img src="url" alt="alternatetext">'
CODE = "def f(x):\n    if x:\n        return  1\n\n\n\n    return 0"


def _rows(pairs: list[tuple[str, str]]) -> list[Example]:
    return [Example(i, t, f"f:{n}", file="f", line=n) for n, (i, t) in enumerate(pairs, start=1)]


def test_generation_targets_are_kept_byte_for_byte():
    cur = Curation(CleanConfig(), "generation")
    out = cur.clean_rows("test", _rows([("Write an image tag.", IMG), ("Show code &amp; <b>all</b>", CODE)]))
    assert [e.target for e in out] == [IMG, CODE]
    # The markup in a generation prompt is kept too by default (the answer may refer to it).
    assert out[1].input == "Show code &amp; <b>all</b>"
    assert cur.removed == [] and cur.report()["test_rows_removed"] == 0


def test_chat_assistant_turns_are_kept_and_user_turns_normalised():
    turns = [{"role": "user", "content": "caf\u0065\u0301?"}, {"role": "assistant", "content": IMG},
             {"role": "user", "content": "again\x07"}]
    ex = Example("again\x07", IMG, "f:1", messages=turns, file="f", line=1)
    (out,) = Curation(CleanConfig(), "chat").clean_rows("train", [ex])
    assert out.target == IMG and out.messages[1]["content"] == IMG
    # Control characters leave every input; NFKC only where asked (an answer may quote the prompt).
    assert out.messages[0]["content"] == "caf\u0065\u0301?" and out.messages[2]["content"] == "again"
    opt_in = CleanConfig(normalize=NormalizeSettings(unicode=True))
    (nfkc,) = Curation(opt_in, "chat").clean_rows("train", [ex])
    assert nfkc.messages[0]["content"] == "caf\u00e9?" and nfkc.target == IMG


def test_an_extractive_span_in_a_generation_prompt_survives_cleaning():
    span = "the \ufb01rst x\u00b2 \u2026"          # ligature, superscript, ellipsis: NFKC would rewrite all three
    (row,) = Curation(CleanConfig(), "generation").clean_rows("train", _rows([(f"Context: {span}. Quote it.", span)]))
    assert span in row.input and row.target == span
    (cls,) = Curation(CleanConfig(), "classification").clean_rows("train", _rows([(span, "pos")]))
    assert cls.input == "the first x2 ..."


def test_markup_cleaning_stays_on_classification_inputs_by_default():
    (row,) = Curation(CleanConfig(), "classification").clean_rows("train", _rows([("<p>good &amp; fine</p>", "pos")]))
    assert row.input == "good & fine"
    opt_in = CleanConfig(normalize=NormalizeSettings(html=True, whitespace=True))
    (gen,) = Curation(opt_in, "generation").clean_rows("train", _rows([("<p>a &amp; b</p>", IMG)]))
    assert gen.input == "a & b" and gen.target == IMG   # opted in: inputs only, never the answer


def test_test_rows_leave_only_for_defects_and_are_counted():
    cfg = CleanConfig(min_chars=20)
    rows = [("short", "yes"), ("a long enough question here?", "ok"), ("a long enough question here?", "ok")]
    cur = Curation(cfg, "generation")
    train = cur.clean_rows("train", _rows(rows))
    test = cur.clean_rows("test", _rows(rows))
    assert [e.input for e in train] == ["a long enough question here?"]     # too_short and duplicate removed
    assert [e.input for e in test] == ["short", "a long enough question here?"]  # only the duplicate
    report = cur.report()
    assert report["test_rows_removed"] == 1 and report["test_rows_removed_by_reason"] == {"exact_duplicate": 1}
    assert report["removed_by_reason"] == {"exact_duplicate": 2, "too_short": 1}


PROJECT = """name: clean-gen
model: {model}
task:
  type: generation
  instruction: "Answer."
data:
  train: train.jsonl
  test: test.jsonl
objective:
  metric: exact_match
  min_gain: -1.0
train:
  max_steps: 2
  batch_size: 4
eval:
  max_new_tokens: 2
  latency_samples: 1
  forgetting_probe: false
"""


def test_cli_keeps_a_markup_answer_and_reports_removed_test_rows(tmp_path, tiny_model):
    rows = [{"prompt": r["text"], "completion": r["label"]} for r in make_texts(24, 4)]
    test = rows[16:20] + [{"prompt": "Write the image tag.", "completion": IMG}, rows[16]]  # the last: a duplicate
    write_jsonl(tmp_path / "train.jsonl", rows[:16])
    write_jsonl(tmp_path / "test.jsonl", test)
    (tmp_path / "p.yaml").write_text(PROJECT.format(model=tiny_model))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "test rows removed: 1 (exact_duplicate 1" in result.output
    out = tmp_path / "out"
    preds = [json.loads(line) for line in (out / "predictions" / "test.jsonl").read_text().splitlines()]
    assert len(preds) == 5 and preds[4]["gold"] == IMG
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == {"test_rows_removed": 1, "test_rows_removed_by_reason": {"exact_duplicate": 1}}
    assert json.loads((out / "data" / "report.json").read_text())["curation"]["test_rows_removed"] == 1
    html = (out / "report.html").read_text()
    assert "test rows removed: 1 (exact_duplicate 1; every row in data/removed.jsonl)" in html
    removed = [json.loads(line) for line in (out / "data" / "removed.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["removed_from_split"]) for r in removed] == [("exact_duplicate", "test")]


def test_conversations_are_compared_whole_not_by_their_last_question():
    """Two chats that differ only in their system prompt or earlier turns were one "exact duplicate", and a
    training chat ending in the same "Thanks!" as a test chat was removed as test overlap."""
    def chat(n: int, system: str, first: str) -> Example:
        turns = [{"role": "system", "content": system}, {"role": "user", "content": first},
                 {"role": "assistant", "content": "Sure."},
                 {"role": "user", "content": "Thanks for your help today!"}]
        return Example(turns[-1]["content"], "You're welcome!", f"f:{n}", messages=turns, file="f", line=n)
    cur = Curation(CleanConfig(near_dedup={"enabled": False}), "chat")  # exact duplicates and test overlap only
    train = cur.clean_rows("train", [chat(1, "You are a pirate.", "Say hello"),
                                     chat(2, "You are a butler.", "Say hello"),
                                     chat(3, "You are a pirate.", "Translate dog to French")])
    assert [e.line for e in train] == [1, 2, 3] and cur.removed == []
    test = [chat(9, "You are a judge.", "Translate cat to German and explain the grammar of the word")]
    assert [e.line for e in cur.decontaminate(train, test)] == [1, 2, 3]
    same = cur.clean_rows("train", [chat(n, "You are a pirate.", "Say hello") for n in (4, 5)])
    assert [e.line for e in same] == [4] and cur.removed[0]["reason"] == "exact_duplicate"
