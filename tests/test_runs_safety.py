"""Runs never destroy work: --out guards, the run lock, failures after training, durable writes (issue 16)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import PROJECT, make_texts, write_jsonl
from tunesmith import fsio
from tunesmith.cli import app
from tunesmith.run_registry import record_run
from tunesmith.runs import STAGING_MARKER, lock_path, staging_dir

runner = CliRunner()


def _project(folder: Path, tiny_model: Path, extra: str = "") -> str:
    write_jsonl(folder / "train.jsonl", make_texts(30, 1))
    write_jsonl(folder / "test.jsonl", make_texts(9, 2))
    (folder / "project.yaml").write_text(PROJECT.format(model=tiny_model, method="lora") + extra, encoding="utf-8")
    return str(folder / "project.yaml")


def _one_error(result, *needles: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.txt").write_text("years of work\n")
    return path


# -- item 9: --out never replaces what is not a run -------------------------------------------------

@pytest.mark.parametrize("command", ["run", "train"])
def test_item9_out_dir_not_a_run_is_refused(tmp_path, tiny_model, command):
    config = _project(tmp_path, tiny_model)
    folder = _user_folder(tmp_path / "mine")
    for extra in ([], ["--overwrite"]):
        result = runner.invoke(app, [command, config, "--out", str(folder), "-q", *extra])
        assert result.exit_code == 2, result.output
        _one_error(result, "--out", str(folder), "not a tunesmith run directory")
        assert sorted(p.name for p in folder.iterdir()) == ["thesis.txt"]
        assert (folder / "thesis.txt").read_text() == "years of work\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging, no lock


def test_a_run_is_never_written_inside_another_run(tmp_path):
    """A run inside another's model/ or predictions/ polluted it, and an --overwrite of the outer run
    would have deleted the inner one unasked."""
    from tunesmith.errors import RunDirError
    from tunesmith.runs import check_out

    outer = tmp_path / "champ"
    (outer / "model").mkdir(parents=True)
    (outer / "model" / "tunesmith.json").write_text("{}")
    for inner in (outer / "model" / "sub", outer / "predictions" / "x", outer / "model" / "a" / "b"):
        with pytest.raises(RunDirError, match="is inside the run directory"):
            check_out(inner)
        assert not inner.exists()
    (tmp_path / "link").symlink_to(outer / "model")
    with pytest.raises(RunDirError, match="is inside the run directory"):
        check_out(tmp_path / "link" / "sub")
    check_out(tmp_path / "beside")  # a folder next to the run is fine
    # a run's own config.yaml run again: its default folder (runs/NAME/ID beside it) is inside the run
    with pytest.raises(RunDirError) as refused:
        check_out(outer / "runs" / "tiny" / "20261206-000000-0001", given=False)
    assert "the default run folder" in refused.value.line() and "give --out a folder" in refused.value.line()
    from tunesmith.runs import check_runs_folder

    with pytest.raises(RunDirError) as refused:  # compare/tune: --out as given, not a run folder inside it
        check_runs_folder(outer / "model" / "bake", ["best"], ("study.sqlite",))
    assert f"--out {outer / 'model' / 'bake'}," in refused.value.line() and "bake/best" not in refused.value.line()


def test_item9_out_dot_never_deletes_the_current_folder(tmp_path, tiny_model, monkeypatch):
    config = _project(tmp_path, tiny_model)
    here = tmp_path / "empty-here"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in (".", str(here), ".."):
        result = runner.invoke(app, ["train", config, "--out", out, "-q", "--overwrite"])
        assert result.exit_code == 2, result.output
        _one_error(result, "--out", "current folder")
        assert here.is_dir() and Path.cwd() == here
    assert (tmp_path / "project.yaml").is_file()


def test_item9_existing_run_is_replaced_only_with_overwrite(tmp_path, tiny_model):
    config = _project(tmp_path, tiny_model)
    out = tmp_path / "empty"
    out.mkdir()  # an empty folder loses nothing: it is used
    assert runner.invoke(app, ["train", config, "--out", str(out), "-q"]).exit_code == 0
    weights = out / "model" / "adapter_model.safetensors"
    before = weights.read_bytes()
    (out / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["train", config, "--out", str(out), "-q"])
    assert result.exit_code == 2
    _one_error(result, "already holds a tunesmith run", "--overwrite")
    assert weights.read_bytes() == before and (out / "notes.txt").read_text() == "mine"
    assert runner.invoke(app, ["train", config, "--out", str(out), "-q", "--overwrite"]).exit_code == 0
    assert (out / "model" / "tunesmith.json").is_file() and not (out / "notes.txt").exists()


def test_item9_compare_and_tune_refuse_a_user_folder(tmp_path, tiny_model):
    config = _project(tmp_path, tiny_model)
    folder = _user_folder(tmp_path / "mine")
    compare = runner.invoke(app, ["compare", config, "--methods", "lora", "--out", str(folder), "-q"])
    assert compare.exit_code == 2
    _one_error(compare, "--out", "thesis.txt")
    tune = runner.invoke(app, ["tune", config, "--trials", "1", "--out", str(folder), "-q"])
    assert tune.exit_code == 2
    _one_error(tune, "--out", "thesis.txt")
    inner = _user_folder(tmp_path / "bake" / "lora")  # a method's subfolder that is the user's
    compare = runner.invoke(app, ["compare", config, "--methods", "lora", "--out", str(tmp_path / "bake"), "-q"])
    assert compare.exit_code == 2
    _one_error(compare, str(inner), "not a tunesmith run directory")
    for f in (folder, inner):
        assert sorted(p.name for p in f.iterdir()) == ["thesis.txt"]
    assert not (folder / "study.sqlite").exists()
    # Trial logs kept without their study: numbering would restart and replace them.
    log = tmp_path / "study" / "trials" / "000" / "train_log.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text('{"step": 1}\n')
    tune = runner.invoke(app, ["tune", config, "--trials", "1", "--out", str(tmp_path / "study"), "-q"])
    assert tune.exit_code == 2
    _one_error(tune, "no study.sqlite", "--overwrite")
    assert log.read_text() == '{"step": 1}\n' and not (tmp_path / "study" / "study.sqlite").exists()
    # A user's file inside trials/ (even in a folder named like a trial's): refused, --overwrite or not.
    (log.parent / "data.csv").write_text("mine")
    for extra in ([], ["--overwrite"]):
        tune = runner.invoke(app, ["tune", config, "--trials", "1", "--out", str(tmp_path / "study"), "-q", *extra])
        assert tune.exit_code == 2
        _one_error(tune, "did not write", "trials/000/data.csv")
    assert (log.parent / "data.csv").read_text() == "mine" and log.read_text() == '{"step": 1}\n'


# -- item 10: one writer per run directory ----------------------------------------------------------

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tunesmith.runs import run_lock
    with run_lock(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(300)
""")


