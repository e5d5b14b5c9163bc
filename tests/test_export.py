"""`tunesmith export --format hf`: a merged folder read back by plain transformers answers like the run;
bad --out / --format are refused untouched (exit 2); a disagreeing export leaves nothing (exit 1)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import train_tiny_run
from tunesmith import fsio
from tunesmith.cli import app as cli
from tunesmith.data.examples import Example
from tunesmith.models.tokens import stop_ids
from tunesmith.optimize import export as export_module
from tunesmith.tasks.predict import predict
from tunesmith.tasks.prompts import PromptFormat

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("export"), tiny_model)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "hf"
    result = runner.invoke(cli, ["export", str(run), "--format", "hf", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "agreement 1.0000" in result.output and str(out) in result.output
    return out


def test_export_folder_reads_back_with_transformers(run, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(exported))
    tokenizer = AutoTokenizer.from_pretrained(str(exported))
    rows = fsio.read_jsonl(run / "predictions/test.jsonl")
    fmt = PromptFormat.from_json(fsio.read_json(exported / "prompt.json"))
    preds = predict(model, tokenizer, fmt, [Example(input=r["text"], target=r["gold"], source="test") for r in rows])
    assert preds.texts == [r["prediction"] for r in rows]
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(str(run / "model")).chat_template
    assert (exported / "model_card.md").read_text() == (run / "model_card.md").read_text()
    assert not any(p.name.startswith("adapter") for p in exported.iterdir())  # merged, not an adapter


def test_export_json_and_eos(run, exported):
    from transformers import AutoTokenizer

    record = json.loads((exported / "export.json").read_text())
    assert set(record) == {"format", "path", "files", "size_mb", "reader", "agreement", "metric", "metric_export",
                           "metric_run", "delta", "n", "load_seconds", "quant", "token_mismatches", "min_agreement",
                           "modelfile"}
    assert record["modelfile"] is None  # the Modelfile check is --format ollama's
    assert record["format"] == "hf" and record["path"] == str(exported) and record["quant"] is None
    assert record["min_agreement"] == 0.98
    assert record["agreement"] == 1.0 and record["delta"] == 0.0 and record["n"] == 9
    assert record["metric"] == "accuracy" and record["reader"].startswith("transformers ")
    assert set(record["files"]) == {p.name for p in exported.iterdir()}
    assert "model.safetensors" in record["files"] and record["size_mb"] > 0
    eos = json.loads((exported / "generation_config.json").read_text())["eos_token_id"]
    expected = stop_ids(AutoTokenizer.from_pretrained(str(run / "model")))
    assert (eos if isinstance(eos, list) else [eos]) == expected
    assert not list(exported.parent.glob(".hf.export-*"))  # no staging folder left
    umask = os.umask(0)
    os.umask(umask)
    assert exported.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir makes it (not mkdtemp's 0700)
    # safetensors writes its files 0600: the export's and the run's weights are as readable as their configs
    for weights in (exported / "model.safetensors", run / "model" / "adapter_model.safetensors"):
        assert weights.stat().st_mode & 0o777 == 0o666 & ~umask == (exported / "config.json").stat().st_mode & 0o777


def test_existing_out_and_unknown_format_are_refused(run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(cli, ["export", str(run), "--out", str(out)])
    assert result.exit_code == 2 and result.output.strip().startswith("error: --out exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    result = runner.invoke(cli, ["export", str(run), "--format", "onnx", "--out", str(tmp_path / "new")])
    assert result.exit_code == 2 and "unknown export format 'onnx'" in result.output
    assert "supported: hf, gguf" in result.output
    assert not (tmp_path / "new").exists()
    result = runner.invoke(cli, ["export", str(tmp_path), "--out", str(tmp_path / "new")])
    assert result.exit_code == 2 and "not an evaluated run directory" in result.output


def test_out_as_a_link_or_the_current_folder_is_refused_before_any_work(run, tmp_path, monkeypatch):
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target", target_is_directory=True)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for out, said in ((tmp_path / "link", "--out is a symbolic link"), (Path("."), "current folder or one above"),
                      (Path(".."), "current folder or one above")):
        result = runner.invoke(cli, ["export", str(run), "--out", str(out)])
        assert result.exit_code == 2 and said in result.stderr, result.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "run") == ["here", "link", "target"]
    assert list((tmp_path / "target").iterdir()) == [] and list((tmp_path / "here").iterdir()) == []


def test_disagreeing_export_fails_and_leaves_nothing(run, tmp_path, monkeypatch):
    original = export_module.read_back

    def corrupted(folder, project, fmt, test):
        """The real read-back, then its first prediction replaced by another label (a broken export)."""
        back = original(folder, project, fmt, test)
        assert (folder / "model.safetensors").is_file()  # it ran on the staged folder
        back.texts[0] = next(label for label in fmt.labels if label != back.texts[0])
        return back

    monkeypatch.setattr(export_module, "read_back", corrupted)
    out = tmp_path / "hf"
    result = runner.invoke(cli, ["export", str(run), "--out", str(out), "--min-agreement", "1.0"])
    assert result.exit_code == 1, result.output
    assert result.output.strip().startswith("error: the exported model (hf, read back by transformers")
    assert "on 0.8889 of 9 test rows (below the minimum agreement 1.0)" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_staging_never_reuses_an_existing_folder(tmp_path):
    """A folder named like an old staging folder (this process's id) is someone's: it is kept as it was."""
    decoy = tmp_path / f".new.export-{os.getpid()}"
    decoy.mkdir()
    (decoy / "keep.txt").write_text("mine")
    result = runner.invoke(cli, ["export", str(tmp_path / "not-a-run"), "--out", str(tmp_path / "new")])
    assert result.exit_code == 2 and "no such run directory" in result.output
    assert (decoy / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [decoy.name]  # the failed export's staging is gone


def test_out_in_a_missing_folder_is_refused_and_nothing_is_created(run, tmp_path):
    out = tmp_path / "missing" / "sub" / "hf"
    result = runner.invoke(cli, ["export", str(run), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (f"error: --out's parent folder does not exist, {out.parent}, create it first, "
                                     "or give --out inside an existing folder")
    assert list(tmp_path.iterdir()) == []


def test_out_filled_while_the_export_runs_is_kept_and_the_export_is_not(run, tmp_path, monkeypatch):
    """A second export into the same new folder (or a user's file put there meanwhile) finished the
    whole job and then ended in an internal error: it is one error line now, and the folder keeps what
    the other party wrote."""
    out = tmp_path / "hf"
    original = export_module.read_back

    def racing(folder, project, fmt, test):
        out.mkdir()
        (out / "notes.txt").write_text("precious")
        return original(folder, project, fmt, test)
    monkeypatch.setattr(export_module, "read_back", racing)
    result = runner.invoke(cli, ["export", str(run), "--out", str(out)])
    assert result.exit_code == 2 and result.stderr.startswith("error: --out was filled while the export ran")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no staging folder left


def test_a_full_disk_is_one_error_line_naming_the_file(run, tmp_path, monkeypatch):
    import errno

    def full(folder, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))
    monkeypatch.setattr(export_module, "stage_export", full)
    result = runner.invoke(cli, ["export", str(run), "--out", str(tmp_path / "hf")])
    assert result.exit_code == 2 and "internal error" not in result.stderr
    assert result.stderr.startswith("error: no space left on the disk (No space left on device), ")
    assert "model.safetensors" in result.stderr and list(tmp_path.iterdir()) == []


def test_out_inside_a_run_and_a_damaged_prompt_json_are_named(run, tmp_path):
    import shutil

    result = runner.invoke(cli, ["export", str(run), "--out", str(run / "model" / "gguf")])
    assert result.exit_code == 2 and f"--out is inside the run directory {run}" in result.stderr
    assert not (run / "model" / "gguf").exists()
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "model" / "prompt.json").write_text('{"task_type": "classification", "labels": "x"}')
    result = runner.invoke(cli, ["export", str(copy), "--out", str(tmp_path / "hf")])
    assert result.exit_code == 2 and "TypeError" not in result.stderr, result.stderr
    assert "no field 'instruction'" in result.stderr and str(copy / "model" / "prompt.json") in result.stderr
    assert not (tmp_path / "hf").exists()


def test_a_base_model_that_is_gone_is_named_as_the_runs(run, tmp_path):
    """Its error named `model` and told how to pick a model for a new project."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    meta_file = copy / "model" / "tunesmith.json"
    meta = json.loads(meta_file.read_text())
    meta.update(model=str(tmp_path / "gone"), base_model_path=str(tmp_path / "gone"))
    meta_file.write_text(json.dumps(meta))
    for command in (["export", str(copy), "--out", str(tmp_path / "hf")],
                    ["optimize", str(copy), "--variants", "bf16"]):
        result = runner.invoke(cli, command)
        assert result.exit_code == 2, result.output
        assert "the base model this run's adapter applies to is gone" in result.stderr
        assert str(meta_file) in result.stderr
    assert not (tmp_path / "hf").exists()


def test_export_json_names_a_relative_out_as_an_absolute_path(run, tmp_path, monkeypatch):
    """export.json recorded `--out` as typed ("ex_hf"), a path that means nothing read from elsewhere."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["export", str(run), "--format", "hf", "--out", "ex_hf"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ex_hf" / "export.json").read_text())["path"] == str(tmp_path / "ex_hf")
