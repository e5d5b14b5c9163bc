"""Review findings on issue 16: located errors for oversized numbers, human exports and data outputs
that never replace work, linear-time text patterns, and run folders that leave the user's files alone."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import PROJECT, make_texts, write_jsonl
from tunesmith.cli import app
from tunesmith.errors import RunDirError
from tunesmith.runs import STAGING_MARKER, lock_path, run_lock, staged, staging_dir

runner = CliRunner()
HUGE_INT = "7" * 5000  # over Python's 4300-digit int/str conversion limit


def _one_error(result, *needles: str) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _project(folder: Path, tiny_model, data_dir: str = ".") -> str:
    """A project whose data files live in `folder/data_dir`; returns the config path."""
    (folder / data_dir).mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / data_dir / "train.jsonl", make_texts(30, 1))
    write_jsonl(folder / data_dir / "test.jsonl", make_texts(9, 2))
    text = PROJECT.format(model=tiny_model, method="lora")
    text = text.replace("train: train.jsonl", f"train: {data_dir}/train.jsonl")
    text = text.replace("test: test.jsonl", f"test: {data_dir}/test.jsonl")
    (folder / "project.yaml").write_text(text, encoding="utf-8")
    return str(folder / "project.yaml")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _finishes_fast(code: str, bound_s: float = 2.0) -> list:
    """Run `code` (which prints a JSON list of [result, seconds] pairs) in a child process, so that a
    quadratic pattern fails the test instead of hanging it; every call must take under `bound_s`."""
    try:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("still running after 60 s: a pattern is not linear-time")
    assert done.returncode == 0, done.stderr
    timings = json.loads(done.stdout)
    assert all(seconds < bound_s for _, seconds in timings), timings
    return [result for result, _ in timings]


# -- item 13: a number over Python's digit limit is a located row problem ---------------------------

def test_item13_jsonl_number_over_the_digit_limit_is_a_located_error(tmp_path, tiny_model):
    config = _project(tmp_path, tiny_model)
    train = tmp_path / "train.jsonl"
    with open(train, "a", encoding="utf-8") as f:
        f.write('{"text": ' + HUGE_INT + ', "label": "alpha"}\n')
    result = runner.invoke(app, ["data", "check", config])
    assert result.exit_code == 2, result.output
    assert f"{train}:31: number too long" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_item13_key_file_with_a_number_over_the_digit_limit_is_exit_2(tmp_path):
    key = tmp_path / "key.json"
    key.write_text('{"one": "a", "two": "b", "seed": ' + HUGE_INT + ', "pairs": {}}', encoding="utf-8")
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("id,rater,choice\n", encoding="utf-8")
    result = runner.invoke(app, ["human", "import", str(ratings), "--key", str(key)])
    assert result.exit_code == 2, result.output
    _one_error(result, str(key), "number too long")


# -- item 15: a second export never silently replaces the key of ratings being collected ------------

def _run_dir(tmp_path: Path, n: int = 12) -> Path:
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    rows = [{"text": f"question {i}", "gold": "x", "prediction": f"tuned {i}", "baseline_prediction": f"base {i}",
             "source": f"test.csv:{i + 2}"} for i in range(n)]
    write_jsonl(run / "predictions" / "test.jsonl", rows)
    return run


def test_item15_second_human_export_into_the_same_folder_needs_overwrite(tmp_path):
    run = _run_dir(tmp_path)
    assert runner.invoke(app, ["human", "export", str(run)]).exit_code == 0
    folder = run / "human"
    before = _snapshot(folder)
    again = runner.invoke(app, ["human", "export", str(run)])
    assert again.exit_code == 2, again.output
    _one_error(again, f"--out {folder}", "key.json", "--overwrite")
    assert _snapshot(folder) == before
    replaced = runner.invoke(app, ["human", "export", str(run), "--overwrite", "--seed", "5"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((folder / "key.json").read_text())["seed"] == 5


def test_item15_export_leaves_a_users_pairs_file_alone(tmp_path):
    run = _run_dir(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "pairs.csv").write_text("my own pairs\n")
    result = runner.invoke(app, ["human", "export", str(run), "--out", str(mine)])
    assert result.exit_code == 2, result.output
    _one_error(result, f"--out {mine}", "pairs.csv")
    assert sorted(p.name for p in mine.iterdir()) == ["pairs.csv"]
    assert (mine / "pairs.csv").read_text() == "my own pairs\n"


# -- item 1 (security standard): every pattern run on user text is linear-time ----------------------

def test_item1_html_normalisation_is_linear_on_hostile_text():
    results = _finishes_fast("""
        import json, time
        from tunesmith.config import NormalizeSettings
        from tunesmith.data.normalize import normalize_text
        out = []
        for text in ["<!--" * 50000, "<" * 100000, "<a " * 50000, "&#" * 100000, "<a" + " " * 100000,
                     "\\n" + " " * 100000 + "x", "<!-- c -->" * 20000 + "<!--" * 20000]:
            start = time.perf_counter()
            cleaned, changes = normalize_text(text, NormalizeSettings())
            out.append([[len(cleaned), changes], time.perf_counter() - start])
        print(json.dumps(out))
    """)
    assert results[0] == [200000, []]  # an unclosed comment is text, as before
    assert results[6] == [80000, ["html", "whitespace"]]  # closed comments go, the unclosed tail stays


def test_item1_normalisation_is_unchanged_on_ordinary_html():
    from tunesmith.config import NormalizeSettings
    from tunesmith.data.normalize import normalize_text

    text = "<p class='x'>Hi &amp; <b>bye</b><!-- a <b> note --> there</p>\n\n\n\nnext<br/> line <!-- open"
    cleaned, changes = normalize_text(text, NormalizeSettings())
    assert cleaned == "Hi & bye there\n\nnext line <!-- open"
    assert changes == ["html", "whitespace"]


def test_item1_judge_reply_parsing_is_linear_on_hostile_replies():
    results = _finishes_fast("""
        import json, time
        from tunesmith.evaluate.judge import parse_score, parse_verdict
        out = []
        for reply in ["score" + " " * 100000, "Score:" + " " * 100000 + "7", "verdict" + " " * 100000,
                      "Score: 7" + " " * 100000]:
            start = time.perf_counter()
            found = [parse_score(reply), parse_verdict(reply)]
            out.append([found, time.perf_counter() - start])
        print(json.dumps(out))
    """)
    assert results == [[None, None], [None, None], [None, None], [7, None]]


# -- item 9: data commands never overwrite the user's files ----------------------------------------

@pytest.mark.parametrize("command", ["clean", "augment", "split"])
def test_item9_data_out_never_overwrites_the_users_data_folder(tmp_path, tiny_model, command):
    config = _project(tmp_path, tiny_model, data_dir="data")
    data = tmp_path / "data"
    before = _snapshot(data)
    quiet = [] if command == "split" else ["-q"]
    result = runner.invoke(app, ["data", command, config, "--out", str(data), *quiet])
    assert result.exit_code == 2, result.output
    _one_error(result, f"--out {data}", "input file")
    (data / ".tunesmith-data").write_text("")  # even a folder marked as an earlier output: inputs are never replaced
    result = runner.invoke(app, ["data", command, config, "--out", str(data), *quiet])
    assert result.exit_code == 2, result.output
    (data / ".tunesmith-data").unlink()
    assert _snapshot(data) == before


def test_item9_data_out_refuses_a_folder_of_other_files_and_reuses_its_own(tmp_path, tiny_model):
    config = _project(tmp_path, tiny_model)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.jsonl").write_text("my labelled rows\n")
    (mine / "notes.txt").write_text("years of work\n")
    result = runner.invoke(app, ["data", "split", config, "--out", str(mine)])
    assert result.exit_code == 2, result.output
    _one_error(result, f"--out {mine}", "not an earlier output")
    assert _snapshot(mine) == {"train.jsonl": b"my labelled rows\n", "notes.txt": b"years of work\n"}
    out = tmp_path / "split"
    out.mkdir()  # an empty folder is fine, and so is writing again into an earlier output
    for _ in range(2):
        result = runner.invoke(app, ["data", "split", config, "--out", str(out)])
        assert result.exit_code == 0, result.output
    assert (out / "train.jsonl").is_file() and (out / "report.json").is_file()


def test_item9_data_out_accepts_an_output_written_before_the_marker(tmp_path, tiny_model):
    config = _project(tmp_path, tiny_model)
    out = tmp_path / "old"
    assert runner.invoke(app, ["data", "split", config, "--out", str(out)]).exit_code == 0
    (out / ".tunesmith-data").unlink()
    result = runner.invoke(app, ["data", "split", config, "--out", str(out)])
    assert result.exit_code == 0, result.output


# -- item 9: runs leave a user's "latest", staging-named folder and lock-named file alone -----------

def test_item9_latest_that_is_not_a_symlink_is_left_alone(tmp_path, capsys):
    runs = tmp_path / "runs" / "tiny"
    (runs / "latest").mkdir(parents=True)
    (runs / "latest" / "mine.txt").write_text("mine\n")
    for name in ("r1", "r2"):
        with staged(runs / name) as folder:
            (folder / "config.yaml").write_text("name: tiny\n")
    assert (runs / "r2" / "config.yaml").is_file() and not (runs / "r2" / STAGING_MARKER).exists()
    assert sorted(p.name for p in (runs / "latest").iterdir()) == ["mine.txt"]
    err = capsys.readouterr().err
    assert "warning:" in err and str(runs / "latest") in err
    (runs / "latest" / "mine.txt").unlink()
    (runs / "latest").rmdir()
    with staged(runs / "r3") as folder:
        (folder / "config.yaml").write_text("name: tiny\n")
    assert (runs / "latest").is_symlink() and (runs / "latest").resolve() == (runs / "r3").resolve()


def test_item9_staging_named_folder_that_tunesmith_did_not_make_is_kept(tmp_path, tiny_model):
    config = _project(tmp_path, tiny_model)
    out = tmp_path / "run"
    mine = staging_dir(out)
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work\n")
    result = runner.invoke(app, ["train", config, "--out", str(out), "-q"])
    assert result.exit_code == 2, result.output
    _one_error(result, str(mine), "not a tunesmith staging folder", "--out")
    assert _snapshot(mine) == {"thesis.txt": b"years of work\n"} and not out.exists()
    assert not lock_path(out).exists()


def test_item9_stale_staging_folder_that_tunesmith_made_is_replaced(tmp_path):
    out = tmp_path / "run"
    stale = staging_dir(out)
    stale.mkdir()
    (stale / STAGING_MARKER).touch()
    (stale / "half.bin").write_text("from a killed run")
    with staged(out) as folder:
        assert sorted(p.name for p in folder.iterdir()) == [STAGING_MARKER]
        (folder / "config.yaml").write_text("name: tiny\n")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


@pytest.mark.parametrize("content", ["my notes\n", "12345\nmore\n", "x" * 5000])
def test_item9_lock_named_file_of_the_user_is_never_truncated(tmp_path, tiny_model, content):
    config = _project(tmp_path, tiny_model)
    out = tmp_path / "run"
    lock = lock_path(out)
    lock.write_text(content)
    result = runner.invoke(app, ["train", config, "--out", str(out), "-q"])
    assert result.exit_code == 2, result.output
    _one_error(result, str(lock), "not a tunesmith lock")
    assert lock.read_text() == content and not out.exists() and not staging_dir(out).exists()


def test_item9_lock_never_follows_a_symlink_and_takes_over_a_pid_file(tmp_path):
    out = tmp_path / "run"
    target = tmp_path / "empty-but-mine.txt"
    target.write_text("")
    lock_path(out).symlink_to(target)
    with pytest.raises(RunDirError) as refused, run_lock(out):
        pass
    assert refused.value.exit_code == 2 and lock_path(out).is_symlink() and target.read_text() == ""
    lock_path(out).unlink()
    for stale in ("", "4242\n", "4242"):
        lock_path(out).write_text(stale)
        with run_lock(out):
            assert lock_path(out).read_text().strip().isdigit()
        assert not lock_path(out).exists()
