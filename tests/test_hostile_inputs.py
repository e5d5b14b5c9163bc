"""Odd and hostile input found by a black-box probe of the CLI: each is refused with one located
`error:` line and exit 2 (or handled), never an internal error, a silent misreading or lost files."""

from __future__ import annotations

import datetime
import decimal
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import PROJECT, make_texts, write_jsonl
from tunesmith import fsio
from tunesmith.cli import app
from tunesmith.config import load_config
from tunesmith.data.io import read_rows
from tunesmith.data.normalize import dedup_text
from tunesmith.errors import ConfigError

runner = CliRunner()


def _project(tmp_path, model, extra: str = "", train_rows: list[dict] | None = None) -> str:
    write_jsonl(tmp_path / "train.jsonl", train_rows or make_texts(20, 1))
    write_jsonl(tmp_path / "test.jsonl", make_texts(9, 2))
    (tmp_path / "project.yaml").write_text(PROJECT.format(model=model, method="lora") + extra, encoding="utf-8")
    return str(tmp_path / "project.yaml")


def _error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


# --- config values -------------------------------------------------------------------------------

@pytest.mark.parametrize("old,new,key", [
    ("learning_rate: 0.01", "learning_rate: .inf", "train.learning_rate"),   # trained a NaN model that "passed"
    ("target: 0.0", "target: .nan", "objective.target"),
    ("max_steps: 6", "max_steps: true", "train.max_steps"),                  # was read as 1
    ("batch_size: 4", "batch_size: 4\n  lora: {dropout: false}", "train.lora.dropout"),
])
def test_non_finite_and_boolean_numbers_are_refused_at_their_key(tmp_path, tiny_model, old, new, key):
    config = _project(tmp_path, tiny_model)
    text = (tmp_path / "project.yaml").read_text().replace(old, new)
    (tmp_path / "project.yaml").write_text(text)
    line = _error(runner.invoke(app, ["data", "check", config]))
    assert f"'{key}'" in line and f"({key})" in line


def test_a_key_given_twice_is_refused_at_the_second(tmp_path, tiny_model):
    config = _project(tmp_path, tiny_model)
    text = (tmp_path / "project.yaml").read_text().replace("max_steps: 6", "max_steps: 6\n  max_steps: 0")
    (tmp_path / "project.yaml").write_text(text)
    second = text.splitlines().index("  max_steps: 0") + 1
    line = _error(runner.invoke(app, ["data", "check", config]))
    assert f"the key 'max_steps' is given twice (first on line {second - 1})" in line and f"{config}:{second}" in line


def test_a_type_error_names_the_key_not_pydantics_union_branches(tmp_path, tiny_model):
    config = _project(tmp_path, tiny_model)
    (tmp_path / "project.yaml").write_text((tmp_path / "project.yaml").read_text().replace(
        "train: train.jsonl", "train: null"))
    line = _error(runner.invoke(app, ["data", "check", config]))
    assert "invalid value for 'data.train':" in line and "[" not in line.split(":")[1]


@pytest.mark.parametrize("labels,problem", [
    ('[alpha, beta, gamma, ""]', "a label is empty"),
    ("[alpha, alpha, beta, gamma]", "the label 'alpha' is listed twice"),
])
def test_task_labels_must_be_distinct_and_non_empty(tmp_path, tiny_model, labels, problem):
    config = _project(tmp_path, tiny_model)
    (tmp_path / "project.yaml").write_text((tmp_path / "project.yaml").read_text().replace(
        'instruction: "Classify."', f'instruction: "Classify."\n  labels: {labels}'))
    assert problem in _error(runner.invoke(app, ["data", "check", config]))


def test_data_check_holds_rows_to_task_labels_as_run_does(tmp_path, tiny_model):
    config = _project(tmp_path, tiny_model)
    (tmp_path / "project.yaml").write_text((tmp_path / "project.yaml").read_text().replace(
        'instruction: "Classify."', 'instruction: "Classify."\n  labels: [alpha, beta]'))
    result = runner.invoke(app, ["data", "check", config])
    first_gamma = next(i for i, r in enumerate(make_texts(20, 1), start=1) if r["label"] == "gamma")
    assert result.exit_code == 2 and f"train.jsonl:{first_gamma}: label 'gamma' is not in task.labels" in result.output


def test_near_dedup_ngram_below_one_is_refused(tmp_path, tiny_model):
    config = _project(tmp_path, tiny_model)
    text = (tmp_path / "project.yaml").read_text().replace(
        "validation: 0.2", "validation: 0.2\n  clean: {near_dedup: {ngram: 0}}")
    (tmp_path / "project.yaml").write_text(text)
    assert "data.clean.near_dedup.ngram" in _error(runner.invoke(app, ["data", "check", config]))


