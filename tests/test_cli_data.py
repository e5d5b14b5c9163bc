"""`tunesmith data check|clean|augment|split|report` through the real CLI."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from conftest import PROJECT, make_texts, write_jsonl
from tunesmith.cli import app

runner = CliRunner()


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _project(tmp_path, tiny_model, rows: list[dict], data_extra: str = "") -> str:
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", make_texts(9, 2))
    text = PROJECT.format(model=tiny_model, method="lora").replace("  validation: 0.2\n",
                                                                   "  validation: 0.2\n" + data_extra)
    (tmp_path / "project.yaml").write_text(text, encoding="utf-8")
    return str(tmp_path / "project.yaml")


def test_clean_writes_splits_removed_suspects_changes_and_report(tmp_path, tiny_model):
    rows = make_texts(40, 1)
    test_rows = make_texts(9, 2)
    rows += [dict(rows[0]), {"text": rows[1]["text"].upper() + "!", "label": rows[1]["label"]},
             {"text": rows[2]["text"] + " mail me at a.b@example.org", "label": rows[2]["label"]},
             dict(test_rows[0])]
    config = _project(tmp_path, tiny_model, rows, "  clean:\n    near_dedup: {enabled: false}\n")
    out = tmp_path / "clean"
    result = runner.invoke(app, ["data", "clean", config, "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "removed.jsonl", "suspects.jsonl",
                 "changes.jsonl", "report.json"):
        assert (out / name).is_file(), name
    removed = _jsonl(out / "removed.jsonl")
    by_line = {r["line"]: r for r in removed}
    assert by_line[41]["reason"] == "exact_duplicate" and by_line[41]["duplicate_of"]["line"] == 1
    assert by_line[42]["reason"] == "exact_duplicate" and by_line[42]["duplicate_of"]["line"] == 2
    assert by_line[44]["reason"] == "test_overlap" and by_line[44]["text"] == test_rows[0]["text"]
    assert all(r["file"].endswith("train.jsonl") and "label" in r for r in removed)
    kept = _jsonl(out / "train.jsonl") + _jsonl(out / "validation.jsonl")
    assert any(e["input"].endswith("mail me at [EMAIL]") for e in kept)
    report = json.loads((out / "report.json").read_text())
    assert report["curation"]["pii_found"] == {"email": 1}
    assert report["curation"]["removed_by_reason"] == {"exact_duplicate": 2, "test_overlap": 1}
    train_profile = report["splits"]["train"]
    assert train_profile["rows"] == len(_jsonl(out / "train.jsonl"))
    assert {"chars_histogram", "distinct_1", "distinct_2", "label_counts", "embedding_spread"} <= set(train_profile)
    assert "removed: exact_duplicate 2, test_overlap 1" in result.stdout


def test_clean_of_bad_data_exits_2_and_writes_nothing(tmp_path, tiny_model):
    config = _project(tmp_path, tiny_model, make_texts(20, 1))
    with open(tmp_path / "train.jsonl", "a", encoding="utf-8") as f:
        f.write('{"text": "no label here"}\n')
    result = runner.invoke(app, ["data", "clean", config, "--out", str(tmp_path / "clean")])
    assert result.exit_code == 2 and f"{tmp_path / 'train.jsonl'}:21" in result.stderr
    assert not (tmp_path / "clean").exists()


def test_an_out_that_is_a_link_loop_is_named_not_an_internal_error(tmp_path, tiny_model):
    """Path.resolve() raises RuntimeError for a link loop before Python 3.13 (exit 1, internal error)."""
    config = _project(tmp_path, tiny_model, make_texts(20, 1))
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    for command in (["data", "split", config, "--out", str(tmp_path / "loop1")],
                    ["train", config, "--out", str(tmp_path / "loop1" / "run"), "--quiet"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and result.stderr.startswith("error: too many levels of symbolic links"), \
            result.output
        assert str(tmp_path / "loop1") in result.stderr and "internal error" not in result.output


def test_check_warns_about_imbalance_and_rare_classes(tmp_path, tiny_model):
    rows = [r for r in make_texts(90, 1) if r["label"] != "gamma"] + [r for r in make_texts(9, 1)
                                                                     if r["label"] == "gamma"][:2]
    config = _project(tmp_path, tiny_model, rows)
    result = runner.invoke(app, ["data", "check", config])
    assert result.exit_code == 0, result.output
    assert "class imbalance" in result.stdout and "label 'gamma' has only 2 training rows" in result.stdout


def test_group_split_keeps_each_group_in_one_split(tmp_path, tiny_model):
    rows = [dict(r, user=f"u{i // 3}") for i, r in enumerate(make_texts(60, 1))]
    config = _project(tmp_path, tiny_model, rows, "  group_field: user\n")
    text = open(config).read().replace("  test: test.jsonl\n", "  test: 0.2\n")
    open(config, "w").write(text)
    out = tmp_path / "split"
    result = runner.invoke(app, ["data", "split", config, "--out", str(out)])
    assert result.exit_code == 0, result.output
    groups = {name: {e["group"] for e in _jsonl(out / f"{name}.jsonl")} for name in ("train", "validation", "test")}
    assert all(groups[name] for name in groups)
    assert not groups["train"] & groups["test"] and not groups["train"] & groups["validation"]
    assert not groups["validation"] & groups["test"]
    assert sum(len(_jsonl(out / f"{n}.jsonl")) for n in groups) == 60


def test_a_given_test_file_takes_its_groups_out_of_training(tmp_path, tiny_model):
    """Carved splits kept groups apart, a given test file did not: its users' rows stayed in training."""
    rows = [dict(r, user=f"u{i // 6}") for i, r in enumerate(make_texts(60, 1))]
    config = _project(tmp_path, tiny_model, rows, "  group_field: user\n")
    write_jsonl(tmp_path / "test.jsonl", [dict(r, user="u0") for r in make_texts(9, 2)])  # all of user u0
    out = tmp_path / "split"
    result = runner.invoke(app, ["data", "split", config, "--out", str(out)])
    assert result.exit_code == 0, result.output
    groups = {name: {e["group"] for e in _jsonl(out / f"{name}.jsonl")} for name in ("train", "validation", "test")}
    assert groups["test"] == {"u0"} and "u0" not in groups["train"] | groups["validation"]
    removed = [r for r in _jsonl(out / "removed.jsonl") if r["reason"] == "group_in_held_out"]
    assert len(removed) == 6 and {r["group"] for r in removed} == {"u0"}
    assert "removed: group_in_held_out 6" in result.stdout  # split says what it took out
    assert removed[0]["overlaps"]["file"] == str(tmp_path / "test.jsonl")