def test_item10_second_run_into_a_locked_out_is_refused(tmp_path, tiny_model):
    config = _project(tmp_path, tiny_model)
    out = tmp_path / "run"
    staging = staging_dir(out)
    staging.mkdir()
    (staging / STAGING_MARKER).touch()  # what the first run wrote when it made its staging folder
    (staging / "first.txt").write_text("the first run's work")  # what the first run has staged so far
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = runner.invoke(app, ["train", config, "--out", str(out), "-q", "--overwrite"])
        assert result.exit_code == 2, result.output
        _one_error(result, f"pid {holder.pid}", str(out))
        assert (staging / "first.txt").read_text() == "the first run's work" and not out.exists()
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind with a dead pid in it
        holder.wait()
    assert lock_path(out).read_text().strip() == str(holder.pid)
    result = runner.invoke(app, ["train", config, "--out", str(out), "-q"])  # the stale lock is taken over
    assert result.exit_code == 0, result.output
    assert (out / "model" / "tunesmith.json").is_file() and not lock_path(out).exists()


# -- item 11: a failure after training keeps the trained model --------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_item11_unreachable_judge_keeps_the_trained_model(tmp_path, tiny_model):
    judge = (f"  judge:\n    enabled: true\n    endpoint: http://127.0.0.1:{_closed_port()}/v1\n"
             "    model: judge\n    timeout_s: 5\n")
    config = _project(tmp_path, tiny_model)
    Path(config).write_text(Path(config).read_text().replace("eval:\n", "eval:\n" + judge), encoding="utf-8")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "run", config, "--out", str(out), "-q"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    _one_error(proc, "eval stage failed", f"`tunesmith eval {out}`")
    assert (out / "model" / "tunesmith.json").is_file() and (out / "model" / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"]["stage"] == "eval" and "Connect" in summary["failed"]["error"]
    assert "objective" not in summary and summary["training"]["steps"] == 6
    assert not staging_dir(out).exists() and not lock_path(out).exists()
    shown = runner.invoke(app, ["runs", "show", str(out)])
    assert shown.exit_code == 0 and "eval stage failed" in shown.output
    assert runner.invoke(app, ["runs", "diff", str(out), str(out)]).exit_code == 2  # no verdict to compare yet
    report = runner.invoke(app, ["report", str(out)])  # it said "lacks metrics.json ... restore it"
    assert report.exit_code == 2 and "the run's eval stage failed, so it has no verdict" in report.stderr
    assert f"run `tunesmith eval {out}`" in report.stderr
    saved = yaml.safe_load((out / "config.yaml").read_text())
    saved["eval"]["judge"]["enabled"] = False  # the judge is fixed; eval completes the run
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    done = runner.invoke(app, ["eval", str(out), "-q"])
    assert done.exit_code == 0, done.output
    summary = json.loads((out / "summary.json").read_text())
    assert "failed" not in summary and summary["objective"]["met"] is True and (out / "report.html").is_file()
    assert str(out) in runner.invoke(app, ["runs", "list"]).output


def test_item11_failing_report_stage_keeps_the_evaluated_run(tmp_path, tiny_model, monkeypatch):
    from tunesmith import pipeline

    config = _project(tmp_path, tiny_model)
    out = tmp_path / "run"
    real = pipeline.report_stage

    def broken(run_dir):
        raise RuntimeError("plot failed: $\\alpha$")
    monkeypatch.setattr(pipeline, "report_stage", broken)
    result = runner.invoke(app, ["run", config, "--out", str(out), "-q"])
    assert result.exit_code == 1
    _one_error(result, "report stage failed", "RuntimeError: plot failed", f"`tunesmith report {out}`")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"]["met"] is True and summary["failed"]["stage"] == "report"
    assert (out / "metrics.json").is_file() and not (out / "report.html").exists()
    monkeypatch.setattr(pipeline, "report_stage", real)
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0
    assert "failed" not in json.loads((out / "summary.json").read_text()) and (out / "report.html").is_file()


# -- item 12: durable, umask-respecting writes; replace_dir can always go back ----------------------

def test_item12_atomic_write_fsyncs_file_and_folder_without_touching_the_umask(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    def umask(_):
        raise AssertionError("os.umask changes the mask of every thread of the process")
    monkeypatch.setattr(os, "fsync", fsync)
    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", umask)
        fsio.write_json(tmp_path / "a.json", {"x": 1})
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert synced == [False, True]  # the file, then its folder
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640
    assert fsio.read_json(tmp_path / "a.json") == {"x": 1} and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def _new_and_old_run(tmp_path: Path) -> tuple[Path, Path]:
    """(a finished run's staging folder holding "new", the run folder it replaces holding "old")."""
    src, dst = tmp_path / ".run.partial", tmp_path / "run"
    for folder, text in ((src, "new"), (dst, "old")):
        folder.mkdir()
        (folder / "model.txt").write_text(text)
    return src, dst


@pytest.mark.parametrize("signum,raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)])
def test_a_signal_between_the_two_renames_waits_until_the_new_folder_is_in(tmp_path, monkeypatch, signum, raised):
    """Ctrl-C right after the old run was moved aside left no run at RUN_DIR: the old one hidden in
    .run.old-<pid>, the new one in .run.partial without the checkpoints a resume needs."""
    src, dst = _new_and_old_run(tmp_path)
    real_replace = os.replace

    def replace(a, b):
        real_replace(a, b)
        if Path(a) == dst:  # the old run is aside: the signal comes now
            os.kill(os.getpid(), signum)
    monkeypatch.setattr(os, "replace", replace)
    # Python's own Ctrl-C handler (a shell's background job starts with SIGINT ignored, as CI's does)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_term = signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # as the CLI's handler does
    try:
        with pytest.raises(raised):
            fsio.replace_dir(src, dst)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)
    assert (dst / "model.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_item12_replace_dir_puts_the_old_folder_back_when_the_move_in_fails(tmp_path, monkeypatch):
    src, dst = _new_and_old_run(tmp_path)
    real_replace = os.replace

    def replace(a, b):
        if Path(a) == src:
            raise OSError(28, "No space left on device")
        real_replace(a, b)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        fsio.replace_dir(src, dst)
    monkeypatch.undo()
    assert (dst / "model.txt").read_text() == "old" and (src / "model.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.partial", "run"]
    fsio.replace_dir(src, dst)
    assert (dst / "model.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # A link where the folder was: replaced, never followed, and not left behind as .run.old-<pid>
    (tmp_path / "users").mkdir()
    (tmp_path / "users" / "keep.txt").write_text("mine")
    shutil.rmtree(dst)
    dst.symlink_to(tmp_path / "users")
    src.mkdir()
    fsio.replace_dir(src, dst)
    assert not dst.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["run", "users"]
    assert (tmp_path / "users" / "keep.txt").read_text() == "mine"


def test_an_output_folder_is_taken_only_when_new_empty_or_an_earlier_output(tmp_path):
    from tunesmith.errors import InputError

    def ours(folder):
        return (folder / ".mine").is_file()

    def refusal(folder):
        try:
            fsio.check_output_folder(folder, "--out x", ours, "tunesmith thing")
        except InputError as e:
            return str(e)
        return None

    (tmp_path / "empty").mkdir()
    (tmp_path / "users").mkdir()
    (tmp_path / "users" / "prometheus.yml").write_text("mine")
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / ".mine").write_text("")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert refusal(tmp_path / "new" / "deeper") is None and refusal(tmp_path / "empty") is None
    assert refusal(tmp_path / "earlier") is None
    assert "not an earlier output of `tunesmith thing`; left untouched" in refusal(tmp_path / "users")
    assert "exists and is not a folder" in refusal(tmp_path / "afile")
    assert f"is a symbolic link to {tmp_path / 'nowhere'}, which does not exist" in refusal(tmp_path / "dangling")
    assert "cannot be created" in refusal(tmp_path / "afile" / "sub")
    assert f"{tmp_path / 'dangling'} is a symbolic link to" in refusal(tmp_path / "dangling" / "sub")
    assert (tmp_path / "users" / "prometheus.yml").read_text() == "mine" and not (tmp_path / "new").exists()


# -- item 13: `runs show ID` of a deleted folder ----------------------------------------------------

def test_item13_runs_show_of_a_deleted_run_folder_exits_2(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_REGISTRY", str(tmp_path / "registry.sqlite"))
    run_dir = tmp_path / "gone"
    run_dir.mkdir()
    summary = {"name": "p", "model": "m", "method": "lora", "objective_metric": "accuracy", "run_dir": str(run_dir),
               "report": str(run_dir / "report.html"),
               "objective": {"met": True, "criteria": []},
               "metrics": {"baseline": {"accuracy": 0.5}, "finetuned": {"accuracy": 0.9}}}
    fsio.write_json(run_dir / "summary.json", summary)
    run_id = record_run(run_dir)
    assert runner.invoke(app, ["runs", "show", str(run_id)]).exit_code == 0
    (run_dir / "summary.json").unlink()
    run_dir.rmdir()
    result = runner.invoke(app, ["runs", "show", str(run_id)])
    assert result.exit_code == 2
    _one_error(result, f"run {run_id}", "folder is gone", str(run_dir))


def test_compare_and_tune_refuse_a_rank_the_model_cannot_take_before_any_training(tmp_path, tiny_model):
    """The tiny model's layers are 64 wide: lora.r 100 is found on its shape (meta device) before the
    first method trains or a study is made, so nothing is written."""
    config = _project(tmp_path, tiny_model)
    text = Path(config).read_text()
    Path(config).write_text(text.replace("method: lora", "method: lora\n  lora: {r: 100}"))
    compare = runner.invoke(app, ["compare", config, "--methods", "full,lora", "--out", str(tmp_path / "c"), "-q"])
    assert compare.exit_code == 2
    _one_error(compare, "larger than the widest layer", "train.lora.r")
    tune = runner.invoke(app, ["tune", config, "--trials", "2", "--out", str(tmp_path / "t"), "-q"])
    assert tune.exit_code == 2
    _one_error(tune, "larger than the widest layer", "train.lora.r")
    assert not (tmp_path / "c").exists() and not (tmp_path / "t").exists()


def test_a_run_that_fails_takes_the_folders_it_made_with_it_and_no_other(tmp_path):
    """runs/<name>/ made for a run that failed before holding anything was left behind, empty; a folder
    that was there before, or one holding kept checkpoints, stays."""
    from tunesmith.runs import staged

    final = tmp_path / "runs" / "demo" / "20261207-0000"
    with pytest.raises(RuntimeError), staged(final):
        raise RuntimeError("failed in training")
    assert not (tmp_path / "runs").exists() and tmp_path.is_dir()
    (tmp_path / "runs" / "demo").mkdir(parents=True)  # the user's, empty: not this run's to remove
    with pytest.raises(RuntimeError), staged(final):
        raise RuntimeError("failed in training")
    assert (tmp_path / "runs" / "demo").is_dir()
    with pytest.raises(RuntimeError), staged(final) as staging:
        (staging / "checkpoints" / "step-0000002").mkdir(parents=True)
        raise RuntimeError("failed after a checkpoint")
    assert (tmp_path / "runs" / "demo" / ".20261207-0000.partial" / "checkpoints").is_dir()


def test_a_run_replaced_by_one_whose_eval_failed_leaves_the_registry(tmp_path, monkeypatch):
    """`run --out RUN --overwrite` whose eval was interrupted put the new run in place, while `runs list`
    still gave the replaced run's figures for that folder."""
    from tunesmith.run_registry import list_runs, record_run

    monkeypatch.setenv("TUNESMITH_REGISTRY", str(tmp_path / "registry.sqlite"))
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    summary = {"name": "p", "model": "m", "method": "lora", "objective_metric": "accuracy",
               "metrics": {"finetuned": {"accuracy": 0.9}, "baseline": {"accuracy": 0.3}},
               "objective": {"met": True, "criteria": [{"name": "accuracy", "value": 0.9, "target": 0.8,
                                                        "op": ">=", "met": True}]}}
    (run / "summary.json").write_text(json.dumps(summary))
    assert record_run(run) is not None and [r["value"] for r in list_runs()] == [0.9]
    del summary["objective"]
    summary["failed"] = {"stage": "eval", "error": "interrupted", "rerun": [f"tunesmith eval {run}"]}
    (run / "summary.json").write_text(json.dumps(summary))
    assert record_run(run) is None and list_runs() == []
