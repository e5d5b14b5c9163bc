"""A black-box probe of the commands that read a finished run (eval, report, export, human, data --out):
damaged run folders and odd output paths are one located `error:` line and exit 2, never an internal
error, a hub lookup, or a user's file or a run's file replaced."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import one_error as _error
from tunesmith.cli import app
from tunesmith.data.prepare import load_splits

runner = CliRunner()
LINUX_PROC = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")


# --- report --compare --out ----------------------------------------------------------------------

@pytest.mark.parametrize("victim", ["model/adapter_model.safetensors", "summary.json", "../project.yaml"])
def test_compare_page_never_replaces_a_file_that_is_not_one(run, victim):
    target = (run / victim).resolve()
    before = target.read_bytes()
    line = _error(runner.invoke(app, ["report", "--compare", str(run), str(run), "--out", str(target)]))
    assert "exists and is not an earlier comparison page; left untouched" in line
    assert target.read_bytes() == before


def test_compare_page_replaces_its_own_earlier_page(run):
    page = run / "compare.html"
    for _ in range(2):
        result = runner.invoke(app, ["report", "--compare", str(run), str(run), "--out", str(page)])
        assert result.exit_code == 0, result.output
        assert "A and B are the same run" in result.stderr
    assert "<!-- tunesmith report --compare -->" in page.read_text()


@pytest.mark.parametrize("out,problem", [
    ("folder", "exists and is not a plain file"),
    ("afile/x.html", "is not a folder"),
    pytest.param("/proc/x.html", "does not take new files", marks=LINUX_PROC),
])
def test_compare_page_out_that_cannot_be_written_is_refused(run, tmp_path, out, problem):
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("mine")
    target = out if out.startswith("/") else str(tmp_path / out)
    assert problem in _error(runner.invoke(app, ["report", "--compare", str(run), str(run), "--out", target]))
    assert (tmp_path / "afile").read_text() == "mine" and not list((tmp_path / "folder").iterdir())


def test_compare_page_goes_nowhere_inside_a_runs_folders_and_reads_both_configs(run):
    inside = str(run / "model" / "c.html")
    line = _error(runner.invoke(app, ["report", "--compare", str(run), str(run), "--out", inside]))
    assert f"is inside the run directory {run.resolve()}" in line and not (run / "model" / "c.html").exists()
    config = run / "config.yaml"
    config.write_text(re.sub(r"^  learning_rate: .*$", "  learning_rate: fast", config.read_text(), count=1,
                             flags=re.M))
    line = _error(runner.invoke(app, ["report", "--compare", str(run), str(run), "--out", str(run / "c.html")]))
    assert f"{config}:" in line and "train.learning_rate" in line and not (run / "c.html").exists()


def test_report_of_one_run_says_out_goes_with_compare(run, tmp_path):
    line = _error(runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "x.html")]))
    assert "--out" in line and "goes with --compare only" in line


def test_report_of_a_path_that_is_no_run_says_so_not_run_eval(run, tmp_path):
    assert "error: not found" in _error(runner.invoke(app, ["report", str(tmp_path / "typo")]))
    for path in (tmp_path, run / "config.yaml"):
        assert "not a tunesmith run directory" in _error(runner.invoke(app, ["report", str(path)]))
    shutil.rmtree(run / "model")  # weights deleted to save space: the report needs none
    assert runner.invoke(app, ["report", str(run)]).exit_code == 0
    (run / "summary.json").unlink()  # a run not evaluated: that is what it says then
    assert "the run has not been evaluated" in _error(runner.invoke(app, ["report", str(run)]))


# --- data --out into a run -----------------------------------------------------------------------

@pytest.mark.parametrize("command", ["clean", "split"])
def test_data_commands_never_replace_a_runs_curated_splits(run, command):
    before = {p.name: p.read_bytes() for p in (run / "data").iterdir()}
    line = _error(runner.invoke(app, ["data", command, str(run.parent / "project.yaml"), "--out", str(run / "data")]))
    assert f"is inside the run directory {run}" in line
    assert {p.name: p.read_bytes() for p in (run / "data").iterdir()} == before
    (run.parent / "link").symlink_to(run / "data")
    config = str(run.parent / "project.yaml")
    line = _error(runner.invoke(app, ["data", command, config, "--out", str(run.parent / "link")]))
    assert f"is inside the run directory {run}" in line
    assert {p.name: p.read_bytes() for p in (run / "data").iterdir()} == before


def test_data_out_beside_a_run_through_dot_dot_is_fine(run):
    result = runner.invoke(app, ["data", "split", str(run.parent / "project.yaml"), "--out", str(run / ".." / "clean")])
    assert result.exit_code == 0, result.output
    assert (run.parent / "clean" / "train.jsonl").is_file()


# --- damaged model folders -----------------------------------------------------------------------

def test_a_missing_adapter_file_is_named_not_looked_up_on_a_hub(run):
    (run / "model" / "adapter_model.safetensors").unlink()
    for command in (["eval", str(run), "--quiet"], ["export", str(run), "--out", str(run.parent / "x")]):
        line = _error(runner.invoke(app, command))
        assert "the adapter folder lacks adapter_model.safetensors" in line and str(run / "model") in line


@pytest.mark.parametrize("name,content", [
    ("prompt.json", '{"task_type": 5}'),
    ("adapter_config.json", '{"r": "x"}'),
    ("adapter_model.safetensors", "truncated"),
])
def test_a_damaged_model_file_is_a_run_error_naming_the_model_folder(run, name, content):
    (run / "model" / name).write_text(content)
    line = _error(runner.invoke(app, ["eval", str(run), "--quiet"]))
    assert "the model folder could not be read" in line or "lacks" in line or (
        name == "prompt.json" and "not what tunesmith wrote (no field 'instruction'" in line)
    assert str(run / "model") in line


def _set_json(path: Path, key: str, value) -> None:
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("edit, says", [
    (lambda m: _set_json(m / "tunesmith.json", "kind", "full"),
     "says kind 'full', but its method lora saves 'adapter' weights"),
    (lambda m: (m / "chat_template.jinja").write_text("{{ ok }}\n{% for x in %}"),
     "the chat template does not parse"),
    (lambda m: _set_json(m / "prompt.json", "labels", []), "field 'labels' is empty"),
    (lambda m: _set_json(m / "adapter_config.json", "r", 4),
     "the weights do not fit the model's adapter_config.json or config.json (size mismatch for"),
])
def test_a_model_folder_edited_out_of_step_is_one_error_line_not_an_internal_error(run, edit, says):
    """An edited kind was an AttributeError, a broken chat template a TemplateSyntaxError (exit 1), empty
    labels an export failing on agreement, an edited rank 421 lines of load_state_dict's message."""
    edit(run / "model")
    line = _error(runner.invoke(app, ["eval", str(run), "--quiet"]))
    assert says in line and str(run / "model") in line, line
    if "chat template" in says:
        assert f"{run / 'model' / 'chat_template.jinja'}:2" in line