def test_a_data_output_is_replaced_whole_or_not_at_all(tmp_path, tiny_model):
    """A later command wrote its files one by one: a failure left new splits beside old ones, and
    `data split` after `data report` left the report.html of the other command beside the new report."""
    config = _project(tmp_path, tiny_model, make_texts(30, 1))
    out = tmp_path / "out"
    assert runner.invoke(app, ["data", "report", config, "--out", str(out), "-q"]).exit_code == 0
    assert (out / "report.html").is_file()
    assert runner.invoke(app, ["data", "split", config, "--out", str(out)]).exit_code == 0
    assert not (out / "report.html").exists() and (out / "train.jsonl").is_file()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (out / "removed.jsonl").unlink()
    (out / "removed.jsonl").mkdir()  # a name the next output cannot take
    result = runner.invoke(app, ["data", "split", config, "--out", str(out)])
    assert result.exit_code == 2 and f"{out / 'removed.jsonl'} is not a file" in result.stderr, result.output
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == {k: v for k, v in before.items() if k != "removed.jsonl"}  # nothing moved in
    assert not [p for p in out.iterdir() if p.name.startswith(".writing-")]
    killed = tmp_path / "killed"  # a first command killed while writing: its marker and half a staging folder
    (killed / ".writing-x").mkdir(parents=True)
    (killed / ".writing-x" / "train.jsonl").write_text("{")
    (killed / ".tunesmith-data").write_text("")
    assert runner.invoke(app, ["data", "split", config, "--out", str(killed)]).exit_code == 0
    assert (killed / "train.jsonl").is_file() and not (killed / ".writing-x").exists()