# --- data files ----------------------------------------------------------------------------------

def test_csv_with_a_column_named_twice_is_refused_at_the_header(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("text,label,label\nhello,alpha,zzz\n")
    with pytest.raises(Exception) as info:
        read_rows(path)
    assert "the column 'label' appears twice in the header" in str(info.value) and info.value.where == f"{path}:1"


def test_csv_quote_left_open_is_a_row_problem_not_merged_rows(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('text,label\nfine,beta\n"unterminated,alpha\n"ok",beta\n')
    result = read_rows(path)
    assert [r.line for r in result.rows] == [2]
    assert [(p.line, "quote left open" in p.reason) for p in result.problems] == [(3, True)]


def test_csv_cell_longer_than_the_csv_modules_default_limit_is_read(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('text,label\n"' + "long document " * 20_000 + '",alpha\n')
    result = read_rows(path)
    assert not result.problems and len(result.rows[0].record["text"]) == 14 * 20_000


def test_texts_without_letters_are_not_all_one_duplicate():
    keys = [dedup_text(t) for t in ["😀😀", "😡😡", "👍", "!!!", "???"]]
    assert len(set(keys)) == 5
    assert dedup_text("Hello, World!") == dedup_text("hello world") and dedup_text("!!!") == dedup_text("!!!")


def test_columnar_values_json_cannot_write_are_written(tmp_path):
    # A Parquet row with a timestamp column used to crash writing removed.jsonl, after the splits.
    row = {"ts": datetime.datetime(2020, 1, 1, 12, 30), "d": datetime.date(2020, 1, 2),
           "price": decimal.Decimal("1.10"), "blob": b"\x00\xff", "gap": datetime.timedelta(seconds=90)}
    fsio.write_jsonl(tmp_path / "rows.jsonl", [row])
    assert json.loads((tmp_path / "rows.jsonl").read_text()) == {
        "ts": "2020-01-01T12:30:00", "d": "2020-01-02", "price": "1.10", "blob": "AP8=", "gap": 90.0}


def test_parquet_timestamp_column_with_removed_rows_cleans(tmp_path, tiny_model):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = make_texts(20, 1) + [make_texts(20, 1)[0]]  # one exact duplicate: removed.jsonl gets a row
    table = pa.table({"text": [r["text"] for r in rows], "label": [r["label"] for r in rows],
                      "ts": [datetime.datetime(2020, 1, 1)] * len(rows)})
    pq.write_table(table, tmp_path / "train.parquet")
    config = _project(tmp_path, tiny_model)
    (tmp_path / "project.yaml").write_text((tmp_path / "project.yaml").read_text().replace(
        "train: train.jsonl", "train: train.parquet"))
    result = runner.invoke(app, ["data", "clean", config, "--out", str(tmp_path / "clean")])
    assert result.exit_code == 0, result.output
    removed = fsio.read_jsonl(tmp_path / "clean" / "removed.jsonl")
    assert removed and removed[0]["ts"] == "2020-01-01T00:00:00"


def test_a_label_longer_than_max_length_is_a_config_error(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    from tunesmith.tasks.prompts import build_format

    project = load_config(_project(tmp_path, tiny_model))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    build_format(project.task, ["alpha", "beta " * 100], tokenizer)  # long, and still fits 512
    with pytest.raises(ConfigError) as info:
        build_format(project.task, ["alpha", "beta " * 600], tokenizer)
    assert "leaving no room for a prompt in task.max_length (512)" in info.value.line()
    assert info.value.where == "task.max_length"


# --- training and run folders --------------------------------------------------------------------

def test_a_diverging_loss_stops_training_naming_the_learning_rate(tmp_path, tiny_model):
    config = _project(tmp_path, tiny_model)
    (tmp_path / "project.yaml").write_text((tmp_path / "project.yaml").read_text().replace(
        "learning_rate: 0.01", "learning_rate: 1.0e+30"))
    line = _error(runner.invoke(app, ["train", config, "--out", str(tmp_path / "run")]))
    assert "training diverged: the loss is nan" in line and "train.learning_rate" in line
    assert not (tmp_path / "run").exists()


def test_overwrite_never_replaces_a_run_the_project_reads_data_from(tmp_path, tiny_model):
    config = _project(tmp_path, tiny_model)
    run = tmp_path / "old-run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "tunesmith.json").write_text("{}")
    (tmp_path / "train.jsonl").rename(run / "mine.jsonl")
    (tmp_path / "project.yaml").write_text((tmp_path / "project.yaml").read_text().replace(
        "train: train.jsonl", "train: old-run/mine.jsonl"))
    line = _error(runner.invoke(app, ["run", config, "--out", str(run), "--overwrite"]))
    assert f"the project reads {run / 'mine.jsonl'}, inside the run directory it would replace" in line
    assert sorted(p.name for p in run.iterdir()) == ["mine.jsonl", "model"]


@pytest.mark.parametrize("command", [["run"], ["data", "clean"]])
def test_out_below_a_file_is_refused(tmp_path, tiny_model, command):
    config = _project(tmp_path, tiny_model)
    (tmp_path / "afile").write_text("mine")
    line = _error(runner.invoke(app, [*command, config, "--out", str(tmp_path / "afile" / "sub")]))
    assert f"cannot be created: {tmp_path / 'afile'} is not a folder" in line
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("command", [["run"], ["data", "clean"]])
def test_out_where_no_folder_can_be_made_is_refused_before_any_work(tmp_path, tiny_model, command):
    # /proc passes a permission check for root yet refuses every mkdir: only making one tells.
    config = _project(tmp_path, tiny_model)
    line = _error(runner.invoke(app, [*command, config, "--out", "/proc/tunesmith-out"]))
    # root passes the permission check and is refused by the probe; anyone else by the permission check
    assert any(f"cannot be created: /proc {why}" in line for why in ("does not take new folders", "is not writable"))
    assert fsio.uncreatable(tmp_path / "new" / "deeper") is None
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".tunesmith-probe-*"))


def test_run_jsonl_with_bytes_that_are_not_utf8_is_named_at_its_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": "\xff\xfe"}\n')
    with pytest.raises(fsio.DamagedFile, match=r"not UTF-8: byte 0xff; .*rows.jsonl:3"):
        fsio.read_jsonl(path)  # was a UnicodeDecodeError: an internal error in export, optimize and audit
    path.write_bytes(b'{"a": NaN, "b": -Infinity}\n')  # not standard JSON, written before commit c36c4b8
    assert fsio.read_jsonl(path) == [{"a": None, "b": None}]  # read as no figure, never as one


def test_a_damaged_run_file_is_bad_input_naming_it(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "tunesmith.json").write_text("{}")
    (run / "summary.json").write_text("[1")
    line = _error(runner.invoke(app, ["runs", "show", str(run)]))
    assert line.startswith("error: not valid JSON") and f"{run / 'summary.json'}:1" in line


def test_a_json_array_file_is_read_as_rows_at_their_lines(tmp_path):
    path = tmp_path / "alpaca_data.json"
    rows = [{"instruction": "Say hi", "input": "", "output": "hi"},
            {"instruction": "Add", "input": "1+1", "output": "2"}]
    path.write_text("\ufeff" + json.dumps(rows, indent=4), encoding="utf-8")
    result = read_rows(path)
    assert [(r.line, r.record) for r in result.rows] == [(2, rows[0]), (7, rows[1])] and not result.problems
    path.write_text('[\n {"a": 1},\n {"a": 2}\n {"a": 3}]')
    result = read_rows(path)
    assert [r.line for r in result.rows] == [2, 3] and [(p.line, p.reason) for p in result.problems] == [
        (4, "invalid JSON: expected ',' or ']' after an element")]
    path.write_text('[\n {"a": 1},\n {"a": 2},\n]\n')  # json.load refuses a trailing comma; so do we
    result = read_rows(path)
    assert [r.line for r in result.rows] == [2, 3] and [(p.line, p.reason) for p in result.problems] == [
        (4, "invalid JSON: a comma before ']' (trailing commas are not JSON)")]
    path.write_text('[\n {"a": 1}\n]\n\n{"b": 2}\n')  # the line of the trailing text, not of the ']'
    result = read_rows(path)
    assert [r.line for r in result.rows] == [2] and [(p.line, p.reason) for p in result.problems] == [
        (5, "text after the array's end")]


def test_a_jsonl_file_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('\ufeff{"text": "x", "label": "y"}\n', encoding="utf-8")
    result = read_rows(path)
    assert [r.record for r in result.rows] == [{"text": "x", "label": "y"}] and not result.problems


def test_an_error_line_is_one_line_whatever_the_library_said():
    from tunesmith.errors import DataError

    assert "\n" not in DataError("cannot read Parquet file: bad\nmagic bytes", "x.parquet").line()
    from tunesmith.errors import ModelError

    said = ModelError("cannot read GGUF file x.gguf: it is not a GGUF file.", "--candidates x.gguf", "check it").line()
    assert said == "error: cannot read GGUF file x.gguf: it is not a GGUF file, --candidates x.gguf, check it"
    assert ModelError("cut short...", "model").line() == "error: cut short..., model"


@pytest.mark.parametrize("meta,problem", [
    ({"x": 1}, "lacks 'method'"),
    ([1], "is not a JSON object"),
    ({"method": "magic", "kind": "adapter", "model": "m", "base_model_path": "/m"}, "unknown method 'magic'"),
])
def test_edited_model_metadata_is_a_run_error_naming_the_file(tmp_path, meta, problem):
    from tunesmith.errors import RunDirError
    from tunesmith.train.finetuned import read_meta

    (tmp_path / "tunesmith.json").write_text(json.dumps(meta))
    with pytest.raises(RunDirError) as info:
        read_meta(tmp_path)
    assert problem in info.value.what and info.value.where == str(tmp_path / "tunesmith.json")


def test_a_data_path_that_is_a_link_loop_is_refused_by_name(tmp_path, tiny_model):
    config = _project(tmp_path, tiny_model)
    (tmp_path / "test.jsonl").unlink()
    (tmp_path / "test.jsonl").symlink_to(tmp_path / "test.jsonl")  # Path.resolve(): RuntimeError, not OSError
    line = _error(runner.invoke(app, ["data", "check", config]))
    assert "symbolic link loop" in line and str(tmp_path / "test.jsonl") in line and "internal" not in line
    assert "data.test" in line and "project.yaml:" in line  # the key, at its line
    (tmp_path / "test.jsonl").unlink()
    (tmp_path / "test.jsonl").symlink_to(tmp_path / "gone.jsonl")  # dangling: the file it names is missing
    assert f"data file not found: {tmp_path / 'gone.jsonl'}" in _error(runner.invoke(app, ["data", "check", config]))


@pytest.mark.parametrize("error,says", [
    (PermissionError(13, "Permission denied", "/data/train.jsonl"), "error: permission denied, /data/train.jsonl, "),
    (IsADirectoryError(21, "Is a directory", "/out/results.json"),
     "error: a folder where a file is expected, /out/results.json, "),
    (OSError(30, "Read-only file system", "/ro/log.db"), "error: the file system is read-only, /ro/log.db, "),
])
def test_a_path_the_file_system_refuses_is_bad_input_naming_it(error, says, capsys):
    """Running as root, a chmod 000 file is readable: the CLI's handling is checked on the error itself."""
    import typer

    from tunesmith.cli.common import guarded

    def fail() -> int:
        raise error
    with pytest.raises(typer.Exit) as info:
        guarded(False, fail)
    err = capsys.readouterr().err
    assert info.value.exit_code == 2 and err.startswith(says) and err.count("\n") == 1, err
    with pytest.raises(typer.Exit) as info:  # an OSError naming no path stays an internal error
        guarded(False, lambda: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    assert info.value.exit_code == 1
    with pytest.raises(typer.Exit) as info:  # a broken pipe of the work itself, stdout fine: a bug, said
        guarded(False, lambda: (_ for _ in ()).throw(BrokenPipeError(32, "Broken pipe")))
    assert info.value.exit_code == 1 and "internal error: BrokenPipeError" in capsys.readouterr().err


def test_a_fifo_as_data_is_refused_unread(tmp_path, tiny_model):
    import os

    config = _project(tmp_path, tiny_model)
    (tmp_path / "train.jsonl").unlink()
    os.mkfifo(tmp_path / "train.jsonl")  # reading it would wait for a writer forever
    line = _error(runner.invoke(app, ["data", "check", config]))
    assert f"{tmp_path / 'train.jsonl'} is not a regular file" in line and "(data.train)" in line


@pytest.mark.parametrize("method,row,problem", [
    ("dpo", {"prompt": "q", "completion": "c", "label": True}, "not a preference row (a KTO row has no rejected"),
    ("lora", {"prompt": "q", "completion": "c", "label": False}, "train.method lora would learn a completion labelled"),
    ("kto", {"prompt": "q", "completion": "c", "label": 1}, "not a preference row"),  # 1 is no KTO label
])
def test_data_check_refuses_rows_the_method_cannot_train_as_run_does(tmp_path, tiny_model, method, row, problem):
    from conftest import GEN_PROJECT

    rows = [{"prompt": f"card {i}", "chosen": "alpha", "rejected": "beta"} for i in range(10)]
    if method == "lora":
        rows = [{"prompt": f"card {i}", "completion": "alpha"} for i in range(10)]
    write_jsonl(tmp_path / "train.jsonl", rows + [row])
    write_jsonl(tmp_path / "test.jsonl", rows[:3])
    config = tmp_path / "p.yaml"
    config.write_text(GEN_PROJECT.format(name="p", model=tiny_model, method=method, steps=2, new_tokens=2))
    result = runner.invoke(app, ["data", "check", str(config)])
    assert result.exit_code == 2 and f"train.jsonl:11: {problem}" in result.output, result.output
    if method == "kto":  # the row has a label: the message says what a KTO label must be
        assert "label true or false: a JSON boolean, or the text true/false in a CSV" in result.output


def _strict_json(text: str):
    """json.loads as every non-Python reader does it: a bare NaN or Infinity is an error."""
    def refuse(name):
        raise ValueError(f"bare {name} in JSON")
    return json.loads(text, parse_constant=refuse)


def test_json_tunesmith_writes_has_no_bare_nan_or_infinity(tmp_path):
    import numpy as np
    import torch

    from tunesmith.train.trainer import TrainLog

    figures = {"loss": float("nan"), "ci": [float("-inf"), 1.5], "np": np.float32("nan"),
               "t": torch.tensor([1.0, float("inf")]), "ok": 0.25}
    fsio.write_json(tmp_path / "m.json", figures)
    fsio.write_jsonl(tmp_path / "m.jsonl", [figures])
    log = TrainLog(tmp_path / "train_log.jsonl")
    log.write({"step": 1, "val_loss": float("nan")})
    log.close()
    expected = {"loss": None, "ci": [None, 1.5], "np": None, "t": [1.0, None], "ok": 0.25}
    assert _strict_json((tmp_path / "m.json").read_text()) == expected
    assert _strict_json((tmp_path / "m.jsonl").read_text()) == expected
    assert _strict_json((tmp_path / "train_log.jsonl").read_text()) == {"step": 1, "val_loss": None}


def test_agreement_of_raters_who_share_no_pair_is_stated_not_nan():
    from tunesmith.evaluate.human import agreement

    for raters in ({"ann": {"p1": "one"}, "bob": {"p2": "two"}},
                   {"ann": {"p1": "one"}, "bob": {"p2": "two"}, "cy": {"p1": "tie"}}):
        out = agreement(raters)
        assert out["statistic"] is None and out["pairs"] == 0 and "no pair was rated by every rater" in out["note"]
        _strict_json(json.dumps(out))


def test_texts_with_unicode_line_separators_survive_a_jsonl_round_trip(tmp_path):
    # json writes U+2028, U+2029 and U+0085 unescaped; str.splitlines() would cut a row at each
    rows = [{"input": "one\u2028two", "target": "a\x85b\u2029c", "source": "x:1"}, {"input": "plain"}]
    fsio.write_jsonl(tmp_path / "rows.jsonl", rows)
    assert fsio.read_jsonl(tmp_path / "rows.jsonl") == rows


@pytest.mark.parametrize("damage,says", [("config", "cannot load the tokenizer from"),
                                         ("tokenizer", "cannot load the tokenizer from")])
def test_a_base_model_folder_that_cannot_give_a_tokenizer_is_bad_input(tmp_path, tiny_model, damage, says):
    """A config.json that is not JSON, or no tokenizer files, was `internal error` (exit 1) over five lines."""
    import shutil

    from tunesmith.errors import ModelError
    from tunesmith.models.load import load_tokenizer

    folder = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    if damage == "config":
        (folder / "config.json").write_text("{not json")
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink()
    with pytest.raises(ModelError) as info:
        load_tokenizer(folder)
    line = info.value.line()
    assert says in line and "\n" not in line and ", model," in line


def test_a_model_name_that_is_no_regular_file_or_too_long_is_a_model_error(tmp_path):
    """A .gguf link to /dev/zero was "not found" (it is there); a name past the file system's limits was an
    internal OSError."""
    from tunesmith.errors import ModelError
    from tunesmith.models.resolve import resolve_model

    (tmp_path / "zero.gguf").symlink_to("/dev/zero")
    for name, said in ((str(tmp_path / "zero.gguf"), "GGUF file is not a regular file"),
                       (str(tmp_path / "gone.gguf"), "GGUF file not found"),
                       ("a" * 300, "unknown model '" + "a" * 80 + "...' (File name too long)")):
        with pytest.raises(ModelError, match="model") as info:
            resolve_model(name)
        assert said in info.value.what and len(info.value.line()) < 400, info.value.line()