def _rewrite_adapter(run: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = run / "model" / "adapter_model.safetensors"
    save_file(edit(load_file(str(path))), str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("edit, says", [
    (lambda t: {f"renamed.{i}": v for i, v in enumerate(t.values())},
     "the adapter weights do not match adapter_config.json: 28 of the adapter's 28 tensors are missing"),
    (lambda t: dict(list(t.items())[1:]), "1 of the adapter's 28 tensors are missing (first: base_model."),
    (lambda t: {**t, "base_model.model.model.extra.lora_A.weight": next(iter(t.values())).clone()},
     "it holds 1 tensors the adapter has no place for (first: base_model.model.model.extra.lora_A.weight)"),
    (lambda t: {k: v * float("nan") if i == 3 else v for i, (k, v) in enumerate(t.items())},
     "the adapter weights hold NaN or infinite values (first in base_model."),
])
def test_adapter_weights_peft_would_skip_or_that_are_not_finite_are_refused(run, edit, says):
    """PEFT loads the tensors whose names it knows and skips the rest without a word: renamed weights
    were scored, reported and exported as the fine-tuned model while the adapter stayed at its start
    (the base model); NaN weights passed eval answering one label for every row."""
    _rewrite_adapter(run, edit)
    for command in (["eval", str(run), "--quiet"], ["export", str(run), "--out", str(run.parent / "x")]):
        line = _error(runner.invoke(app, command))
        assert says in line and str(run / "model" / "adapter_model.safetensors") in line, line
    assert not (run.parent / "x").exists()


@pytest.mark.parametrize("damage, says", [("drop", "lacks 1 of the model's weights (first: model.layers.0."),
                                          ("nan", "the model's weights hold NaN or infinite values")])
def test_a_full_model_with_a_weight_missing_or_not_finite_is_refused(tiny_model, tmp_path, damage, says):
    """transformers fills a missing weight with random values and goes on (a log line); NaN weights predict."""
    from safetensors.torch import load_file, save_file

    from tunesmith.errors import ModelError, RunDirError
    from tunesmith.train.methods import full

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    weights = load_file(str(folder / "model.safetensors"))
    name = next(k for k in sorted(weights) if "layers.0.self_attn.q_proj" in k)
    if damage == "drop":
        del weights[name]
    else:
        weights[name] = weights[name] * float("nan")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises((ModelError, RunDirError)) as info:
        full.load(None, folder)
    assert says in info.value.line() and str(folder) in info.value.line(), info.value.line()
    assert full.load(None, tiny_model) is not None  # the intact checkpoint loads


def test_serve_of_a_run_whose_monitor_folder_is_a_file_is_one_error_line_keeping_the_file(run):
    """mkdir of the request log's folder raised FileExistsError: exit 1, `internal error`."""
    from conftest import free_port

    (run / "monitor").write_text("user data")
    line = _error(runner.invoke(app, ["serve", str(run), "--port", str(free_port())]))
    assert "the request log's folder cannot be used or made" in line and f"{run / 'monitor'} is not a folder" in line
    assert (run / "monitor").read_text() == "user data"


def test_markup_edited_into_a_runs_figures_is_escaped_in_the_rebuilt_report(run):
    """The training figures' names and the split table's cells went into report.html unescaped."""
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["train"]["<i>x</i>"] = "<b>y</b>"
    (run / "metrics.json").write_text(json.dumps(metrics))
    data = json.loads((run / "data" / "report.json").read_text())
    data["splits"]["<u>s</u>"] = {"rows": 3, "chars_median": "<s>3</s>"}
    data["curation"]["removed_by_reason"]["exact_duplicate"] = "<i>1</i>"
    data["curation"]["suspected_label_errors"] = "<b>2</b>"
    data["curation"]["steps"][0]["rows_changed"] = "<u>0</u>"
    (run / "data" / "report.json").write_text(json.dumps(data))
    metrics["comparison"][next(iter(metrics["comparison"]))]["test"] = "<s>mcnemar</s>"
    metrics["finetuned"]["<b>f</b>"] = 1.0
    (run / "metrics.json").write_text(json.dumps(metrics))
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    page = (run / "report.html").read_text()
    assert not re.search(r"<(i|b|u|s)>", page) and "&lt;i&gt;x&lt;/i&gt;" in page and "&lt;s&gt;3" in page


def test_a_chat_template_with_transformers_extensions_still_loads(run):
    """The parse check uses transformers' own compiler: {% break %} (loopcontrols) and {% generation %}
    are valid templates, refused by a plain jinja2 Environment."""
    from tunesmith.models.load import load_tokenizer

    (run / "model" / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] }}{% break %}{% endfor %}{% generation %}!{% endgeneration %}")
    tokenizer = load_tokenizer(run / "model")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi!"


