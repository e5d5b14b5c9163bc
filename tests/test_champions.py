"""The champion registry (tunesmith.champions) and `tunesmith promote` / `tunesmith rollback`: stack
semantics of promotions and rollbacks, refusals (bad names, gone folders, nothing to roll back to,
an objective not met), and promotions from two processes at once."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import PROJECT
from tunesmith import champions
from tunesmith.cli import app as cli
from tunesmith.errors import InputError, RunDirError
from tunesmith.run_registry import _registry as recording
from tunesmith.tasks.prompts import PromptFormat

runner = CliRunner()
PROMOTIONS = 300  # per process: enough that the two overlap


@pytest.fixture(autouse=True)
def registry(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "registry" / "runs.sqlite"
    monkeypatch.setenv("TUNESMITH_REGISTRY", str(path))
    return path


def _run(folder: Path, met: bool | None = True, name: str = "tiny", tokenizer: Path | None = None) -> Path:
    """A folder that passes for a trained run: model/tunesmith.json, config.yaml, summary.json, and the
    tokenizer files of `tokenizer` (promote loads the tokenizer a server would)."""
    model = folder / "model"
    model.mkdir(parents=True)
    for file in (tokenizer.glob("*.json") if tokenizer is not None else []):
        if file.name.startswith("tokenizer") or file.name == "special_tokens_map.json":
            shutil.copy(file, model / file.name)
    base = str(tokenizer) if tokenizer is not None else "tiny-model"  # promote checks the base is there
    meta = {"method": "lora", "kind": "adapter", "model": base, "base_model_path": base}
    (model / "tunesmith.json").write_text(json.dumps(meta), encoding="utf-8")
    fmt = PromptFormat("classification", "Classify.", ["alpha", "beta"], True, 64)
    (model / "prompt.json").write_text(json.dumps(fmt.to_json()), encoding="utf-8")
    (model / "adapter_config.json").write_text("{}", encoding="utf-8")
    save_file({"w": torch.zeros(2)}, str(model / "adapter_model.safetensors"))
    (folder / "config.yaml").write_text(PROJECT.format(model="tiny-model", method="lora")
                                        .replace("name: tiny", f"name: {name}"), encoding="utf-8")
    summary = {} if met is None else {"objective": {"met": met, "criteria": [
        {"name": "accuracy", "value": 0.9 if met else 0.5, "target": 0.8, "op": ">=", "met": met}]}}
    (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return folder.resolve()


@pytest.fixture()
def runs(tmp_path, tiny_model) -> dict[str, Path]:
    return {k: _run(tmp_path / k, tokenizer=tiny_model) for k in "ABCD"}


def test_stack_semantics(runs):
    a, b, c, d = (runs[k] for k in "ABCD")
    assert champions.current("bank") is None
    first = champions.promote("bank", a)
    champions.promote("bank", b, parent=a, reason="retrain", record={"gain": 0.1})
    champions.promote("bank", c)
    assert champions.current("bank") == c
    assert champions.rollback("bank") == (b, c) and champions.current("bank") == b
    assert champions.rollback("bank") == (a, b)  # two rollbacks: two steps back
    with pytest.raises(InputError, match="nothing to roll back to"):
        champions.rollback("bank")
    champions.promote("bank", d)  # a promote after rollbacks pushes on what is left: [A, D]
    assert champions.current("bank") == d
    assert champions.rollback("bank") == (a, d)  # not C or B: they were rolled away from
    events = champions.history("bank")
    assert [(e["action"], Path(e["run_dir"]).name, e["previous"] and Path(e["previous"]).name) for e in events] == [
        ("promote", "A", None), ("promote", "B", "A"), ("promote", "C", "B"), ("rollback", "B", "C"),
        ("rollback", "A", "B"), ("promote", "D", "A"), ("rollback", "A", "D")]
    assert events[0]["id"] == first and events[1]["parent"] == str(a) and events[1]["reason"] == "retrain"
    assert events[1]["record"] == {"gain": 0.1} and events[0]["record"] is None
    assert champions.current("other") is None and champions.history("other") == []  # names are independent


def test_promoting_the_champion_again_changes_nothing(runs):
    first = champions.promote("bank", runs["A"])
    assert champions.promote("bank", runs["A"]) == first and len(champions.history("bank")) == 1
    champions.promote("bank", runs["B"])
    champions.promote("bank", runs["A"])  # A again, on top of B: a real change, pushed
    assert champions.current("bank") == runs["A"] and champions.rollback("bank") == (runs["B"], runs["A"])


def test_refusals(runs, tmp_path):
    with pytest.raises(InputError, match="nothing is promoted under 'bank'"):
        champions.rollback("bank")
    for bad in ("", "../x", "a b", "-x", "x" * 101, "a/b"):
        with pytest.raises(InputError, match="bad registry name"):
            champions.current(bad)
        with pytest.raises(InputError, match="bad registry name"):
            champions.promote(bad, runs["A"])
    with pytest.raises(InputError) as info:  # a huge name is not echoed whole
        champions.check_name("x/" * 3000, "--registry")
    assert info.value.where == "--registry" and len(info.value.line()) < 400
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="not a trained run directory"):
        champions.promote("bank", tmp_path / "empty")
    assert champions.history("bank") == []


def test_rollback_to_a_gone_folder_is_refused_and_changes_nothing(runs):
    champions.promote("bank", runs["A"])
    champions.promote("bank", runs["B"])
    (runs["A"] / "model" / "tunesmith.json").unlink()
    with pytest.raises(RunDirError, match="the run to roll back to is gone") as e:
        champions.rollback("bank")
    assert e.value.where == str(runs["A"]) and "tunesmith promote" in e.value.hint
    assert champions.current("bank") == runs["B"] and len(champions.history("bank")) == 2


def test_an_unreadable_registry_is_one_clear_error(registry, runs):
    registry.parent.mkdir(parents=True)
    registry.write_bytes(b"this is not a database, just text " * 100)
    with pytest.raises(InputError, match="not a readable SQLite file") as e:
        champions.current("bank")
    assert e.value.where == str(registry)


def test_reading_a_registry_that_is_not_there_makes_none(registry):
    assert champions.current("bank") is None and champions.history("bank") == []
    assert not registry.exists() and not registry.parent.exists()
    with pytest.raises(InputError, match="the run registry file is gone") as e:  # what a following server asks
        champions.current("bank", must_exist=True)
    assert e.value.where == str(registry)


def _chain_is_consistent(name: str) -> list[dict]:
    events = champions.history(name)
    for before, after in zip(events, events[1:]):  # each event replaced what the one before made current
        assert after["previous"] == before["run_dir"], (before, after)
    return events


def test_concurrent_promotions_from_threads(runs):
    errors = []

    def promote_many(run: Path):
        try:
            for _ in range(PROMOTIONS):
                champions.promote("bank", run)
        except Exception as e:  # collected: an exception in a thread would not fail the test by itself
            errors.append(e)
    threads = [threading.Thread(target=promote_many, args=(runs[k],)) for k in "AB"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _chain_is_consistent("bank")


def test_a_promotion_reads_the_registry_only_after_another_writer_is_done(runs, registry, monkeypatch):
    """Another connection is inside a write transaction (B promoted, not yet committed) when a promotion
    starts: the promotion waits for it and then records B as what it replaced. A transaction that read
    first and took the write lock later would read A, then deadlock with the other writer."""
    monkeypatch.setattr(champions, "BUSY_TIMEOUT_S", 5)
    champions.promote("bank", runs["A"])
    other = sqlite3.connect(str(registry), timeout=5, isolation_level=None)
    other.execute("BEGIN")
    other.execute("SELECT count(*) FROM promotions").fetchone()
    other.execute("INSERT INTO promotions (name, action, run_dir, previous, ts, reason) "
                  "VALUES ('bank', 'promote', ?, ?, 'now', 'other')", (str(runs["B"]), str(runs["A"])))
    done: dict = {}

    def promote_c():
        try:
            done["id"] = champions.promote("bank", runs["C"])
        except Exception as e:  # collected, see below
            done["error"] = e
    thread = threading.Thread(target=promote_c)
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive()  # waiting for the other writer
    other.execute("COMMIT")
    other.close()
    thread.join(30)
    assert "error" not in done, done
    events = _chain_is_consistent("bank")
    assert [Path(e["run_dir"]).name for e in events] == ["A", "B", "C"] and events[-1]["id"] == done["id"]


def test_concurrent_promotions_from_two_processes(runs, registry):
    """Two processes promote at once, each its own run, PROMOTIONS times: no error, and the events form one
    chain (every event's `previous` is the run current just before it), which needs the registry
    read and the write to happen in one locked transaction."""
    go = registry.parent / "go"
    code = ("import sys, time; from pathlib import Path; from tunesmith import champions\n"
            "while not Path(sys.argv[2]).exists(): time.sleep(0.001)\n"  # both start promoting together
            f"for i in range({PROMOTIONS}):\n"
            "    champions.promote('bank', Path(sys.argv[1]), reason=f'{sys.argv[1]} {i}')\n")
    env = {**os.environ, "TUNESMITH_REGISTRY": str(registry)}
    champions.promote("warm-up", runs["A"])  # the file exists before both start (a read does not make it)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(runs[k]), str(go)], env=env, stderr=subprocess.PIPE)
             for k in "AB"]
    time.sleep(1)  # both imported tunesmith and wait
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    events = _chain_is_consistent("bank")
    # Each promotion of the current champion is a no-op, so events alternate runs; at least one per process.
    assert {Path(e["run_dir"]).name for e in events} == {"A", "B"}
    assert all(a["run_dir"] != b["run_dir"] for a, b in zip(events, events[1:]))


def test_cli_promote_and_rollback(runs, tmp_path):
    out = runner.invoke(cli, ["promote", str(runs["A"])])
    assert out.exit_code == 0 and out.output.strip() == f"promoted {runs['A']} as tiny (was: none)"
    out = runner.invoke(cli, ["promote", str(runs["B"]), "--name", "bank"])
    assert out.exit_code == 0 and out.output.strip() == f"promoted {runs['B']} as bank (was: none)"
    out = runner.invoke(cli, ["promote", str(runs["C"]), "--name", "bank", "--reason", "better on traffic"])
    assert out.exit_code == 0 and out.output.strip() == f"promoted {runs['C']} as bank (was: {runs['B']})"
    assert champions.history("bank")[-1]["reason"] == "better on traffic"
    out = runner.invoke(cli, ["promote", str(runs["C"]), "--name", "bank"])
    assert out.exit_code == 0 and "already the champion of bank (nothing changed)" in out.output
    out = runner.invoke(cli, ["rollback", "bank"])
    assert out.exit_code == 0 and out.output.strip() == f"rolled back bank: now serving {runs['B']} (was: {runs['C']})"
    out = runner.invoke(cli, ["rollback", "bank"])
    assert out.exit_code == 2 and out.output.startswith("error: nothing to roll back to")
    # A generation run under a classifier's name: a server following it would refuse the swap for ever.
    gen = PromptFormat("generation", "Answer.", None, False, 64)
    (runs["D"] / "model" / "prompt.json").write_text(json.dumps(gen.to_json()), encoding="utf-8")
    out = runner.invoke(cli, ["promote", str(runs["D"]), "--name", "bank"])
    assert out.exit_code == 2 and "the run's task type is generation" in out.output and "--name" in out.output
    assert champions.current("bank") == runs["B"]
    out = runner.invoke(cli, ["promote", str(runs["D"]), "--name", "writer"])
    assert out.exit_code == 0, out.output


def test_a_registry_promote_made_lists_no_runs_and_another_programs_database_is_named(runs, registry):
    """`promote` before any run was recorded made the file with its promotions only: `runs list` said the
    registry could not be read and told the user to move it aside, promotion history and all."""
    champions.promote("bank", runs["A"])
    out = runner.invoke(cli, ["runs", "list"])
    assert out.exit_code == 0 and f"0 run(s) in {registry}" in out.output, out.output
    assert champions.current("bank") == runs["A"]
    other = registry.with_name("other.sqlite")
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE customers (id INTEGER)")
    out = runner.invoke(cli, ["runs", "list"], env={"TUNESMITH_REGISTRY": str(other)})
    assert out.exit_code == 2 and "not a run registry (tables: customers)" in out.output
    # Writers refuse it too, before any table of ours is made in it: promote, rollback, a run's record.
    wrong_columns = registry.with_name("wrong.sqlite")
    with sqlite3.connect(wrong_columns) as db:
        db.execute("CREATE TABLE runs (id INTEGER, path TEXT)")
    for db_file in (other, wrong_columns):
        before = db_file.read_bytes()
        for command in (["promote", str(runs["A"]), "--name", "bank"], ["rollback", "bank"]):
            out = runner.invoke(cli, command, env={"TUNESMITH_REGISTRY": str(db_file)})
            assert out.exit_code == 2 and "error: not a run registry (tables: " in out.output, out.output
        os.environ["TUNESMITH_REGISTRY"] = str(db_file)  # the fixture's monkeypatch restores it
        with pytest.raises(InputError, match="not a run registry"), recording():  # as record_run opens it
            pass
        assert db_file.read_bytes() == before


def test_cli_refuses_a_run_that_missed_its_objective(tmp_path, tiny_model):
    missed = _run(tmp_path / "missed", met=False, tokenizer=tiny_model)
    unevaluated = _run(tmp_path / "raw", met=None, tokenizer=tiny_model)
    out = runner.invoke(cli, ["promote", str(missed), "--name", "bank"])
    assert out.exit_code == 2 and "did not meet its objective: accuracy 0.5 (needs >= 0.8)" in out.output
    assert "--force" in out.output and champions.current("bank") is None
    out = runner.invoke(cli, ["promote", str(unevaluated), "--name", "bank"])
    assert out.exit_code == 2 and "not evaluated" in out.output and champions.current("bank") is None
    out = runner.invoke(cli, ["promote", str(missed), "--name", "bank", "--force"])
    assert out.exit_code == 0 and champions.current("bank") == missed
    assert champions.history("bank")[-1]["record"] == {"objective_met": False, "forced": True}
    for name in ([], ["--name", "bank"]):
        out = runner.invoke(cli, ["promote", str(tmp_path / "nowhere"), *name])
        assert out.exit_code == 2 and "not a trained run directory" in out.output
    out = runner.invoke(cli, ["promote", str(missed), "--name", "no/slash", "--force"])
    assert out.exit_code == 2 and "bad registry name" in out.output


@pytest.mark.parametrize("damage,expected", [
    (lambda m: (m / "adapter_model.safetensors").rename(m / "adapter_model.bin"), "weights are missing"),
    (lambda m: (m / "adapter_model.safetensors").write_bytes(b""), "weights cannot be read"),
    (lambda m: (m / "adapter_model.safetensors").write_bytes(os.urandom(5000)), "weights cannot be read"),
    (lambda m: (m / "tunesmith.json").write_text('{"method": 5}'), "metadata lacks 'method'"),
    (lambda m: (m / "prompt.json").write_text("[1]"), "an object expected"),
    (lambda m: (m.parent / "config.yaml").write_text("name: ["), "config.yaml"),  # the server reads it first
    (lambda m: (m / "tunesmith.json").write_text(json.dumps({**json.loads((m / "tunesmith.json").read_text()),
                                                              "model": str(m.parent / "gone-base"),
                                                              "base_model_path": str(m.parent / "gone-base")})),
     "the base model this run's adapter applies to is gone (unknown model"),
    (lambda m: (m / "prompt.json").write_text("{}"), "no field 'task_type'"),
    # a server could not read these either: peft parses the config and loads lora_A at its rank
    (lambda m: (m / "adapter_config.json").write_text("adapter: ["), "adapter_config.json"),
    (lambda m: (save_file({"l.lora_A.weight": torch.zeros(16, 4), "l.lora_B.weight": torch.zeros(4, 16)},
                          str(m / "adapter_model.safetensors")),
                (m / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')),
     "adapter_config.json says rank r=8, but the adapter's weights have rank 16"),
    # train.init_from: the merged earlier model in model/base is what the adapter loads onto
    (lambda m: (m / "tunesmith.json").write_text(json.dumps({**json.loads((m / "tunesmith.json").read_text()),
                                                              "base_in_model_dir": "base"})), "weights are missing"),
])
def test_a_run_whose_model_cannot_load_is_neither_promoted_nor_rolled_back_to(runs, damage, expected):
    """A server following the registry would refuse such a run later: promote and rollback say so now."""
    damage(runs["A"] / "model")
    out = runner.invoke(cli, ["promote", str(runs["A"]), "--name", "bank"])
    assert out.exit_code == 2 and expected in out.output and champions.current("bank") is None, out.output
    for r in (runs["B"], runs["C"]):
        assert runner.invoke(cli, ["promote", str(r), "--name", "bank"]).exit_code == 0
    damage(runs["B"] / "model")
    out = runner.invoke(cli, ["rollback", "bank"])
    assert out.exit_code == 2 and expected in out.output and champions.current("bank") == runs["C"], out.output


@pytest.mark.parametrize("summary", [[1, 2], {"objective": "met"}, {"objective": {"met": "false"}},
                                     {"objective": {"met": "no", "criteria": []}}, {"objective": {"met": 0}},
                                     {"objective": {"met": False, "criteria": ["x"]}},
                                     {"objective": {"met": True, "criteria": [  # met as edited, not as measured
                                         {"name": "accuracy", "value": 0.1, "target": 0.8, "op": ">=", "met": True}]}},
                                     {"objective": {"met": True, "criteria": [
                                         {"name": "accuracy", "value": 0.1, "target": 0.8, "op": ">=",
                                          "met": False}]}}])
def test_an_edited_verdict_is_named_never_read_as_met(runs, summary):
    (runs["A"] / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    out = runner.invoke(cli, ["promote", str(runs["A"]), "--name", "bank"])
    assert out.exit_code == 2 and "summary.json" in out.output and "Traceback" not in out.output, out.output
    assert "not what tunesmith wrote" in out.output and champions.current("bank") is None
