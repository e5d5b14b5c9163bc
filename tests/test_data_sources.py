"""data.train/test/validation as several sources: globs, weights and max_rows, data.columns, Arrow files,
`datasets` save_to_disk folders and hf:// references read offline; every new key's bad values located."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from conftest import PROJECT, make_texts, write_jsonl
from tunesmith.config import DataConfig, Project, TaskConfig, dump_config, load_config
from tunesmith.data.examples import load_examples
from tunesmith.data.io import RowSource, read_rows
from tunesmith.data.prepare import prepare_data
from tunesmith.data.sources import load_sources, shares
from tunesmith.errors import ConfigError, DataError

HEAD = "name: demo\ndata:\n"


def _config(tmp_path: Path, data: str, extra: str = "") -> Path:
    path = tmp_path / "project.yaml"
    path.write_text(HEAD + data + extra, encoding="utf-8")
    return path


def _rows(n: int, tag: str) -> list[dict]:
    """n distinct classification rows whose text says which source they came from."""
    return [{"text": f"{tag} row number {i}", "label": ["x", "y"][i % 2]} for i in range(n)]


def _error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    line = info.value.line()
    assert line.startswith("error: ") and "\n" not in line
    return line


# -- config: globs, lists, mappings ----------------------------------------------------------------
def test_glob_expands_sorted_relative_to_the_config_and_is_recorded(tmp_path):
    (tmp_path / "data").mkdir()
    for name in ("b.jsonl", "a.jsonl", "c.csv"):
        write_jsonl(tmp_path / "data" / name, _rows(2, name))
    project = load_config(_config(tmp_path, "  train: data/*.jsonl\n"))
    [src] = project.data.train
    assert src.path == str(tmp_path.resolve() / "data" / "*.jsonl")
    assert src.files == [str(tmp_path.resolve() / "data" / n) for n in ("a.jsonl", "b.jsonl")]
    # The run's saved config reads the same files, even after a new file starts matching the glob.
    saved = tmp_path / "saved.yaml"
    saved.write_text(dump_config(project), encoding="utf-8")
    write_jsonl(tmp_path / "data" / "d.jsonl", _rows(2, "d"))
    assert load_config(saved, check_files=False).data.train[0].files == src.files


def test_single_path_is_unchanged(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", _rows(2, "t"))
    project = load_config(_config(tmp_path, "  train: train.jsonl\n"))
    assert project.data.train == (tmp_path / "train.jsonl").resolve()


def test_list_of_paths_and_mappings_resolves_absolute(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", _rows(2, "a"))
    write_jsonl(tmp_path / "b.jsonl", _rows(2, "b"))
    write_jsonl(tmp_path / "c.jsonl", _rows(2, "c"))
    project = load_config(_config(tmp_path, "  train:\n    - a.jsonl\n    - {path: b.jsonl, weight: 2, max_rows: 5}\n"
                                            "  test: [c.jsonl]\n"))
    a, b = project.data.train
    assert (a.path, a.weight) == (str(tmp_path.resolve() / "a.jsonl"), None)
    assert (b.path, b.weight, b.max_rows) == (str(tmp_path.resolve() / "b.jsonl"), 2.0, 5)
    dumped = dump_config(project)
    assert str(tmp_path.resolve() / "b.jsonl") in dumped and "weight: 2.0" in dumped


BAD = [
    ("  train:\n    - a.jsonl\n    - {path: a2.jsonl, weight: 0}\n", "data.train.1.weight", 5, "greater than 0"),
    ("  train:\n    - {path: a.jsonl, weight: -1}\n", "data.train.0.weight", 4, "greater than 0"),
    ("  train:\n    - {path: a.jsonl, max_rows: 0}\n", "data.train.0.max_rows", 4, "greater than or equal to 1"),
    ("  train:\n    - {path: a.jsonl, wieght: 2}\n", "data.train.0.wieght", 4, "unknown key"),
    ("  train:\n    - {weight: 2}\n", "data.train.0.path", 4, "missing required key"),
    ("  train:\n    - 7\n", "data.train.0", 4, "got int"),
    ("  train: []\n", "data.train", 3, "empty list"),
    ("  train: hf://no spaces/train\n", "data.train.path", 3, "hf://NAME[:CONFIG]/SPLIT"),
    ("  train:\n    - hf://imdb\n", "data.train.0.path", 4, "hf://NAME[:CONFIG]/SPLIT"),
    ("  train: a.jsonl\n  test:\n    - {path: a.jsonl, weight: 2}\n", "data.test.0.weight", 5, "training sources only"),
    ("  train: data/*.jsonl\n", "data.train", 3, "no data file matches"),
    ("  train:\n    - a.jsonl\n    - nowhere.jsonl\n", "data.train.1", 5, "data file not found"),
    ("  train:\n    - a.jsonl\n    - a.jsonl\n", "data.train.1", 5, "twice"),
    ("  train: a.jsonl\n  columns: {text: question, intent: label}\n", "data.columns.intent", 4,
     "not a field of a classification task"),
    ("  train: a.jsonl\n  columns: {text: q, label: q}\n", "data.columns", 4, "several fields"),
    ("  train: a.jsonl\n  columns: {text: ''}\n", "data.columns.text", 4, "must name a column"),
]


@pytest.mark.parametrize("data, key, line, what", BAD)
def test_bad_values_are_located(tmp_path, data, key, line, what):
    write_jsonl(tmp_path / "a.jsonl", _rows(2, "a"))
    path = _config(tmp_path, data)
    message = _error(path)
    assert what in message and f"({key})" in message and f"{path}:{line} " in message


def test_columns_field_names_follow_the_task_type(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"q": "hi", "a": "there"}])
    path = _config(tmp_path, "  train: a.jsonl\n  columns: {prompt: q, completion: a}\n",
                   "task:\n  type: generation\nobjective:\n  metric: rouge_l\n")
    assert load_config(path).data.columns == {"prompt": "q", "completion": "a"}
    bad = _config(tmp_path, "  train: a.jsonl\n  columns: {label: q}\n",
                  "task:\n  type: generation\nobjective:\n  metric: rouge_l\n")
    assert load_config(bad).data.columns == {"label": "q"}  # a KTO row's label: a generation field
    text = _config(tmp_path, "  train: a.jsonl\n  columns: {label: q}\n",
                   "task:\n  type: text\nobjective:\n  metric: perplexity\n")
    assert "(data.columns.label)" in _error(text)


# -- mixing and max_rows ---------------------------------------------------------------------------
def _mixed_project(tmp_path: Path, train: list[dict]) -> Project:
    write_jsonl(tmp_path / "val.jsonl", _rows(10, "val"))
    write_jsonl(tmp_path / "test.jsonl", _rows(10, "test"))
    return Project(name="p", data=DataConfig(train=train, validation=tmp_path / "val.jsonl",
                                             test=tmp_path / "test.jsonl", clean={"enabled": False}))


def test_weights_mix_training_rows_within_two_percent_over_10k(tmp_path):
    small = write_jsonl(tmp_path / "small.jsonl", _rows(2000, "small"))
    big = write_jsonl(tmp_path / "big.jsonl", _rows(8000, "big"))
    mid = write_jsonl(tmp_path / "mid.jsonl", _rows(1000, "mid"))
    project = _mixed_project(tmp_path, [{"path": str(small), "weight": 3}, {"path": str(big), "weight": 1.5},
                                        {"path": str(mid), "weight": 0.5, "max_rows": 500}])
    splits = prepare_data(project)
    counts = Counter(e.input.split()[0] for e in splits.train)
    total = sum(counts.values())
    assert total == 2000 + 8000 + 500  # the size stays; only the mix changes
    for tag, weight in (("small", 3), ("big", 1.5), ("mid", 0.5)):
        assert abs(counts[tag] / total - weight / 5) < 0.02, (tag, counts)
    # The small source repeats (its share, 6300 rows, exceeds its 2000); the report says how often.
    entries = {Path(e["source"]).stem: e for e in splits.sources["train"]}
    assert entries["small"]["rows_taken"] == counts["small"] and entries["small"]["rows_available"] == 2000
    assert entries["mid"]["rows_read"] == 1000 and entries["mid"]["rows_kept"] == 500
    assert len({e.input for e in splits.train if e.input.startswith("big")}) == counts["big"]  # no repeats
    assert prepare_data(project).train == splits.train  # seeded


def test_without_weights_sources_are_concatenated(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", _rows(30, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", _rows(20, "b"))
    splits = prepare_data(_mixed_project(tmp_path, [str(a), str(b)]))
    assert Counter(e.input.split()[0] for e in splits.train) == {"a": 30, "b": 20}


def test_max_rows_is_a_seeded_sample_not_the_first_rows(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", _rows(200, "a"))
    project = _mixed_project(tmp_path, [{"path": str(a), "max_rows": 20}])
    kept = [e.line for e in load_sources(project).examples["train"]]
    assert len(kept) == 20 and kept != list(range(1, 21)) and kept == sorted(kept)
    assert kept == [e.line for e in load_sources(project).examples["train"]]


def test_shares_add_up_and_follow_the_weights():
    assert shares(10, [1, 1, 1]) == [4, 3, 3] and sum(shares(10_001, [0.3, 0.7])) == 10_001


def test_report_records_sources_and_fingerprint_changes_with_any_file(tmp_path):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "a.jsonl", _rows(20, "a"))
    write_jsonl(tmp_path / "data" / "b.jsonl", _rows(20, "b"))
    project = _mixed_project(tmp_path, [str(tmp_path / "data" / "*.jsonl")])
    before = load_sources(project).report()
    assert before["train"][0]["locations"] == [str(tmp_path / "data" / n) for n in ("a.jsonl", "b.jsonl")]
    write_jsonl(tmp_path / "data" / "b.jsonl", _rows(20, "b") + _rows(1, "new"))
    after = load_sources(project).report()
    assert after["fingerprint"] != before["fingerprint"]
    assert after["train"][0]["sha256"] != before["train"][0]["sha256"]
    assert after["validation"] == before["validation"]


# -- column mapping and formats --------------------------------------------------------------------
def _write_all_formats(folder: Path, rows: list[dict]) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    write_jsonl(folder / "s.jsonl", rows)
    (folder / "s.csv").write_text("question,intent\n" + "".join(f"{r['question']},{r['intent']}\n" for r in rows))
    pq.write_table(table, folder / "s.parquet")
    with pa.ipc.new_file(folder / "file.arrow", table.schema) as w:
        w.write_table(table)
    with pa.ipc.new_stream(folder / "stream.arrow", table.schema) as w:
        w.write_table(table)
    return [folder / n for n in ("s.jsonl", "s.csv", "s.parquet", "file.arrow", "stream.arrow")]


def test_columns_apply_to_every_format(tmp_path):
    rows = [{"question": f"q{i}", "intent": ["x", "y"][i % 2]} for i in range(6)]
    paths = _write_all_formats(tmp_path, rows)
    project = Project(name="p", data=DataConfig(train=[str(p) for p in paths],
                                                columns={"text": "question", "label": "intent"}))
    loaded = load_sources(project).examples["train"]
    assert len(loaded) == 30 and {(e.input, e.target) for e in loaded} == {(r["question"], r["intent"]) for r in rows}
    # Renamed to the task's own field names (task.text_field), whatever they are.
    task = TaskConfig(text_field="body")
    renamed = Project(name="p", task=task, data=DataConfig(train=[str(paths[2])], columns={"text": "question",
                                                                                         "label": "intent"}))
    assert len(load_sources(renamed).examples["train"]) == 6


def test_a_column_no_row_has_names_the_source_and_key(tmp_path):
    paths = _write_all_formats(tmp_path, [{"question": "q", "intent": "x"}])
    for path in paths:
        with pytest.raises(DataError) as info:
            read_rows(RowSource(str(path), (("label", "label", "category"),)))
        assert str(path) in info.value.line() and "data.columns.label" in info.value.line()
        assert "question, intent" in info.value.line() or "intent, question" in info.value.line()


def test_arrow_rows_are_numbered_and_bad_rows_located(tmp_path):
    rows = [{"text": "ok", "label": "x"}, {"text": None, "label": "y"}]
    path = _write_all_formats(tmp_path, [{"question": "q", "intent": "x"}])[3].with_name("bad.arrow")
    import pyarrow as pa

    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_file(path, table.schema) as w:
        w.write_table(table)
    with pytest.raises(DataError) as info:
        prepare_data(Project(name="p", data=DataConfig(train=path)))
    assert f"{path}:2" in info.value.line()
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match="cannot read Arrow file"):
        read_rows(tmp_path / "junk.arrow")


def test_a_table_naming_a_column_twice_is_refused_as_a_csv_header_is(tmp_path):
    """Arrow kept the last `label` column silently; Parquet failed with pyarrow's FieldRef message."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table([pa.array(["a", "b"]), pa.array(["x", "y"]), pa.array(["zzz", "zzz"])],
                     names=["text", "label", "label"])
    pq.write_table(table, tmp_path / "t.parquet")
    with pa.ipc.new_file(tmp_path / "t.arrow", table.schema) as w:
        w.write_table(table)
    for name in ("t.parquet", "t.arrow"):
        with pytest.raises(DataError) as info:
            read_rows(tmp_path / name)
        assert "the column 'label' appears twice" in info.value.line() and name in info.value.line()