def test_a_missing_prompt_json_is_named_by_promote(run, tmp_path, monkeypatch):
    """promote (and rollback, through the same reader) said `internal error: FileNotFoundError`."""
    monkeypatch.setenv("TUNESMITH_REGISTRY", str(tmp_path / "registry.sqlite"))
    (run / "model" / "prompt.json").unlink()
    line = _error(runner.invoke(app, ["promote", str(run), "--name", "champ"]))
    assert "not what tunesmith wrote (the file is missing" in line and str(run / "model" / "prompt.json") in line


@pytest.mark.parametrize("name,says", [("tokenizer_config.json", "has no end-of-sequence or padding token"),
                                       ("tokenizer.json", "cannot load the tokenizer from")])
def test_a_model_folder_without_its_tokenizer_is_never_promoted(run, tmp_path, monkeypatch, name, says):
    """Without tokenizer_config.json the tokenizer loads with no EOS and no pad token: promote accepted
    it, a server following the registry swapped to it and answered every request with a 500."""
    monkeypatch.setenv("TUNESMITH_REGISTRY", str(tmp_path / "registry.sqlite"))
    (run / "model" / name).unlink()
    line = _error(runner.invoke(app, ["promote", str(run), "--name", "champ"]))
    assert says in line and str(run / "model") in line
    if name == "tokenizer_config.json":
        assert says in _error(runner.invoke(app, ["eval", str(run), "--quiet"]))


# --- damaged run files ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,content,command,expected", [
    ("summary.json", "[]", "eval", "not what tunesmith wrote (an object expected, found list"),
    ("metrics.json", "[1, 2]", "report", "not what tunesmith wrote (an object expected, found list"),
    ("metrics.json", None, "report", "the evaluated run lacks metrics.json"),
    ("predictions/test.jsonl", None, "report", "the evaluated run lacks predictions/test.jsonl"),  # was exit 0
    ("predictions/test.jsonl", None, "optimize", "the evaluated run lacks predictions/test.jsonl"),
    ("train_log.jsonl", '{"step": 1}\n{bad\n', "report", "train_log.jsonl:2"),
    ("data/test.jsonl", '{"input": "a", "tar', "eval", "test.jsonl:1"),
    ("data/test.jsonl", "", "eval", "no test row to score: the curated test split is empty"),
    ("data/test.jsonl", '{"input": "a"}\n', "eval", "not a curated row"),
])
def test_a_damaged_run_file_is_bad_input_naming_it(run, name, content, command, expected):
    if name.startswith("data/"):  # a report.json without digests or row counts: the rows themselves are read
        report = json.loads((run / "data" / "report.json").read_text())
        for split in report["splits"].values():
            del split["sha256"], split["rows"]
        (run / "data" / "report.json").write_text(json.dumps(report))
    if content is None:
        (run / name).unlink()
    else:
        (run / name).write_text(content)
    args = [command, str(run)] + (["--quiet"] if command == "eval" else [])
    line = _error(runner.invoke(app, args))
    assert expected in line and (run / name.split("/")[-1]).name in line
    assert (run / "model" / "adapter_model.safetensors").is_file()  # the trained model is never touched


@pytest.mark.parametrize("edit", [
    lambda o: o.update(met="false"),                                  # a truthy string: read as MET
    lambda o: o["criteria"][0].update(met="false"),
    lambda o: o["criteria"][0].update(value="lots"),
])
def test_an_edited_verdict_is_never_shown_as_met(run, finished, edit):
    """`runs show`, `report`, `report --compare` and `runs diff` printed "objective MET" for a hand-edited
    `"met": "false"` (promote refused it): every reader checks the verdict as eval writes it."""
    summary = json.loads((run / "summary.json").read_text())
    edit(summary["objective"])
    (run / "summary.json").write_text(json.dumps(summary))
    for args in (["runs", "show", str(run)], ["report", str(run)], ["report", "--compare", str(run), str(finished)],
                 ["runs", "diff", str(run), str(finished)]):
        line = _error(runner.invoke(app, args))
        assert "not what tunesmith wrote" in line and str(run / "summary.json") in line, (args, line)


def test_unpaired_or_damaged_predictions_are_said_not_hidden(run, finished, monkeypatch, tmp_path):
    """A missing predictions/test.jsonl read as "not scored on the same test examples", and an edited row
    passed for a prediction; `report --compare .` wrote compare_.html and showed summary.json's folder."""
    (run / "predictions" / "test.jsonl").rename(run / "kept.jsonl")
    result = runner.invoke(app, ["runs", "diff", str(run), str(finished)])
    assert result.exit_code == 0 and f"no paired test: {run / 'predictions' / 'test.jsonl'} is missing" in result.output
    rows = [json.loads(line) for line in (run / "kept.jsonl").read_text().splitlines()]
    rows[1]["prediction"] = 12345
    (run / "predictions" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for args in (["runs", "diff", str(run), str(finished)], ["report", "--compare", str(run), str(finished)]):
        line = _error(runner.invoke(app, args))
        assert f"{run / 'predictions' / 'test.jsonl'}:2" in line and "not what tunesmith wrote" in line, line
    (run / "kept.jsonl").replace(run / "predictions" / "test.jsonl")
    other = shutil.copytree(finished, run.parent / "other")  # the page is written into B: not the shared run
    monkeypatch.chdir(run)
    result = runner.invoke(app, ["report", "--compare", ".", str(other)])
    assert result.exit_code == 0, result.output
    page = (other / "compare_run.html").read_text()
    assert str(run.resolve()) in page and "same test examples" in page
    # Another run of the same folder name as A: its page goes beside the first, not over it.
    twin = shutil.copytree(finished, tmp_path / "elsewhere" / "run")
    result = runner.invoke(app, ["report", "--compare", str(twin), str(other)])
    assert result.exit_code == 0, result.output
    pages = sorted(p.name for p in other.glob("compare_run*.html"))
    assert len(pages) == 2 and (other / "compare_run.html").read_text() == page, pages
    again = runner.invoke(app, ["report", "--compare", str(twin), str(other)])  # the same A: its own page again
    assert again.exit_code == 0 and sorted(p.name for p in other.glob("compare_run*.html")) == pages


@pytest.mark.parametrize("edit,says", [
    (lambda r: r.pop("baseline_prediction"), "'baseline_prediction' missing or not a text"),
    (lambda r: r.update(confidence="high"), "'confidence' missing or not a number"),
    (lambda r: r.update(correct="yes"), "'correct' must be a boolean"),
    (lambda r: r.update(text=None), "'text' missing or not a text"),
    (lambda r: r.pop("prediction"), "'prediction' missing or not a text"),  # on the first row too (not 'tokens')
])
def test_every_reader_of_test_predictions_refuses_an_edited_row(run, tmp_path, edit, says):
    """The report's answer tables, export's parity check and human evaluation read predictions/test.jsonl
    too: an edited row is one error naming file:line, not an internal KeyError or TypeError."""
    path = run / "predictions" / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    at = 0 if says.startswith("'prediction'") else 2
    edit(rows[at])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for args in (["report", str(run)], ["export", str(run), "--out", str(tmp_path / "hf")],
                 ["human", "export", str(run), "--out", str(tmp_path / "human")]):
        line = _error(runner.invoke(app, args))
        assert f"{path}:{at + 1}" in line and "not what tunesmith wrote" in line and says in line, (args, line)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "human").exists()


