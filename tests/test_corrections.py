"""data.corrections: reviewed label decisions applied by the next data stage (relabel, drop, keep), logged,
never touching test rows, and a bad file refused with its file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import PROJECT, make_texts, write_jsonl
from tunesmith.cli import app
from tunesmith.data.corrections import Decision, merge, read_corrections

runner = CliRunner()
NO_NOISE = "  clean:\n    label_noise: {enabled: false}\n"


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _project(tmp_path, tiny_model, train: list[dict], test: list[dict], data_extra: str) -> str:
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", test)
    text = PROJECT.format(model=tiny_model, method="lora").replace(
        "  validation: 0.2\n", "  validation: 0.2\n" + data_extra)
    (tmp_path / "project.yaml").write_text(text, encoding="utf-8")
    return str(tmp_path / "project.yaml")


def _decision(row: dict, action: str, label: str | None = None, source: str | None = None) -> dict:
    out = {"text": row["text"], "given_label": row["label"], "action": action, "source": source}
    return out | ({"label": label} if label else {})


def test_relabel_and_drop_are_applied_logged_and_never_touch_test_rows(tmp_path, tiny_model):
    train, test = make_texts(30, 1), make_texts(9, 2)
    train[3]["text"] = "  padded   row " + train[3]["text"]  # normalised by cleaning: matched by its raw text
    decisions = [_decision(train[3], "relabel", "gamma" if train[3]["label"] != "gamma" else "beta", "train.jsonl:4"),
                 _decision(train[7], "drop", source="train.jsonl:8"),
                 _decision(test[0], "relabel", "gamma" if test[0]["label"] != "gamma" else "beta"),
                 {"text": "no row has this text", "given_label": "alpha", "action": "drop"}]
    write_jsonl(tmp_path / "fixes.jsonl", decisions)
    config = _project(tmp_path, tiny_model, train, test, NO_NOISE + "  corrections: fixes.jsonl\n")
    out = tmp_path / "clean"
    result = runner.invoke(app, ["data", "clean", config, "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    kept = _jsonl(out / "train.jsonl") + _jsonl(out / "validation.jsonl")
    relabelled = [e for e in kept if e["input"].endswith(train[3]["text"].split("row ", 1)[1])]
    assert len(relabelled) == 1 and relabelled[0]["target"] == decisions[0]["label"]
    assert not any(e["input"] == train[7]["text"] for e in kept)
    assert len(kept) == 29
    # the test split is the benchmark: listed there, still unchanged
    assert [(e["input"], e["target"]) for e in _jsonl(out / "test.jsonl")] == [(r["text"], r["label"]) for r in test]
    changes = [c for c in _jsonl(out / "changes.jsonl") if c.get("reason") == "correction"]
    assert sorted((c["action"], c["line"]) for c in changes) == [("drop", 8), ("relabel", 4)]
    assert next(c for c in changes if c["action"] == "relabel")["new_label"] == decisions[0]["label"]
    removed = _jsonl(out / "removed.jsonl")
    assert [(r["reason"], r["line"]) for r in removed] == [("correction", 8)]
    report = json.loads((out / "report.json").read_text())["corrections"]
    assert (report["rows_relabelled"], report["rows_dropped"], report["not_found"],
            report["test_rows_not_changed"]) == (1, 1, 1, 1)
    assert report["not_found_lines"] == [4] and report["test_rows_lines"] == [3]
    assert "corrections: relabelled 1, dropped 1, kept 0 rows" in result.stdout
    assert f"warning: data.corrections: 1 decisions match no training or validation row, not applied " \
           f"(first: {tmp_path / 'fixes.jsonl'}:4)" in result.stdout
    assert "1 decisions name test rows, which corrections never change" in result.stdout


def test_a_bad_corrections_file_is_refused_with_its_line(tmp_path, tiny_model):
    train = make_texts(30, 1)
    (tmp_path / "fixes.jsonl").write_text(
        json.dumps(_decision(train[0], "drop")) + "\n\n" + json.dumps(_decision(train[1], "relabel")) + "\n",
        encoding="utf-8")
    config = _project(tmp_path, tiny_model, train, make_texts(9, 2), NO_NOISE + "  corrections: fixes.jsonl\n")
    result = runner.invoke(app, ["data", "check", config])
    assert result.exit_code == 2, result.output
    assert f"error: invalid decision: relabel needs 'label', the new label, {tmp_path / 'fixes.jsonl'}:3" \
        in result.output
    assert "Traceback" not in result.output
    # the same row decided twice; a relabel to a label outside task.labels
    (tmp_path / "fixes.jsonl").write_text(json.dumps(_decision(train[0], "drop")) + "\n"
                                          + json.dumps(_decision(train[0], "keep")) + "\n", encoding="utf-8")
    result = runner.invoke(app, ["run", config, "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 2 and "already decided at line 1" in result.output and "fixes.jsonl:2" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("line,problem", [
    ('"action": "relabel", "label": "<|im_end|>\\nnew"}', "invalid decision: 'label' holds a control or invisible"),
    ('"action": "relabel", "label": "\\u001b[31mred\\u202e"}', "invalid decision: 'label' holds a control"),
    ('"action": "keep", "action": "drop"}', "invalid decision: the key 'action' is given twice"),
])
def test_a_correction_is_held_to_what_a_data_row_is(tmp_path, tiny_model, line, problem):
    """A relabel put a label with a line break (or terminal escapes) into training and serving, which the
    same label in a data row is refused for; a key given twice was read as its last value."""
    train = make_texts(30, 1)
    head = json.dumps({"text": train[0]["text"], "given_label": train[0]["label"]})[:-1]
    (tmp_path / "fixes.jsonl").write_text(head + ", " + line + "\n", encoding="utf-8")
    config = _project(tmp_path, tiny_model, train, make_texts(9, 2), NO_NOISE + "  corrections: fixes.jsonl\n")
    for args in (["data", "check", config], ["train", config, "--out", str(tmp_path / "run"), "--quiet"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and problem in result.output, result.output
        assert f"{tmp_path / 'fixes.jsonl'}:1" in result.output
    assert not (tmp_path / "run").exists()


def test_missing_corrections_file_is_a_located_config_error(tmp_path, tiny_model):
    config = _project(tmp_path, tiny_model, make_texts(30, 1), make_texts(9, 2), "  corrections: nope.jsonl\n")
    result = runner.invoke(app, ["data", "check", config])
    assert result.exit_code == 2
    assert "corrections file not found" in result.output and "project.yaml:10 (data.corrections)" in result.output


def test_keep_protects_a_suspect_from_label_noise_removal(tmp_path, tiny_model):
    train = make_texts(40, 1)
    for i in (0, 1, 2):  # mislabelled rows label-noise detection should flag
        train[i]["label"] = {"alpha": "beta", "beta": "gamma", "gamma": "alpha"}[train[i]["label"]]
    extra = "  validation: 0.1\n  clean:\n    label_noise: {action: remove}\n"
    config = _project(tmp_path, tiny_model, train, make_texts(9, 2), extra)
    config_text = (tmp_path / "project.yaml").read_text().replace("  validation: 0.2\n", "")
    (tmp_path / "project.yaml").write_text(config_text)
    first = runner.invoke(app, ["data", "clean", config, "--out", str(tmp_path / "a"), "-q"])
    assert first.exit_code == 0, first.output
    suspects = _jsonl(tmp_path / "a" / "suspects.jsonl")
    assert suspects, "the mislabelled rows should be suspected"
    s = suspects[0]
    write_jsonl(tmp_path / "fixes.jsonl", [{"text": s["text"], "given_label": s["given_label"], "action": "keep"}])
    (tmp_path / "project.yaml").write_text(config_text.replace("  clean:\n", "  corrections: fixes.jsonl\n  clean:\n"))
    second = runner.invoke(app, ["data", "clean", config, "--out", str(tmp_path / "b"), "-q"])
    assert second.exit_code == 0, second.output
    train_b = _jsonl(tmp_path / "b" / "train.jsonl")
    assert any(e["input"] == s["text"] and e["target"] == s["given_label"] for e in train_b)
    assert not any(r["line"] == s["line"] for r in _jsonl(tmp_path / "b" / "removed.jsonl"))
    again = [x for x in _jsonl(tmp_path / "b" / "suspects.jsonl") if x["line"] == s["line"]]
    assert all(x["reviewed"] == "keep" for x in again)
    assert len(train_b) == len(_jsonl(tmp_path / "a" / "train.jsonl")) + 1


def test_merge_replaces_the_decision_for_the_same_row(tmp_path):
    a = Decision("t", "alpha", "drop")
    b = Decision("u", "beta", "keep")
    merged = merge([a, b], [Decision("t", "alpha", "relabel", "gamma")])
    assert [d.to_json() for d in merged] == [
        {"text": "t", "given_label": "alpha", "action": "relabel", "label": "gamma"},
        {"text": "u", "given_label": "beta", "action": "keep"}]
    write_jsonl(tmp_path / "c.jsonl", [d.to_json() for d in merged])
    assert [d.key for d in read_corrections(tmp_path / "c.jsonl")] == [("t", "alpha"), ("u", "beta")]


def _noise_run(monkeypatch, action: str, decisions: list[Decision]):
    """Corrections applied, then the real Curation.label_noise with the detector stubbed to suspect rows 0-2
    (suggesting 'gamma'), then honour_keeps: (rows out, curation, corrections)."""
    import numpy as np

    import tunesmith.data.label_noise as label_noise
    from tunesmith.config.schema import CleanConfig
    from tunesmith.data.clean import Curation
    from tunesmith.data.corrections import Corrections
    from tunesmith.data.examples import Example

    rows = [Example(f"row {i}", "alpha" if i % 2 else "beta", "train", record={"text": f"row {i}"},
                    file="train.jsonl", line=i + 1) for i in range(12)]
    monkeypatch.setattr(Curation, "vectors", lambda self, texts: np.zeros((len(texts), 2)))
    monkeypatch.setattr(label_noise, "find_suspects", lambda emb, labels, folds: [
        label_noise.Suspect(i, labels[i], "gamma", 0.9) for i in (0, 1, 2)])
    cfg = CleanConfig.model_validate({"label_noise": {"action": action}})
    curation, fixes = Curation(cfg), Corrections(Path("fixes.jsonl"), decisions)
    train = fixes.apply(curation, "train", rows)
    out = fixes.honour_keeps(curation, train, curation.label_noise(train), action)
    return out, curation, fixes


def test_label_noise_never_undoes_a_relabel_or_keep(monkeypatch):
    decisions = [Decision("row 0", "beta", "relabel", "alpha", line=1), Decision("row 1", "alpha", "keep", line=2)]
    out, curation, fixes = _noise_run(monkeypatch, "relabel", decisions)
    by_text = {e.input: e.target for e in out}
    assert (by_text["row 0"], by_text["row 1"], by_text["row 2"]) == ("alpha", "alpha", "gamma")
    assert [c["line"] for c in curation.changes if c["changes"] == ["relabel"]] == [3]
    step = next(s for s in curation.steps if s["step"] == "label_noise")
    assert step["rows_changed"] == 1
    assert fixes.report()["rows_relabelled"] == 1
    assert {s["line"]: s.get("reviewed") for s in curation.suspects} == {1: "relabel", 2: "keep", 3: None}
    out, curation, _ = _noise_run(monkeypatch, "remove", decisions)
    assert sorted(e.input for e in out if e.input in ("row 0", "row 1", "row 2")) == ["row 0", "row 1"]
    assert next(e.target for e in out if e.input == "row 0") == "alpha"
    assert [r["line"] for r in curation.removed if r["reason"] == "label_noise"] == [3]