def test_a_table_mixing_row_formats_reads_each_row_as_its_own_format(tmp_path):
    """A table gives every row every column (null where a row has none); each row still reads as the
    format it is, nested struct fields included (a message without `tool_calls` is no tool call)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "p", "completion": "c"},
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "v",
                                                             "tool_calls": [{"name": "f"}]}]},
            {"messages": [{"role": "user", "content": "u2"}, {"role": "assistant", "content": "v2"}]},
            {"instruction": "i", "output": "o"}]
    schema = pa.unify_schemas([pa.Table.from_pylist([r]).schema for r in rows])  # every row's columns
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "mixed.parquet")
    examples, problems = load_examples(tmp_path / "mixed.parquet", TaskConfig(type="chat"))
    assert problems == []
    assert [(e.input, e.target) for e in examples] == [("p", "c"), ("u", 'v\n[{"name": "f"}]'), ("u2", "v2"),
                                                       ("i", "o")]


# -- Hugging Face datasets, offline -----------------------------------------------------------------
def _save_dataset(folder: Path, rows: list[dict]) -> Path:
    import datasets

    datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]}).save_to_disk(str(folder))
    return folder


def test_saved_dataset_folder_loads_with_columns_and_row_numbers(tmp_path):
    rows = [{"question": f"q{i}", "intent": "x"} for i in range(3)] + [{"question": "", "intent": "y"}]
    folder = _save_dataset(tmp_path / "saved", rows)
    project = Project(name="p", data=DataConfig(train=[str(folder)], columns={"text": "question", "label": "intent"}))
    loaded = load_sources(project)
    assert [e.input for e in loaded.examples["train"]] == ["q0", "q1", "q2"]
    assert [(p.file, p.line) for p in loaded.problems] == [(str(folder), 4)]


def test_saved_dataset_dict_asks_for_one_split(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a"], "label": ["x"]})
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    path = _config(tmp_path, "  train: dd\n")
    message = _error(path)
    assert "several splits" in message and str(tmp_path / "dd" / "train") in message and "(data.train)" in message


def test_hf_reference_missing_from_cache_says_how_to_fetch(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    project = Project(name="p", data=DataConfig(train="hf://tunesmith-test/none:main/train"), source=None)
    with pytest.raises(DataError) as info:
        load_sources(project)
    line = info.value.line()
    assert "hf://tunesmith-test/none:main/train is not in the local Hugging Face datasets cache" in line
    assert "data.train" in line and "datasets.load_dataset('tunesmith-test/none', 'main', split='train')" in line
    assert "save_to_disk" in line


def test_hf_reference_is_read_offline_from_the_cache(tmp_path, monkeypatch):
    """load_dataset runs with offline mode on (nothing can be downloaded) and gets name, config, split."""
    import datasets
    import huggingface_hub.constants as hub

    before = (datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE)
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split, datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE))
        return datasets.Dataset.from_dict({"q": ["a", "b"], "y": ["x", "y"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    project = Project(name="p", data=DataConfig(train=["hf://org/set/validation"], columns={"text": "q", "label": "y"}))
    loaded = load_sources(project)
    assert calls == [("org/set", None, "validation", True, True)]
    assert [(e.input, e.target, e.line) for e in loaded.examples["train"]] == [("a", "x", 1), ("b", "y", 2)]
    assert (datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE) == before  # restored afterwards


def test_saved_dataset_trains_through_the_cli(tmp_path, tiny_model):
    from typer.testing import CliRunner

    from tunesmith.cli import app

    renamed = [[{"question": r["text"], "intent": r["label"]} for r in make_texts(n, seed)]
               for n, seed in ((30, 1), (9, 2))]
    _save_dataset(tmp_path / "hf-train", renamed[0])
    write_jsonl(tmp_path / "test.jsonl", renamed[1])  # data.columns applies to every source
    text = PROJECT.format(model=tiny_model, method="lora").replace(
        "  train: train.jsonl\n", "  train: hf-train\n  columns: {text: question, label: intent}\n")
    (tmp_path / "project.yaml").write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(tmp_path / "project.yaml"), "--out", str(out), "--quiet"])
    assert result.exit_code in (0, 3), result.output
    report = json.loads((out / "data" / "report.json").read_text())
    assert report["sources"]["train"][0]["rows_read"] == 30
    assert report["splits"]["train"]["rows"] + report["splits"]["validation"]["rows"] == 30
    assert (out / "model").is_dir() and "hf-train" in (out / "config.yaml").read_text()


def test_retrain_challenger_reads_its_own_files_without_the_champions_columns(tmp_path):
    from test_retrain import fake_champion, fill_log, traffic_rows
    from tunesmith.config import derive
    from tunesmith.pipeline.retrain import _write_inputs
    from tunesmith.pipeline.traffic import assemble

    run, project = fake_champion(tmp_path)
    project = derive(project, {"data.columns": {"text": "question", "label": "intent"},
                               "data.train": [{"path": str(tmp_path / "train.jsonl"), "weight": 2}],
                               "data.validation": [str(tmp_path / "test.jsonl")]})
    fill_log(tmp_path / "log.db", traffic_rows(20))
    challenger = _write_inputs(project, run, assemble(project, run, tmp_path / "log.db"), tmp_path / "inputs",
                               tmp_path / "log.db")
    # Written in the task's own field names: the champion's column mapping would find none of its columns.
    assert challenger.data.columns == {} and challenger.data.train == tmp_path / "inputs" / "train.jsonl"
    assert challenger.data.validation == tmp_path / "inputs" / "validation.jsonl"  # a given source: its rows kept
    assert len(prepare_data(challenger).train) > 0


# -- review fixes: glob characters in folder names, files in two roles, per-source columns --------------
def test_glob_under_a_folder_whose_name_has_glob_characters_reads_only_that_folder(tmp_path):
    """`[1]` in the config's folder is a name, not a pattern: proj[1]/data/*.jsonl must not match proj1/data."""
    (tmp_path / "proj1" / "data").mkdir(parents=True)
    write_jsonl(tmp_path / "proj1" / "data" / "a.jsonl", _rows(2, "other"))
    project_dir = tmp_path / "proj[1]"
    (project_dir / "data").mkdir(parents=True)
    path = project_dir / "p.yaml"
    path.write_text(HEAD + "  train: data/*.jsonl\n", encoding="utf-8")
    message = _error(path)
    assert "no data file matches data/*.jsonl" in message and "(data.train)" in message
    write_jsonl(project_dir / "data" / "b.jsonl", _rows(4, "mine"))
    project = load_config(path)
    assert project.data.train[0].files == [str(project_dir.resolve() / "data" / "b.jsonl")]
    assert {e.input.split()[0] for e in load_sources(project).examples["train"]} == {"mine"}
    # The saved config's pattern matches the same files when it is checked (and globbed) again.
    saved = project_dir / "saved.yaml"
    saved.write_text(dump_config(project), encoding="utf-8")
    assert load_config(saved).data.train[0].files == project.data.train[0].files
    # A plain missing file under such a folder is "not found", not "no file matches".
    path.write_text(HEAD + "  train:\n    - data/b.jsonl\n    - nowhere.jsonl\n", encoding="utf-8")
    assert "data file not found" in _error(path)


