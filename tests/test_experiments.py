"""Choosing and comparing: the run registry and `runs list|show|diff`, the `compare` bake-off, the
`select` estimator and probe, and the `tune` study, on tiny models."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from browser import Page, chromium
from conftest import PROJECT, make_texts, write_jsonl
from tunesmith.cli import app
from tunesmith.config import load_config
from tunesmith.models.estimate import EFFICIENCY, Hardware, estimate
from tunesmith.registry import METHOD_SPECS
from tunesmith.run_registry import list_runs

runner = CliRunner()


def _project(tmp_path, tiny_model, method: str = "lora") -> str:
    write_jsonl(tmp_path / "train.jsonl", make_texts(30, 1))
    write_jsonl(tmp_path / "test.jsonl", make_texts(9, 2))
    (tmp_path / "project.yaml").write_text(PROJECT.format(model=tiny_model, method=method), encoding="utf-8")
    return str(tmp_path / "project.yaml")


def test_compare_runs_each_method_and_the_registry_knows_them(tmp_path, tiny_model):
    config = _project(tmp_path, tiny_model)
    out = tmp_path / "bake"
    result = runner.invoke(app, ["compare", config, "--methods", "lora,ia3,prompt_optimization", "--out", str(out),
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    entries = json.loads((out / "compare.json").read_text())
    assert {e["method"] for e in entries} == {"lora", "ia3", "prompt_optimization"}
    assert entries[0]["vs_best"] is None and all(e["vs_best"] is not None for e in entries[1:])
    for e in entries:
        assert {"value", "gain_ci", "train_seconds", "peak_rss_mb", "trainable_params", "latency_p50_ms",
                "objective_met"} <= set(e)
        assert e["value"] >= entries[-1]["value"]  # ranked best first
    assert (out / "compare.png").stat().st_size > 1000 and "method" in result.output
    # Each bake-off run is a normal run, recorded in the registry.
    registered = {r["run_dir"] for r in list_runs("tiny")}
    assert {str((out / m).resolve()) for m in ("lora", "ia3", "prompt_optimization")} <= registered
    listed = runner.invoke(app, ["runs", "list", "--name", "tiny"])
    assert listed.exit_code == 0 and "prompt_optimization" in listed.output
    assert re.search(r"\+00:00 +tiny", listed.output)  # the timestamp (25 characters) and the name stay apart
    run_id = next(r["id"] for r in list_runs("tiny") if r["run_dir"] == str((out / "lora").resolve()))
    shown = runner.invoke(app, ["runs", "show", str(run_id)])
    assert shown.exit_code == 0 and "objective" in shown.output
    diff = runner.invoke(app, ["runs", "diff", str(out / "lora"), str(out / "ia3")])
    assert diff.exit_code == 0, diff.output
    assert "train.method: 'lora' -> 'ia3'" in diff.output and "95% CI" in diff.output
    counts = {e["method"]: e["trainable_params"] for e in entries}  # whole numbers printed whole
    assert f"trainable_params: {counts['lora']:,} -> {counts['ia3']:,}" in diff.output, diff.output
    missing = runner.invoke(app, ["runs", "show", "99999"])
    assert missing.exit_code == 2 and "no run with id 99999" in missing.output
    # A later call ranks its own methods; the earlier runs it leaves in --out are named, not silently dropped.
    again = runner.invoke(app, ["compare", config, "--methods", "ia3", "--out", str(out), "--quiet", "--overwrite"])
    assert again.exit_code == 0, again.output
    assert [e["method"] for e in json.loads((out / "compare.json").read_text())] == ["ia3"]
    assert "lora, prompt_optimization in --out are earlier runs" in again.stderr
    # No method meets an objective: exit 3, as run and tune.
    Path(config).write_text(Path(config).read_text().replace(
        "  target: 0.0\n", "  target: 0.0\n  constraints:\n    latency_p95_ms: {max: 0.0001}\n"))
    unmet = runner.invoke(app, ["compare", config, "--methods", "prompt_optimization", "--out",
                                str(tmp_path / "unmet"), "--quiet"])
    assert unmet.exit_code == 3 and "not met" in unmet.output, unmet.output
    _check_compare_page(out / "lora", out / "ia3", str(run_id))


def test_compare_refuses_a_method_the_config_cannot_have_before_any_training(tmp_path, tiny_model):
    config = Path(_project(tmp_path, tiny_model))
    config.write_text(config.read_text(encoding="utf-8").replace("train:\n", "train:\n  fsdp: true\n", 1),
                      encoding="utf-8")
    out = tmp_path / "bake"
    result = runner.invoke(app, ["compare", str(config), "--methods", "lora,prompt_tuning", "--out", str(out),
                                 "--quiet"])
    assert result.exit_code == 2, result.output
    assert "error: method 'prompt_tuning' does not fit this config" in result.output and "--methods" in result.output
    assert "Traceback" not in result.output and not (out / "lora").exists()  # nothing trained


def _check_compare_page(a, b, a_id: str) -> None:
    """`report --compare A B` (A by registry id): config diff, paired test, cost, plots; renders cleanly."""
    result = runner.invoke(app, ["report", "--compare", a_id, str(b)])
    assert result.exit_code == 0, result.output
    page = b / "compare_lora.html"
    text = page.read_text()
    assert "train.method" in text and "<td>lora</td><td>ia3</td>" in text
    assert "on the same test examples" in text and "McNemar" in text and "train_seconds" in text
    assert text.count("<img") == 2 and "Where they disagree" in text
    both = runner.invoke(app, ["report", str(a), "--compare", str(a), str(b)])
    assert both.exit_code == 2 and "either RUN_DIR or --compare" in both.output
    if chromium() is not None:
        with Page() as browser:
            state = browser.open(page)
        assert state["broken"] == [] and state["console_errors"] == [] and state["exceptions"] == []


def test_compare_rejects_unknown_methods(tmp_path, tiny_model):
    result = runner.invoke(app, ["compare", _project(tmp_path, tiny_model), "--methods", "lora,magic", "--out",
                                 str(tmp_path / "x")])
    assert result.exit_code == 2 and "error: unknown method 'magic', --methods" in result.output
    for given in ("", " , "):
        result = runner.invoke(app, ["compare", str(tmp_path / "project.yaml"), "--methods", given, "--out",
                                     str(tmp_path / "x")])
        assert result.exit_code == 2 and "error: names no method, --methods" in result.output
    result = runner.invoke(app, ["compare", str(tmp_path / "project.yaml"), "--methods", "dpo", "--out",
                                 str(tmp_path / "x")])
    assert result.exit_code == 2 and "does not fit this config (train.method dpo" in result.output, result.output
    assert not (tmp_path / "x").exists()


def test_estimates_follow_the_formulas():
    hw = Hardware("cpu", "test", 24000, 0.4, True)
    lora = estimate(135, 30, 576, "lora", 50_000, 8, 90, hw)
    full = estimate(135, 30, 576, "full", 50_000, 8, 90, hw)
    # Full fine-tuning: optimiser state for the other 99% and fp32 weights; LoRA's frozen weights are bf16.
    assert full["memory_mb"] - lora["memory_mb"] == pytest.approx((16 * 0.99 + 2) * 135e6 / 2**20, abs=2)
    fp32 = estimate(135, 30, 576, "lora", 50_000, 8, 90, Hardware("cpu", "test", 24000, 0.4, False))
    assert fp32["memory_mb"] - lora["memory_mb"] == pytest.approx(2 * 135e6 / 2**20, abs=2)
    # Time: LoRA's 4P effective FLOPs per token at EFFICIENCY of the probe's peak; every other method
    # in proportion to its own factor (full 7.7P, soft prompts 3.5P: measured, registry.METHOD_SPECS).
    assert lora["seconds"] == pytest.approx(50_000 * 4 * 135e6 / (0.4e12 * EFFICIENCY), rel=1e-3)
    for method in ("full", "dora", "ia3", "prompt_tuning"):
        other = estimate(135, 30, 576, method, 50_000, 8, 90, hw)
        assert other["seconds"] == pytest.approx(METHOD_SPECS[method].flops_per_token / 4 * lora["seconds"], rel=1e-3)
    assert full["seconds"] > lora["seconds"] > estimate(135, 30, 576, "prompt_tuning", 50_000, 8, 90, hw)["seconds"]
    # DoRA: 8.4 bytes a weight against LoRA's 2, and 1.95 x LoRA's activations (fitted on measured peaks).
    dora = estimate(135, 30, 576, "dora", 50_000, 8, 90, hw)
    activations = 34 * 30 * 8 * 90 * 576
    assert dora["memory_mb"] - lora["memory_mb"] == pytest.approx(
        ((6.4 + 16 * 0.001) * 135e6 + 0.95 * activations) / 2**20, abs=2)
    assert not estimate(7248, 32, 4096, "full", 1000, 8, 90, hw)["fits"]


def test_select_counts_the_passes_max_steps_makes_not_the_epochs_it_replaces():
    from tunesmith.config.schema import TrainConfig
    from tunesmith.select import _passes

    assert _passes(TrainConfig(epochs=2), 32, 40) == 2  # no max_steps: the epochs
    # 4 steps of 8 rows over 32 rows is one pass (training stops at max_steps, whatever the epochs say)
    assert _passes(TrainConfig(epochs=2, max_steps=4, batch_size=8), 32, 40) == 1
    assert _passes(TrainConfig(epochs=1, max_steps=10, batch_size=8, grad_accum=2), 32, 40) == 5
    assert _passes(TrainConfig(max_steps=4, batch_size=64), 32, 40) == 4  # a batch holds at most every row
    assert _passes(TrainConfig(max_steps=4, batch_tokens=160), 32, 40) == 0.5  # 160 tokens: 4 rows of 40
    assert _passes(TrainConfig(max_steps=6, batch_size=8), 10_000, 40) == pytest.approx(0.0048)  # never 0


def test_select_probes_local_models_and_recommends(tmp_path, tiny_model):
    config = _project(tmp_path, tiny_model)
    result = runner.invoke(app, ["select", config, "--candidates", f"{tiny_model},smollm2-1.7b-instruct",
                                 "--probe", "6", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    local = next(c for c in out["candidates"] if c["local"])
    assert local["probe"]["examples"] == 6 and 0 <= local["probe"]["score"] <= 1
    assert set(local["estimates"]) == {"lora", "dora", "ia3", "full", "prompt_tuning", "prefix_tuning", "qlora"}
    assert out["recommendation"]["method"] == "lora" and "LoRA, not full" in out["recommendation"]["reason"]
    assert out["data"]["train_tokens"] > 0 and out["hardware"]["peak_tflops"] > 0
    text = runner.invoke(app, ["select", config, "--candidates", str(tiny_model), "--probe", "0", "--quiet"])
    assert text.exit_code == 0 and "recommendation:" in text.output and "warning:" not in text.stderr
    # What `data check` would warn about, select says beside its recommendation (it stands on this data)
    write_jsonl(tmp_path / "test.jsonl", make_texts(9, 2) + [{"text": "an unseen kind", "label": "omega"}])
    warned = runner.invoke(app, ["select", config, "--candidates", str(tiny_model), "--probe", "0", "--quiet"])
    assert warned.exit_code == 0 and "warning: test labels never seen in training: omega" in warned.stderr

    assert out["recommendation"]["fits"] is True
    # A catalog model named by its Hugging Face id is that entry: estimated without the hub (offline here)
    by_id = runner.invoke(app, ["select", config, "--candidates", "HuggingFaceTB/SmolLM2-1.7B-Instruct",
                                "--probe", "0", "--json", "--quiet"])
    assert by_id.exit_code == 0, by_id.output
    row = json.loads(by_id.output)["candidates"][0]
    assert row["model"] == "HuggingFaceTB/SmolLM2-1.7B-Instruct" and row["params_m"] == 1711 and not row["local"]


@pytest.mark.parametrize("given,said", [(",", "--candidates names no model"), (" ", "--candidates names no model"),
                                        ("{m},{m}", "names {m} twice"), ("{m},{m}/", "names {m}/ twice"),
                                        ("/no/such/model", "--candidates /no/such/model"),
                                        # a name past the file system's limits: an internal OSError before
                                        ("a" * 300, "(File name too long), --candidates " + "a" * 80 + "..."),
                                        ("smollm2-1.7b-instruct,HuggingFaceTB/SmolLM2-1.7B-Instruct",
                                         "names HuggingFaceTB/SmolLM2-1.7B-Instruct twice")])
def test_select_candidates_that_name_nothing_or_twice_are_refused(tmp_path, tiny_model, given, said):
    """"," ranked the whole catalog, a name given twice was probed twice, and an unknown one was blamed
    on the config's `model`."""
    config = _project(tmp_path, tiny_model)
    result = runner.invoke(app, ["select", config, "--candidates", given.format(m=tiny_model), "--probe", "0"])
    assert result.exit_code == 2 and said.format(m=tiny_model) in result.stderr, result.output