def test_prediction_rows_tunesmith_wrote_read_back_whatever_they_hold(run):
    """A NaN confidence is written as null; runs before 2026-11 wrote `correct` on generation rows with
    no `confidence`: both are files tunesmith wrote, read back, never "damaged"."""
    from tunesmith.evaluate.predictions_file import read_test_predictions

    path = run / "predictions" / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["confidence"] = None
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_test_predictions(run)[0]["confidence"] is None
    old = [{k: v for k, v in r.items() if k != "confidence"} for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in old))
    assert len(read_test_predictions(run)) == len(rows)


@pytest.mark.parametrize("key", ["instruction", "type"])
def test_a_task_edited_after_training_is_refused_before_eval_writes(run, key):
    """eval scored the baseline with the edited config.yaml prompt and the fine-tuned model with its own
    (a changed instruction doubled the reported gain); an edited task.type ended in an internal error
    after metrics.json and summary.json were half rewritten."""
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    config["task"][key] = "Reply terminate." if key == "instruction" else "generation"
    if key == "type":
        config["objective"]["metric"] = "exact_match"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    before = {name: (run / name).read_bytes() for name in ("metrics.json", "summary.json", "report.html")}
    for command in (["eval", str(run), "-q"], ["audit", str(run), "-q"]):
        line = _error(runner.invoke(app, command))
        assert f"config.yaml's task.{key}" in line and "model/prompt.json" in line, line
    assert {name: (run / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("split", ["test", "train"])
def test_a_curated_split_edited_after_the_data_stage_is_refused(run, split):
    """An edited data/test.jsonl was scored as if it were the run's test split (a verdict on other rows),
    and any edited split was read as the one the run was made with."""
    path = run / "data" / f"{split}.jsonl"
    rows = path.read_text().splitlines()
    path.write_text("\n".join(rows[1:]) + "\n")  # one row fewer: still well-formed JSONL
    before = {name: (run / name).read_bytes() for name in ("metrics.json", "summary.json", "report.html")}
    for command in (["eval", str(run), "-q"], ["audit", str(run), "-q"]):
        line = _error(runner.invoke(app, command))
        assert f"error: the curated {split} split was changed after the data stage wrote it" in line, line
        assert str(path) in line
    assert {name: (run / name).read_bytes() for name in before} == before
    path.write_text("\n".join(rows) + "\n")  # restored: read again
    assert len(load_splits(run / "data").test) > 0
    # A run from before the digests were recorded: its row count is checked, at least
    report = json.loads((run / "data" / "report.json").read_text())
    for entry in report["splits"].values():
        del entry["sha256"]
    (run / "data" / "report.json").write_text(json.dumps(report))
    path.write_text("\n".join(rows[1:]) + "\n")
    line = _error(runner.invoke(app, ["eval", str(run), "-q"]))
    assert f"({len(rows) - 1} rows, data/report.json says {len(rows)})" in line and str(path) in line



def test_a_run_without_its_data_report_is_refused_naming_it(run):
    """A deleted data/report.json was an internal error (FileNotFoundError) where the splits are read
    (retrain reads the champion's splits so)."""
    from tunesmith.data.prepare import read_split
    from tunesmith.errors import DataError

    (run / "data" / "report.json").unlink()
    for command in (["eval", str(run), "-q"], ["audit", str(run), "-q"]):
        assert "no data/report.json" in _error(runner.invoke(app, command))
    with pytest.raises(DataError) as refused:
        read_split(run / "data", "train")
    assert "missing data/report.json" in refused.value.line() and str(run / "data" / "report.json") in \
        refused.value.line()

# --- export and human export --out ---------------------------------------------------------------

@LINUX_PROC
def test_export_out_where_no_folder_can_be_made_is_refused(run):
    line = _error(runner.invoke(app, ["export", str(run), "--out", "/proc/tunesmith-export"]))
    assert "--out cannot be created: /proc does not take new folders" in line or "/proc is not writable" in line


def test_export_out_that_is_a_file_says_so(run, tmp_path):
    (tmp_path / "afile").write_text("mine")
    assert "exists and is a file" in _error(runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "afile")]))
    inside = _error(runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "afile" / "x")]))
    assert "--out's parent folder is a file, not a folder" in inside  # it said "does not exist"
    assert (tmp_path / "afile").read_text() == "mine"
    quant = _error(runner.invoke(app, ["export", str(run), "--format", "gguf", "--quant", "f32",
                                       "--out", str(tmp_path / "g")]))
    assert "unknown quantization type 'f32'" in quant and "supported for gguf: f16, q8_0" in quant