def test_augment_adds_marked_rows_to_train_only(tmp_path, tiny_model):
    augment = "  augment: {enabled: true, eda: 1, char_noise: 1, paraphrases: 1}\n"
    config = _project(tmp_path, tiny_model, make_texts(30, 1), augment)
    out = tmp_path / "aug"
    result = runner.invoke(app, ["data", "augment", config, "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    train = _jsonl(out / "train.jsonl")
    made = [e for e in train if "augmented" in e]
    assert {e["augmented"].split(":")[0] for e in made} >= {"eda", "char_noise"}
    assert len(made) >= len(train) - len(made)
    for name in ("validation", "test"):
        assert not any("augmented" in e for e in _jsonl(out / f"{name}.jsonl"))
    report = json.loads((out / "report.json").read_text())
    assert report["splits"]["train"]["augmented_rows"] == len(made)
    assert "augmented training rows:" in result.stdout


def test_report_command_writes_report_json(tmp_path, tiny_model):
    config = _project(tmp_path, tiny_model, make_texts(30, 1))
    result = runner.invoke(app, ["data", "report", config, "--out", str(tmp_path / "rep"), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "<h3>Curation</h3>" in page and "data:image/png;base64," in page
    assert [s["step"] for s in report["curation"]["steps"] if s["split"] == "train"][:3] == [
        "normalize", "length", "exact_dedup"]


def test_data_stage_report_returns_the_report_and_leaves_the_page_to_the_report_layer(tmp_path, tiny_model):
    from tunesmith.config import load_config
    from tunesmith.data import stage
    from tunesmith.report.data_section import write_data_page

    project = load_config(_project(tmp_path, tiny_model, make_texts(30, 1)))
    out = tmp_path / "rep"
    result = stage.report(project, out, progress=False)
    assert json.loads(json.dumps(result.report)) == json.loads((out / "report.json").read_text())
    assert result.lines[0].startswith("train: ") and result.lines[-1] == f"report written to {out}"
    assert not (out / "report.html").exists()  # the data layer renders no page
    page = write_data_page(out, result.report, project.name).read_text()
    assert f"<title>tunesmith data report: {project.name}</title>" in page and "<h3>Curation</h3>" in page
    assert not stage.report(project, None, progress=False).lines[-1].startswith("report written")


def test_a_very_long_label_is_shortened_on_the_page_and_a_failed_page_publishes_nothing(tmp_path, tiny_model,
                                                                                      monkeypatch):
    """A 1.3M-character label made a 9-million-pixel plot matplotlib refused (exit 1), after report.json was
    already in --out; `data check` printed the whole label. Labels are at most 200 characters now (longer
    ones are invalid rows, named shortened), and the longest is still drawn shortened."""
    from tunesmith.report import data_section

    rows = make_texts(30, 1)
    for r in rows[::3]:
        r["label"] = "y" * 5_000
    config = _project(tmp_path, tiny_model, rows)
    checked = runner.invoke(app, ["data", "check", config])
    assert checked.exit_code == 2 and "is 5,000 characters long, over 200" in checked.output
    assert len(checked.output) < 5_000, len(checked.output)
    for r in rows[::3]:
        r["label"] = "y" * 200
    config = _project(tmp_path, tiny_model, rows)
    result = runner.invoke(app, ["data", "report", config, "--out", str(tmp_path / "rep"), "-q"])
    assert result.exit_code == 0, result.output  # the plots draw the label shortened
    assert (tmp_path / "rep" / "report.html").is_file()

    def broken(*args, **kwargs):
        raise ValueError("Image size too large")
    monkeypatch.setattr(data_section, "data_page", broken)
    failed = runner.invoke(app, ["data", "report", config, "--out", str(tmp_path / "new")])
    assert failed.exit_code != 0 and not (tmp_path / "new").exists()