def test_one_file_in_two_roles_is_an_error_naming_both_keys(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", _rows(4, "a"))
    write_jsonl(tmp_path / "b.jsonl", _rows(4, "b"))
    path = _config(tmp_path, '  train: "*.jsonl"\n  test: a.jsonl\n')
    message = _error(path)
    assert "read twice: by data.train and by data.test" in message and f"{path}:4 (data.test)" in message
    path = _config(tmp_path, "  train: [b.jsonl]\n  validation:\n    - {path: a.jsonl}\n  test: [a.jsonl]\n")
    assert "by data.validation.0 and by data.test.0" in _error(path)
    os.link(tmp_path / "a.jsonl", tmp_path / "a-link.jsonl")  # one file under two names
    path = _config(tmp_path, "  train: a.jsonl\n  test: a-link.jsonl\n")
    assert "a-link.jsonl is read twice: by data.train and by data.test" in _error(path)


def test_held_out_weight_of_a_single_mapping_is_located_without_an_index(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", _rows(2, "a"))
    path = _config(tmp_path, "  train: a.jsonl\n  test: {path: b.jsonl, weight: 2}\n")
    message = _error(path)
    assert "training sources only" in message and "(data.test.weight)" in message and f"{path}:4 " in message


def test_a_row_without_a_mapped_column_names_the_column_and_data_columns(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "intent": "x"}, {"intent": "y"}])
    project = Project(name="p", data=DataConfig(train=[str(tmp_path / "a.jsonl")],
                                                columns={"text": "question", "label": "intent"}))
    [problem] = load_sources(project).problems
    assert problem.line == 2 and "missing field 'question'" in problem.reason
    assert "data.columns.text" in problem.reason and "fields present: intent" in problem.reason