@pytest.mark.parametrize("args,expected", [
    (["--n", "-1"], "must be at least 1, got -1"),     # silently dropped the last pair
    (["--n", "0"], "must be at least 1, got 0"),       # silently exported every pair
    (["--out", "afile/x"], "is not a folder"),
])
def test_human_export_bad_arguments_are_refused(run, tmp_path, args, expected):
    (tmp_path / "afile").write_text("mine")
    args = [a if a != "afile/x" else str(tmp_path / a) for a in args]
    full = ["human", "export", str(run)] + args + ([] if "--out" in args else ["--out", str(tmp_path / "h")])
    assert expected in _error(runner.invoke(app, full))
    assert not (tmp_path / "h").exists()


# --- human import --------------------------------------------------------------------------------

@pytest.mark.parametrize("ratings,expected", [
    ("id,rater,choice\np0001,bob,A\np0001,bob,B\n", "rated pair 'p0001' A at"),  # the last won silently
    ('id,rater,choice\np0001,bob,"A\n', "malformed CSV: unexpected end of data, {r}:2,"),  # read as A
    ("id,rater,choice\n", "the ratings files hold no ratings"),                 # "0 ratings", exit 0
    ("id,rater,choice\np0001,,A\n", "the rater is empty, {r}:2,"),               # counted as a rater ""
    # the row a broken quote starts on is named (it was the header's line), blank lines above counted
    ('\n\nid,rater,choice\np0001,bob,A\np0002,bob,"B\np0003,bob,A\n', "malformed CSV: unexpected end of data, {r}:5,"),
    ('id,rater,choice\n\n\np0001,bob,"A\n', "malformed CSV: unexpected end of data, {r}:4,"),  # not a blank line
    ('id,rater,choice\np0001,bob,A\np0002,"bob\nsmith",X\n', "is not one of A, B, tie, {r}:3,"),  # its first line
])
def test_human_import_refuses_ratings_it_would_misread(run, tmp_path, ratings, expected):
    result = runner.invoke(app, ["human", "export", str(run), "--out", str(tmp_path / "h"), "--seed", "1"])
    assert result.exit_code == 0, result.output
    (tmp_path / "r.csv").write_text(ratings)
    line = _error(runner.invoke(app, ["human", "import", "--key", str(tmp_path / "h" / "key.json"),
                                      str(tmp_path / "r.csv")]))
    assert expected.format(r=tmp_path / "r.csv") in line and "r.csv" in line
    assert not (tmp_path / "h" / "results.json").exists()


# --- the command line itself ---------------------------------------------------------------------

@pytest.mark.parametrize("args,expected", [
    (["eval", "--bogus"], "error: No such option: --bogus, "),
    (["serve", "x", "--port", "abc"], "error: Invalid value for '--port'"),
    (["nosuch"], "error: No such command 'nosuch', "),
    # click raises an option's arity error without its context: the command is still named
    (["report", "--compare", "a"], "error: Option '--compare' requires 2 arguments, tunesmith report, see "),
    # each trial is a training: a typo of a few zeros is refused, not started
    (["tune", "x.yaml", "--trials", "100000", "--out", "o"], "error: Invalid value for '--trials': Input should be "
                                                            "less than or equal to 1000"),
    # bytes that are not UTF-8 reach Python as lone surrogates: an encoding error inside validation was exit 1
    (["optimize", "run", "--variants", b"int\xff8"], "error: holds bytes that are not UTF-8 text, --variants"),
    (["compare", "x.yaml", "--methods", b"lo\xffra", "--out", "o"], "error: holds bytes that are not UTF-8 text"),
])
def test_a_wrong_command_line_is_one_error_line_and_exit_2(args, expected):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "tunesmith", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith(expected), done.stderr
    assert "╭" not in done.stderr and "Traceback" not in done.stderr


def test_empty_variants_and_registry_name_are_refused_not_defaulted(run):
    assert "--variants" in _error(runner.invoke(app, ["optimize", str(run), "--variants", ","]))
    assert 'bad registry name "", --name' in _error(runner.invoke(app, ["promote", str(run), "--name", "", "--force"]))


def test_human_import_takes_a_rating_repeated_in_a_second_download(run, tmp_path):
    result = runner.invoke(app, ["human", "export", str(run), "--out", str(tmp_path / "h"), "--seed", "1"])
    assert result.exit_code == 0, result.output
    (tmp_path / "r.csv").write_text("id,rater,choice\np0001,bob,A\n")
    (tmp_path / "r (1).csv").write_text("id,rater,choice\np0001,bob,A\np0002,bob,tie\n")
    (tmp_path / "empty.csv").write_text("id,rater,choice\n")  # a download made before rating anything
    result = runner.invoke(app, ["human", "import", "--key", str(tmp_path / "h" / "key.json"), str(tmp_path / "r.csv"),
                                 str(tmp_path / "r (1).csv"), str(tmp_path / "empty.csv")])
    assert result.exit_code == 0, result.output
    assert "2 ratings by 1 rater(s)" in result.output


def test_a_comparison_page_written_before_the_marker_is_still_replaced(run, tmp_path):
    from tunesmith.report.html import page

    old = tmp_path / "old.html"
    old.write_text(page("tunesmith: run-a vs run-b", "<h1>an older page</h1>"))
    result = runner.invoke(app, ["report", "--compare", str(run), str(run), "--out", str(old)])
    assert result.exit_code == 0, result.output
    assert "an older page" not in old.read_text()


# --- over-long paths, hand-edited figures, a damaged registry --------------------------------------