def test_select_says_when_no_candidate_fits(tmp_path, tiny_model):
    config = _project(tmp_path, tiny_model)
    text = Path(config).read_text()
    Path(config).write_text(text.replace("batch_size: 4", "batch_size: 100000000000000000000"))
    result = runner.invoke(app, ["select", config, "--candidates", str(tiny_model), "--probe", "0", "--json",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    advice = json.loads(result.output)["recommendation"]
    assert advice["fits"] is False and "no candidate fits" in advice["reason"]
    assert "smallest model that fits" not in advice["reason"]


def test_tune_study_starts_from_the_default_and_ends_in_a_run(tmp_path, tiny_model, caplog):
    config = _project(tmp_path, tiny_model)
    out = tmp_path / "tune"
    result = runner.invoke(app, ["tune", config, "--trials", "4", "--out", str(out), "--quiet"])
    assert result.exit_code in (0, 3), result.output
    db = sqlite3.connect(out / "study.sqlite")
    states = [s for (s,) in db.execute("SELECT state FROM trials ORDER BY number")]
    assert len(states) == 4 and states[0] == "COMPLETE"
    project = load_config(config)
    first = dict(db.execute("SELECT param_name, param_value FROM trial_params WHERE trial_id = "
                            "(SELECT MIN(trial_id) FROM trials)").fetchall())
    assert first["lora.r"] is not None and len(first) == 4  # trial 0 is the config as written (max_steps: no epochs)
    assert (out / "best" / "summary.json").is_file() and "default config (trial 0)" in result.output
    m = re.search(r"default config \(trial 0\): ([0-9.]+); best: trial \d+ ([0-9.]+)", result.output)
    assert m and float(m.group(2)) >= float(m.group(1)) and project.train.method == "lora"

    # The best run finished by hand (`train --resume`, then `eval`, after an interrupted tune) is the
    # study's answer: kept, evaluated when it is not yet, never refused (nor retrained).
    weights = (out / "best" / "model" / "adapter_model.safetensors").read_bytes()
    (out / "best" / "summary.json").unlink()
    kept = runner.invoke(app, ["tune", config, "--trials", "4", "--out", str(out), "--quiet"])
    assert kept.exit_code == result.exit_code and (out / "best" / "summary.json").is_file(), kept.output
    assert (out / "best" / "model" / "adapter_model.safetensors").read_bytes() == weights
    assert kept.output.splitlines()[-3:] == result.output.splitlines()[-3:]
    study = (out / "study.sqlite").read_bytes()
    more = runner.invoke(app, ["tune", config, "--trials", "5", "--out", str(out), "--quiet"])  # a new best may come
    assert more.exit_code == 2 and "already holds a tunesmith run" in more.stderr, more.output
    assert (out / "study.sqlite").read_bytes() == study  # refused before the study was opened
    alone = tmp_path / "alone"  # a best run without its study: refused, and no study.sqlite made
    alone.mkdir()
    shutil.copytree(out / "best", alone / "best")
    refused = runner.invoke(app, ["tune", config, "--trials", "4", "--out", str(alone), "--quiet"])
    assert refused.exit_code == 2 and sorted(p.name for p in alone.iterdir()) == ["best"], refused.output

    # A study of another config is not reported as this one's: refused, or replaced with --overwrite.
    changed = Path(config).read_text().replace("max_steps: 6", "max_steps: 5")
    assert changed != Path(config).read_text()
    Path(config).write_text(changed)
    shutil.rmtree(out / "best")  # (its own refusal would come first)
    before = (out / "study.sqlite").read_bytes()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.INFO)  # as a fresh process starts
    optuna.logging.enable_propagation()  # (its own handler writes to the stderr of its first import)
    try:
        with caplog.at_level("INFO", logger="optuna"):
            refused = runner.invoke(app, ["tune", config, "--trials", "4", "--out", str(out), "--quiet"])
    finally:
        optuna.logging.disable_propagation()
    assert refused.exit_code == 2 and "holds a study of another config" in refused.stderr, refused.output
    assert not [r for r in caplog.records if r.name.startswith("optuna")]  # the refusal is the one line said
    assert (out / "study.sqlite").read_bytes() == before
    again = runner.invoke(app, ["tune", config, "--trials", "1", "--out", str(out), "--quiet", "--overwrite"])
    assert again.exit_code in (0, 3), again.output
    assert [line.split()[1] for line in again.output.splitlines() if line.startswith("trial ")] == ["0"]
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["000"]  # the old study's logs went with it


def test_tune_refuses_a_study_file_it_did_not_write(tmp_path, tiny_model):
    """Optuna adds its tables to any SQLite file, through a link too: a foreign, damaged or linked
    study.sqlite is refused before any work, and left as it was."""
    config = _project(tmp_path, tiny_model)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE foo (x)")
    cases = {"foreign": lambda p: p.write_bytes(other.read_bytes()), "garbage": lambda p: p.write_text("garbage"),
             "link": lambda p: p.symlink_to(other)}
    for name, make in cases.items():
        out = tmp_path / name
        out.mkdir()
        make(out / "study.sqlite")
        result = runner.invoke(app, ["tune", config, "--trials", "1", "--out", str(out), "--quiet"])
        assert result.exit_code == 2 and "study.sqlite" in result.stderr and "left untouched" in result.stderr, name
        assert sorted(p.name for p in out.iterdir()) == ["study.sqlite"]
    assert [r for (r,) in sqlite3.connect(other).execute("SELECT name FROM sqlite_master")] == ["foo"]


def test_an_interrupted_default_trial_is_run_again(tmp_path, tiny_model, monkeypatch):
    """Ctrl-C in trial 0 left it FAIL: the next tune printed it as "pruned", never scored the config as
    written and counted the failed trial towards --trials."""
    import tunesmith.pipeline  # noqa: F401  (bound to the real train_stage before it is replaced below)
    import tunesmith.train.stage as stage

    config = _project(tmp_path, tiny_model)
    out = tmp_path / "tune"
    real = stage.train_stage

    def interrupted(project, splits, folder, *args, **kwargs):  # stopped after its first checkpoint
        (folder / "checkpoints" / "step-0000002").mkdir(parents=True)
        (folder / "checkpoints" / "step-0000002" / "trainable.safetensors").write_bytes(b"weights")
        raise KeyboardInterrupt
    monkeypatch.setattr(stage, "train_stage", interrupted)
    assert runner.invoke(app, ["tune", config, "--trials", "2", "--out", str(out), "--quiet"]).exit_code == 130
    # Its weights go too: the trial is never resumed (a new trial takes its place).
    assert not (out / "trials" / "000" / "checkpoints").exists()
    monkeypatch.setattr(stage, "train_stage", real)
    result = runner.invoke(app, ["tune", config, "--trials", "2", "--out", str(out), "--quiet"])
    assert result.exit_code in (0, 3), result.output
    lines = [line.split() for line in result.output.splitlines() if line.startswith("trial ")]
    assert [(n, state) for _, n, state, *_ in lines] == [("0", "FAIL"), ("1", "COMPLETE"), ("2", "COMPLETE")]
    assert lines[0][3] == "stopped" and "default config (trial 1): " in result.output


def test_tune_starts_from_a_config_outside_its_search_ranges(tmp_path, tiny_model):
    """lora.r 64 is not among the ranks searched: enqueuing the config as written was an internal error
    (ValueError from Optuna), repeated on every rerun."""
    config = _project(tmp_path, tiny_model)
    text = Path(config).read_text().replace("  max_steps: 6\n", "  max_steps: 6\n  lora: {r: 64, alpha: 128}\n")
    assert text != Path(config).read_text()
    Path(config).write_text(text)
    result = runner.invoke(app, ["tune", config, "--trials", "1", "--out", str(tmp_path / "t"), "--quiet"])
    assert result.exit_code in (0, 3), result.output
    assert "'lora.r': 64" in result.output and "'lora.alpha': 128" in result.output


def test_tune_searches_epochs_only_when_max_steps_leaves_them_a_say(tmp_path, tiny_model):
    import optuna

    from tunesmith.config import load_config
    from tunesmith.tune import defaults, space

    project = load_config(_project(tmp_path, tiny_model))  # max_steps: 6 decides the length
    sampled = space(optuna.trial.FixedTrial(defaults(project)), project)
    assert project.train.max_steps == 6 and "epochs" not in sampled and "epochs" not in defaults(project)
    open_ended = project.model_copy(update={"train": project.train.model_copy(update={"max_steps": None})})
    assert "epochs" in space(optuna.trial.FixedTrial(defaults(open_ended)), open_ended)


def test_tune_overwrite_puts_the_replaced_study_back_when_no_new_trial_scores(tmp_path, tiny_model, monkeypatch):
    """--overwrite of a study of another config deleted it before the new config had trained anything: a
    failed or stopped first trial lost the old study. It is set aside and put back unless a trial scores."""
    import tunesmith.train.stage as stage

    config = _project(tmp_path, tiny_model)
    out = tmp_path / "t"
    assert runner.invoke(app, ["tune", config, "--trials", "1", "--out", str(out), "--quiet"]).exit_code in (0, 3)
    shutil.rmtree(out / "best")
    study, log = (out / "study.sqlite").read_bytes(), (out / "trials" / "000" / "train_log.jsonl").read_text()
    Path(config).write_text(Path(config).read_text().replace("max_steps: 6", "max_steps: 5"))

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(stage, "train_stage", stopped)
    result = runner.invoke(app, ["tune", config, "--trials", "1", "--out", str(out), "--quiet", "--overwrite"])
    assert result.exit_code == 130, result.output
    assert (out / "study.sqlite").read_bytes() == study
    assert (out / "trials" / "000" / "train_log.jsonl").read_text() == log and not (out / ".replaced").exists()
    # A tune killed outright leaves the set-aside study undecided: the next tune puts it back first, and a
    # second --overwrite never deletes it on the way.
    (out / ".replaced").mkdir()
    for name in ("study.sqlite", "trials"):
        (out / name).replace(out / ".replaced" / name)
    refused = runner.invoke(app, ["tune", config, "--trials", "1", "--out", str(out), "--quiet"])
    assert refused.exit_code == 2 and "another config" in refused.stderr, refused.output
    assert (out / "study.sqlite").read_bytes() == study and not (out / ".replaced").exists()
    monkeypatch.undo()
    again = runner.invoke(app, ["tune", config, "--trials", "1", "--out", str(out), "--quiet", "--overwrite"])
    assert again.exit_code in (0, 3), again.output
    assert (out / "study.sqlite").read_bytes() != study and not (out / ".replaced").exists()
    shutil.rmtree(out / "best")
    Path(config).write_text(Path(config).read_text().replace("name: tiny", "name: renamed"))  # another name
    refused = runner.invoke(app, ["tune", config, "--trials", "1", "--out", str(out), "--quiet"])
    assert refused.exit_code == 2 and "another project name ('tiny')" in refused.stderr, refused.output
    renamed = runner.invoke(app, ["tune", config, "--trials", "1", "--out", str(out), "--quiet", "--overwrite"])
    assert renamed.exit_code in (0, 3), renamed.output
    names = sqlite3.connect(out / "study.sqlite").execute("SELECT study_name FROM studies").fetchall()
    assert names == [("renamed",)] and not (out / ".replaced").exists()