def test_each_source_may_map_its_own_columns(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"question": f"a{i}", "intent": "x"} for i in range(3)])
    write_jsonl(tmp_path / "b.jsonl", [{"body": f"b{i}", "tag": "y"} for i in range(2)])
    write_jsonl(tmp_path / "c.jsonl", [{"text": "c0", "label": "x"}])
    path = _config(tmp_path, "  train:\n    - a.jsonl\n    - {path: b.jsonl, columns: {text: body, label: tag}}\n"
                             "    - {path: c.jsonl, columns: {}}\n  columns: {text: question, label: intent}\n")
    loaded = load_sources(load_config(path)).examples["train"]
    assert [(e.input, e.target) for e in loaded] == [("a0", "x"), ("a1", "x"), ("a2", "x"), ("b0", "y"),
                                                     ("b1", "y"), ("c0", "x")]
    assert "columns:" in dump_config(load_config(path))
    bad = [("    - {path: b.jsonl, columns: {text: body, intent: tag}}\n", "data.train.1.columns.intent",
            "not a field of a classification task"),
           ("    - {path: b.jsonl, columns: {text: ''}}\n", "data.train.1.columns.text", "must name a column"),
           ("    - {path: b.jsonl, columns: {text: x, label: x}}\n", "data.train.1.columns", "several fields")]
    for item, key, what in bad:
        path = _config(tmp_path, "  train:\n    - a.jsonl\n" + item)
        message = _error(path)
        assert what in message and f"({key})" in message and f"{path}:5 " in message, message
    with pytest.raises(DataError, match="data.train.1.columns.text names"):
        load_sources(Project(name="p", data=DataConfig(train=[str(tmp_path / "c.jsonl"), {
            "path": str(tmp_path / "b.jsonl"), "columns": {"text": "question"}}])))


