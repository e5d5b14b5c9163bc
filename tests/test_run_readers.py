"""Commands that rebuild or measure a finished run (optimize, audit, report, report --compare) on a run eval
could have written (a null figure) or a user has damaged: finished work, or one located `error:` line
before anything is written, never an internal error after optimize or audit wrote their results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import GEN_PROJECT, make_texts, write_jsonl
from conftest import one_error as _error
from tunesmith.cli import app

runner = CliRunner()


def _nothing_built(run: Path) -> None:
    assert not (run / "variants").exists() and not (run / "optimize.json").exists()


def test_a_null_figure_as_eval_writes_a_nan_one_is_reported_optimized_and_audited(run):
    """Eval writes a NaN figure as null, and every reader of metrics.json takes one; the report's bar chart
    added it to a number: optimize and audit failed with exit 1 after writing their results (audit had
    rewritten summary.json), and `report` blamed the run's files."""
    metrics = json.loads((run / "metrics.json").read_text())
    assert isinstance(metrics["baseline"]["accuracy"], float)
    metrics["finetuned"]["accuracy"] = None
    (run / "metrics.json").write_text(json.dumps(metrics))
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("  lexicon: []\n", "  lexicon: [gender]\n", 1))
    for command in (["report", str(run)], ["optimize", str(run), "--variants", "merged", "-q"],
                    ["audit", str(run), "-q"]):
        result = runner.invoke(app, command)
        assert result.exit_code in (0, 3), (command, result.output)
    assert (run / "optimize.json").is_file() and (run / "audit.json").is_file()
    assert "alt='test metrics'" in (run / "report.html").read_text()


@pytest.mark.parametrize("summary", ["missing", "eval failed"])
def test_optimize_of_a_run_without_a_verdict_is_refused_before_building(run, summary):
    """The report optimize rebuilds at its end needs summary.json's verdict: a missing summary, or the one
    a failed eval leaves (no verdict, a `failed` entry), was exit 1 after the variants were built."""
    if summary == "missing":
        (run / "summary.json").unlink()
    else:
        (run / "summary.json").write_text(json.dumps({"name": "tiny", "failed": {"stage": "eval", "error": "x"}}))
    line = _error(runner.invoke(app, ["optimize", str(run), "--variants", "merged", "-q"]))
    assert ("has not been evaluated" if summary == "missing" else "eval stage failed") in line and str(run) in line
    _nothing_built(run)


@pytest.mark.parametrize("edit", ["empty", "first row gone", "rows swapped"])
@pytest.mark.parametrize("command", ["optimize", "export"])
def test_predictions_that_are_not_the_test_splits_are_refused_before_anything_is_built(run, tmp_path, edit,
                                                                                       command):
    """optimize measured its variants on data/test.jsonl's first N rows whatever predictions/test.jsonl held:
    an empty file was an IndexError in the measuring child, and a KTO run (undesirable test rows are not
    scored) compared each variant's answer with the gold of another row."""
    path = run / "predictions" / "test.jsonl"
    rows = path.read_text().splitlines()
    kept = {"empty": [], "first row gone": rows[1:], "rows swapped": [rows[1], rows[0], *rows[2:]]}[edit]
    path.write_text("".join(r + "\n" for r in kept))
    args = (["optimize", str(run), "--variants", "merged", "-q"] if command == "optimize"
            else ["export", str(run), "--out", str(tmp_path / "exported")])
    assert "predictions/test.jsonl does not match the run's test split" in _error(runner.invoke(app, args))
    _nothing_built(run)
    assert not (tmp_path / "exported").exists()


def test_report_of_a_run_without_its_data_folder_names_what_is_missing(run):
    shutil.rmtree(run / "data")
    line = _error(runner.invoke(app, ["report", str(run)]))
    assert "lacks data/report.json" in line and str(run / "data" / "report.json") in line


def test_runs_of_different_task_types_are_never_paired(finished, tmp_path, tiny_model):
    """A classification and a generation run on the same examples: `report --compare` paired them (McNemar
    of a label's correctness against an exact match) in one order and blamed the run's files in the other."""
    rows = [{"prompt": r["text"], "completion": r["label"]} for r in make_texts(9, 2)]  # the tiny run's test rows
    write_jsonl(tmp_path / "train.jsonl", rows + [{"prompt": r["text"], "completion": r["label"]}
                                                  for r in make_texts(12, 5)])
    write_jsonl(tmp_path / "test.jsonl", rows)
    (tmp_path / "gen.yaml").write_text(GEN_PROJECT.format(name="gen", model=tiny_model, method="lora", steps=1,
                                                          new_tokens=2), encoding="utf-8")
    gen = tmp_path / "gen"
    result = runner.invoke(app, ["run", str(tmp_path / "gen.yaml"), "--out", str(gen), "-q"])
    assert result.exit_code in (0, 3), result.output
    for a, b in ((finished, gen), (gen, finished)):
        page = tmp_path / f"{a.name}_{b.name}.html"
        result = runner.invoke(app, ["report", "--compare", str(a), str(b), "--out", str(page)])
        assert result.exit_code == 0, result.output
        text = page.read_text()
        assert "different task types" in text and "McNemar" not in text, text[:2000]
    # Generation and chat share their metrics and rows: a prompt format against a chat template pairs.
    (tmp_path / "chat.yaml").write_text((tmp_path / "gen.yaml").read_text().replace("type: generation", "type: chat")
                                        .replace("name: gen", "name: chat"), encoding="utf-8")
    result = runner.invoke(app, ["run", str(tmp_path / "chat.yaml"), "--out", str(tmp_path / "chat"), "-q"])
    assert result.exit_code in (0, 3), result.output
    result = runner.invoke(app, ["runs", "diff", str(gen), str(tmp_path / "chat")])
    assert result.exit_code == 0 and "different task types" not in result.output, result.output
    assert "exact_match on the same test examples" in result.output, result.output