@pytest.mark.parametrize("command", [["export", "{run}", "--format", "hf", "--out", "{long}"],
                                     ["data", "clean", "{project}", "--out", "{long}"],
                                     ["report", "--compare", "{run}", "{run}", "--out", "{long}/page.html"]])
def test_an_over_long_out_path_is_bad_input(run, command):
    long = run.parent / ("a" * 300)
    args = [a.format(run=run, long=long, project=run.parent / "project.yaml") for a in command]
    line = _error(runner.invoke(app, args))
    assert "too long" in line and "aaaa" in line
    assert sorted(p.name for p in run.parent.iterdir()) == ["project.yaml", "run", "test.jsonl", "train.jsonl"]


@pytest.mark.parametrize("edit,refuses", [({"objective_metric": {"a": 1}}, "report"),
                                         ({"objective": {"met": True, "criteria": 5}}, "report"),
                                         ({"metrics": {"baseline": [], "finetuned": "x"}}, "runs"),
                                         ({"name": None}, "report"), ({"training": []}, "report"),
                                         ({"data": 3}, "report")])
def test_a_summary_edited_to_wrong_types_is_named_not_an_internal_error(run, edit, refuses):
    import json

    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, **edit}))
    page = (run / "report.html").read_bytes()
    refused = set()
    for args in (["report", str(run)], ["runs", "show", str(run)], ["runs", "diff", str(run), str(run)]):
        result = runner.invoke(app, args)
        if result.exit_code == 0:  # a field this command does not read
            continue
        line = _error(result)
        assert str(run) in line and ("wrong type" in line or "its objective verdict: " in line
                                    or "must be an object" in line), line
        assert result.stdout == ""  # the error line alone, not half a summary before it
        refused.add(args[0])
    assert refuses in refused
    if "report" in refused:
        assert (run / "report.html").read_bytes() == page  # not rewritten half-way


def test_metrics_edited_to_wrong_types_are_named(run):
    import json

    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "per_class": [1], "latency_ms": "fast"}))
    assert "wrong type" in _error(runner.invoke(app, ["report", str(run)]))


@pytest.mark.parametrize("file, edit, says", [
    ("metrics.json", lambda m: m["finetuned"].update(accuracy="high"),
     'finetuned.accuracy must be a finite number or null, found "high"'),
    ("metrics.json", lambda m: m["baseline"].update(accuracy=True),
     "baseline.accuracy must be a finite number or null"),
    ("metrics.json", lambda m: m.update(finetuned=None), "finetuned must be an object of figures, found NoneType"),
    ("summary.json", lambda m: m["metrics"]["finetuned"].update(accuracy="0.9"),
     "metrics.finetuned.accuracy must be a finite number or null"),
    ("metrics.json", "1e999", "baseline.accuracy must be a finite number or null, found Infinity"),
])
def test_a_figure_edited_to_a_non_number_is_named_by_every_reader(run, file, edit, says):
    """A string figure was a TypeError inside the report ("'value' must be an instance of str"), null an
    AttributeError, and 1e999 (a float infinity) was read as a figure."""
    path = run / file
    if isinstance(edit, str):
        path.write_text(re.sub(r'"accuracy": [0-9.e-]+', f'"accuracy": {edit}', path.read_text(), count=1))
    else:
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    for command in (["report", str(run)], ["report", "--compare", str(run), str(run), "--out", str(run / "c.html")]):
        line = _error(runner.invoke(app, command))
        assert says in line and f"{path}" in line, line


@pytest.mark.parametrize("damage", ["1e999", "missing"])
def test_audit_refuses_damaged_metrics_before_it_writes_anything(run, damage):
    """audit wrote audit.json, then failed on metrics.json (a missing one: an internal error, exit 1)."""
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("  lexicon: []\n", "  lexicon: [gender]\n", 1))
    metrics = run / "metrics.json"
    if damage == "missing":
        metrics.unlink()
    else:
        metrics.write_text(re.sub(r'"accuracy": [0-9.e-]+', '"accuracy": 1e999', metrics.read_text(), count=1))
    line = _error(runner.invoke(app, ["audit", str(run), "-q"]))
    assert str(metrics) in line and ("lacks metrics.json" if damage == "missing" else "Infinity") in line, line
    assert not (run / "audit.json").exists()


def test_runs_diff_names_a_config_that_is_not_yaml(run):
    (run / "config.yaml").write_text("a: &a [x, x]\nb: [*a, *a\n")
    line = _error(runner.invoke(app, ["runs", "diff", str(run), str(run)]))
    assert "not valid YAML" in line and "config.yaml" in line


@pytest.mark.parametrize("content", [b"garbage, not sqlite" * 100, "folder", "runs (x TEXT)", "notes (x TEXT)"])
def test_a_registry_tunesmith_did_not_write_is_bad_input_and_left_as_it_was(run, tmp_path, monkeypatch, content):
    """Another file, another app's SQLite database: named, and never written (no runs table added)."""
    import sqlite3

    registry = tmp_path / "reg.sqlite"
    if content == "folder":
        registry.mkdir()
    elif isinstance(content, str):
        with sqlite3.connect(registry) as db:
            db.execute(f"CREATE TABLE {content}")
        db.close()
    else:
        registry.write_bytes(content)
    before = None if registry.is_dir() else registry.read_bytes()
    monkeypatch.setenv("TUNESMITH_REGISTRY", str(registry))
    for args in (["runs", "list"], ["runs", "show", "1"], ["promote", str(run), "--name", "x"], ["rollback", "x"]):
        line = _error(runner.invoke(app, args))
        assert "registry" in line and str(registry) in line, (args, line)
        assert "unable to open" not in line  # sqlite's words for a folder
    assert before is None or registry.read_bytes() == before