def test_a_saved_dataset_dict_is_refused_by_the_reader_too(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a"], "label": ["x"]})
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="several splits") as info:
        read_rows(tmp_path / "dd")
    assert str(tmp_path / "dd" / "train") in info.value.line()


def _cache_dataset(cache: Path, name: str, splits: dict[str, list[dict]]) -> None:
    """Write a dataset into a Hugging Face datasets cache the way load_dataset caches a Hub dataset
    (NAME/CONFIG/VERSION/HASH with NAME-SPLIT.arrow), built from local JSON files without any network."""
    from datasets.packaged_modules.json.json import Json

    files = {split: str(write_jsonl(cache.parent / f"{name}-{split}.jsonl", rows)) for split, rows in splits.items()}
    builder = Json(cache_dir=str(cache), data_files=files, dataset_name=name, hash="0", config_id="default")
    builder.download_and_prepare()


def test_hf_reference_reads_a_real_offline_cache(tmp_path, monkeypatch):
    import datasets

    cache = tmp_path / "hf-cache"
    _cache_dataset(cache, "tunesmith_cached", {"train": [{"q": f"t{i}", "y": "x"} for i in range(3)],
                                               "validation": [{"q": "v0", "y": "y"}]})
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.chdir(tmp_path)
    project = Project(name="p", data=DataConfig(train="hf://tunesmith_cached/train",
                                                validation="hf://tunesmith_cached:default/validation",
                                                columns={"text": "q", "label": "y"}))
    loaded = load_sources(project)
    assert [(e.input, e.source) for e in loaded.examples["train"]] == [
        (f"t{i}", f"hf://tunesmith_cached/train:{i + 1}") for i in range(3)]
    assert [e.input for e in loaded.examples["validation"]] == ["v0"]
    # A local folder of the dataset's name would be read instead of the cache: refused, naming the key.
    (tmp_path / "tunesmith_cached").mkdir()
    write_jsonl(tmp_path / "tunesmith_cached" / "train.jsonl", [{"q": "local", "y": "x"}])
    with pytest.raises(DataError) as info:
        load_sources(project)
    line = info.value.line()
    assert "current directory has a folder 'tunesmith_cached'" in line and ", data.train," in line
    assert "give its path" in line


def test_offline_mode_stays_on_until_the_last_overlapping_reader_leaves():
    import threading

    import datasets

    from tunesmith.data.io import _offline

    before = datasets.config.HF_HUB_OFFLINE
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def reader_a():
        with _offline():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def reader_b():
        a_in.wait(10)
        with _offline():
            b_in.set()
            a_out.wait(10)
            seen["b_after_a_left"] = datasets.config.HF_HUB_OFFLINE

    threads = [threading.Thread(target=reader_a), threading.Thread(target=reader_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"b_after_a_left": True}
    assert datasets.config.HF_HUB_OFFLINE == before  # restored once both left