def test_an_empty_registry_file_is_an_empty_registry_for_every_command(run, tmp_path, monkeypatch):
    """A 0-byte file is an empty SQLite database, as a registry is while it is being created: `runs list`
    refused it while `promote` began a registry in it (and refusing it raced with a promotion)."""
    registry = tmp_path / "reg.sqlite"
    registry.write_bytes(b"")
    monkeypatch.setenv("TUNESMITH_REGISTRY", str(registry))
    listed = runner.invoke(app, ["runs", "list"])
    assert listed.exit_code == 0 and "0 run(s)" in listed.output and registry.read_bytes() == b""
    assert runner.invoke(app, ["promote", str(run), "--name", "x"]).exit_code == 0
    assert runner.invoke(app, ["runs", "list"]).exit_code == 0


def test_a_registry_whose_folder_cannot_be_made_is_bad_input(run, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("TUNESMITH_REGISTRY", str(tmp_path / "file" / "reg.sqlite"))
    for args in (["promote", str(run), "--name", "x"], ["rollback", "x"]):
        line = _error(runner.invoke(app, args))
        assert "the run registry's folder cannot be made" in line and str(tmp_path / "file") in line, line


def test_reading_the_registry_creates_nothing_and_odd_ids_name_no_run(tmp_path, monkeypatch):
    registry = tmp_path / "no" / "such" / "reg.sqlite"
    monkeypatch.setenv("TUNESMITH_REGISTRY", str(registry))
    result = runner.invoke(app, ["runs", "list"])
    assert result.exit_code == 0 and "0 run(s)" in result.output
    assert not (tmp_path / "no").exists()
    assert "no run with id" in _error(runner.invoke(app, ["runs", "show", "99999999999999999999999"]))
    assert "not an evaluated run directory" in _error(runner.invoke(app, ["runs", "show", "²"]))  # not an id
    assert not (tmp_path / "no").exists()


def test_runs_list_prints_a_hand_edited_registry_row(run, tmp_path, monkeypatch):
    import sqlite3

    from tunesmith.run_registry import record_run

    monkeypatch.setenv("TUNESMITH_REGISTRY", str(tmp_path / "reg.sqlite"))
    record_run(run)
    with sqlite3.connect(tmp_path / "reg.sqlite") as db:
        db.execute("UPDATE runs SET value = 'abc', name = 7")
    db.close()
    result = runner.invoke(app, ["runs", "list"])
    assert result.exit_code == 0, result.output
    assert "n/a" in result.output and "1 run(s)" in result.output


def test_sigterm_runs_a_commands_cleanup_and_exits_143(tmp_path):
    """`kill`, `timeout` and the workbench's Stop send SIGTERM: the command's cleanup runs (an export's
    staging folder goes), where before the process vanished and left it behind."""
    import subprocess
    import sys

    script = (
        "import os, signal, time, typer\n"
        "from pathlib import Path\n"
        "from tunesmith.cli.common import guarded\n"
        "def work():\n"
        f"    staging = Path({str(tmp_path)!r}) / '.out.export-x'\n"
        "    staging.mkdir()\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(30)\n"
        "    finally:\n"
        "        staging.rmdir()\n"
        "    return 0\n"
        "try:\n"
        "    guarded(False, work)\n"
        "except typer.Exit as e:\n"
        "    raise SystemExit(e.exit_code)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip() == "error: terminated"  # no resume hint: this command trains nothing
    assert list(tmp_path.iterdir()) == []


def test_only_a_training_command_points_an_interruption_to_its_checkpoints(capsys):
    """`retrain` or `optimize` stopped by Ctrl-C said checkpoints were kept for `train --resume`: they
    keep none (a retrain leaves no run folder, optimize never trains)."""
    import typer

    from tunesmith.cli.common import guarded

    def stopped():
        raise KeyboardInterrupt
    for resumable, expected in ((False, "error: interrupted\n"), (True, "error: interrupted; training "
                                                                      "checkpoints, if any were written, are kept for "
                                                                      "`tunesmith train --resume RUN_DIR`\n")):
        with pytest.raises(typer.Exit) as stop:
            guarded(False, stopped, resumable=resumable)
        assert stop.value.exit_code == 130 and capsys.readouterr().err == expected


def test_a_hub_id_in_the_local_cache_resolves_without_any_connection(tmp_path, monkeypatch):
    """A Hugging Face id is taken from the local hub cache first: no lookup at all when it is there
    (before, every resolve asked the hub for the latest revision); an id that is not cached and cannot be
    fetched is one ModelError."""
    import socket

    import huggingface_hub.constants

    from tunesmith.errors import ModelError
    from tunesmith.models.resolve import resolve_model

    snapshot = tmp_path / "models--org--tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    connects = []

    def refuse(*args, **kwargs):
        connects.append(args)
        raise OSError("no network in this test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    assert resolve_model("org/tiny") == snapshot
    assert connects == []
    (snapshot / "model.safetensors").unlink()  # a config without its weights (an interrupted download)
    try:
        resolve_model("org/tiny")  # not taken for a whole model: the hub is asked for the rest
    except ModelError:
        pass
    assert connects
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="cannot fetch Hugging Face model 'org/absent'"):
        resolve_model("org/absent")


@pytest.mark.parametrize("command", [["tune", "{project}", "--trials", "1", "--out", "/proc/1"],
                                     ["compare", "{project}", "--methods", "lora", "--out", "/proc/1"],
                                     ["compare", "{project}", "--methods", "lora,ia3,lora", "--out", "{fresh}"]])
def test_tune_and_compare_refuse_a_bad_out_or_methods_before_any_training(run, command):
    args = [a.format(project=run.parent / "project.yaml", fresh=run.parent / "fresh") for a in command]
    line = _error(runner.invoke(app, args))
    assert ("/proc/1" in line and ("cannot be written" in line or "did not write" in line)
            or "method 'lora' is listed twice" in line), line
    assert not (run.parent / "fresh").exists()


def test_a_folder_refused_for_its_files_is_not_even_probed(run, tmp_path):
    """The write probe (a file made and removed) ran before the refusal, so a folder said to be "left
    untouched" had its modification time changed."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    before = mine.stat().st_mtime_ns
    line = _error(runner.invoke(app, ["compare", str(run.parent / "project.yaml"), "--methods", "lora",
                                      "--out", str(mine)]))
    assert "did not write (notes.txt); left untouched" in line
    assert mine.stat().st_mtime_ns == before and [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_a_copied_run_is_shown_where_it_is_now(run, tmp_path):
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(run, moved)
    shown = runner.invoke(app, ["runs", "show", str(moved)])
    assert shown.exit_code in (0, 3), shown.output
    assert f"run directory: {moved.resolve()}" in shown.output and str(run.resolve()) not in shown.output
    assert runner.invoke(app, ["report", str(moved)]).exit_code == 0
    assert f"run <code>{moved.resolve()}" in (moved / "report.html").read_text()


def test_runs_of_overlapping_test_splits_are_paired_on_the_examples_both_scored(run, finished, tmp_path):
    """`runs diff` promised a paired test on shared test examples but refused any two lists that were not
    identical; human export --against pairs the shared ones, and so do diff and the compare page now."""
    other = shutil.copytree(finished, tmp_path / "other")
    path = other / "predictions" / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = rows[2:] + [{**rows[0], "text": "an example only B scored"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["runs", "diff", str(run), str(other)])
    assert result.exit_code == 0, result.output
    assert f"on the {len(rows) - 1} test examples both runs scored:" in result.output, result.output
    page = runner.invoke(app, ["report", "--compare", str(run), str(other)])
    assert page.exit_code == 0 and f"the {len(rows) - 1} test examples both runs scored" in (
        other / "compare_run.html").read_text()
    for r in rows:
        r["text"] = "not in A: " + r["text"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["runs", "diff", str(run), str(other)])
    assert result.exit_code == 0 and "no paired test: the runs share no test example" in result.output


def test_a_folder_where_the_report_goes_is_named_not_its_temp_file(run):
    """The error named `.report.html.<hex>.tmp`, a file the user never saw."""
    (run / "report.html").unlink()
    (run / "report.html").mkdir()
    line = _error(runner.invoke(app, ["report", str(run)]))
    assert str(run / "report.html") in line and ".tmp" not in line
    assert (run / "report.html").is_dir()


def test_a_benchmark_file_gone_since_training_is_bad_input_naming_it(run, tmp_path):
    """eval reads each benchmarks: file when it runs; one deleted since was an internal error (exit 1)."""
    gone = tmp_path / "bench.jsonl"
    cfg = run / "config.yaml"
    text = cfg.read_text()
    assert "\nbenchmarks: []\n" in text  # the resolved config lists none
    cfg.write_text(text.replace("\nbenchmarks: []\n", f"\nbenchmarks:\n- name: extra\n  data: {gone}\n"
                                "  task: {type: classification, instruction: Pick one.}\n"))
    result = runner.invoke(app, ["eval", str(run), "--quiet"])
    line = _error(result)
    assert result.exit_code == 2 and "cannot read the data file (No such file or directory)" in line, line
    assert str(gone) in line


def test_a_base_model_gone_from_the_machine_is_named_not_looked_up_online(run, monkeypatch):
    """tunesmith.json naming a hub id whose folder is gone: the run's base is looked for in the local
    hub cache only (it asked huggingface.co, then blamed the network and `model`)."""
    import socket

    asked = []
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: asked.append(host) or real(host, *a, **k))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    meta = run / "model" / "tunesmith.json"
    _set_json(meta, "model", "tunesmith-tests/not-cached-anywhere")
    _set_json(meta, "base_model_path", str(run / "no-such-base"))
    for command in (["eval", str(run), "--quiet"], ["serve", str(run), "--port", "1"]):
        line = _error(runner.invoke(app, command))
        assert "the base model this run's adapter applies to is gone" in line, line
        assert "'tunesmith-tests/not-cached-anywhere' is not in the local hub cache" in line and str(meta) in line
    assert not [host for host in asked if host not in ("127.0.0.1", "localhost")], asked  # serve's own port check


def test_serve_of_a_run_without_its_model_metadata_names_the_file(run):
    """Without model/tunesmith.json a run was taken for a plain checkpoint: "folder RUN has no config.json"."""
    (run / "model" / "tunesmith.json").unlink()
    line = _error(runner.invoke(app, ["serve", str(run), "--port", "1"]))
    assert "the run's model folder lacks tunesmith.json" in line and str(run / "model" / "tunesmith.json") in line


def test_eval_of_a_run_whose_predictions_folder_is_a_file_writes_nothing(run):
    """mkdir of predictions/ raised FileExistsError (exit 1) after metrics.json and the report were rewritten."""
    shutil.rmtree(run / "predictions")
    (run / "predictions").write_text("user data")
    before = (run / "metrics.json").read_bytes()
    line = _error(runner.invoke(app, ["eval", str(run), "--quiet"]))
    assert f"exists and is not a folder; eval writes the test predictions there, {run / 'predictions'}" in line
    assert (run / "predictions").read_text() == "user data" and (run / "metrics.json").read_bytes() == before


def test_a_run_removed_while_it_is_evaluated_is_not_made_again_half(run, monkeypatch):
    """metrics.json, summary.json and predictions/ were written into a new folder of the run's name."""
    import tunesmith.evaluate.stage as stage

    real = stage._compare_runs

    def remove_then_compare(*args, **kwargs):
        shutil.rmtree(run)  # `rm -rf RUN` from another shell while the models were scoring
        return real(*args, **kwargs)
    monkeypatch.setattr(stage, "_compare_runs", remove_then_compare)
    line = _error(runner.invoke(app, ["eval", str(run), "--quiet"]))
    assert "the run's model folder is gone" in line and not run.exists()
