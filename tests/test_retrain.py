"""`tunesmith retrain`: the challenger's data from labelled traffic (no test leakage), and one whole
retrain through the CLI on a tiny classification run."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import PROJECT, make_texts, write_jsonl
from tunesmith.cli import app as cli
from tunesmith.config import derive, load_config
from tunesmith.data.prepare import prepare_data
from tunesmith.errors import InputError
from tunesmith.pipeline import retrain as retrain_module
from tunesmith.pipeline.retrain import _write_inputs
from tunesmith.pipeline.traffic import assemble, check_supported, is_traffic
from tunesmith.serve.server import serve_settings
from tunesmith.serve.store import STORED_CHARS, RequestLog, labelled

runner = CliRunner()

# The shared tiny project (conftest.PROJECT) with lora and this test's retrain settings.
CONFIG = PROJECT.replace("{method}", "lora") + """retrain:
  holdout: 0.25
  min_labelled: 10
  min_holdout: 5
  traffic_weight: {weight}
"""

# Traffic whose words the champion's rows never use, so nothing of it is a duplicate of them.
TRAFFIC_WORDS = "zebra quilt mango violet orbit pepper saddle tundra lantern walnut".split()


def traffic_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) pairs, all distinct and far apart from each other."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.sample(TRAFFIC_WORDS, 4) + [f"item{i}x{i * 7}q"]
        out.append((" ".join(words), ["alpha", "beta", "gamma"][i % 3]))
    return out


def fake_champion(tmp: Path, weight: int = 1) -> tuple[Path, object]:
    """A champion's data folder and config (no model: assembling the data needs none)."""
    run = tmp / "champion"
    (run / "data").mkdir(parents=True)
    train, test = make_texts(30, 1), make_texts(9, 2)
    write_jsonl(tmp / "train.jsonl", train)
    write_jsonl(tmp / "test.jsonl", test)
    for name, rows in (("train", train), ("test", test), ("validation", make_texts(6, 3))):
        write_jsonl(run / "data" / f"{name}.jsonl",
                    [{"input": r["text"], "target": r["label"], "source": f"{name}.jsonl:{i}"}
                     for i, r in enumerate(rows)])
    (run / "data" / "report.json").write_text(json.dumps({"labels": ["alpha", "beta", "gamma"]}))
    (run / "config.yaml").write_text(CONFIG.format(model="tiny", weight=weight))
    return run, load_config(run / "config.yaml", check_files=False)


def fill_log(db: Path, rows: list[tuple[str, str | None]], run_dir: str = "champion", prefix: str = "req",
             prompt_kind: str | None = None, **verdict) -> list[str]:
    """Log each (input, label) as an answered request with a verdict; returns the request ids in order."""
    log = RequestLog(db, redact_pii=False)
    ids = []
    for i, (text, label) in enumerate(rows):
        rid = f"{prefix}{i:04d}"
        log.write([{"route": "/v1/classify", "request_id": rid, "input": text, "output": "alpha", "label": "alpha",
                    "run_dir": run_dir, "prompt_kind": prompt_kind}])
        if label is not None:
            log.add_feedback(rid, **(verdict or {"label": label}))  # a label, unless another verdict is given
        ids.append(rid)
    log.close()
    return ids


def test_newest_traffic_is_held_out_and_counted(tmp_path):
    run, project = fake_champion(tmp_path)
    rows = traffic_rows(40)
    fill_log(tmp_path / "log.db", rows)
    a = assemble(project, run, tmp_path / "log.db")
    c = a.counts
    assert c.labelled == c.usable == 40 and c.held_out == 10  # ceil(0.25 * 40)
    assert [e.input for e in a.traffic_test] == [t for t, _ in rows[30:]]  # the newest ten
    assert {e.input for e in a.train if is_traffic(e)} == {t for t, _ in rows[:30]}
    assert c.traffic_used == 30 and c.champion_used == c.champion_rows == 30 and c.extra_used == 0
    assert c.train_rows == len(a.train) == 60 and c.new_labels == [] and c.feedback == {"label": 40}
    assert c.held_out_removed == 0


def test_held_out_rows_its_cleaning_removes_are_counted(tmp_path):
    """Two of the newest ten held out repeated a third: the test-file cleaning dropped them, and no count
    said where they went (40 usable = 8 held out + 30 for training)."""
    run, project = fake_champion(tmp_path)
    rows = traffic_rows(40)
    rows[38] = rows[39] = rows[37]
    fill_log(tmp_path / "log.db", rows)
    c = assemble(project, run, tmp_path / "log.db").counts
    assert c.usable == 40 and c.held_out == 8 and c.held_out_removed == 2 and c.traffic_for_training == 30


def test_traffic_weight_repeats_traffic_rows_and_the_data_stage_keeps_them(tmp_path):
    run, project = fake_champion(tmp_path, weight=3)
    fill_log(tmp_path / "log.db", traffic_rows(20))
    a = assemble(project, run, tmp_path / "log.db")
    c = a.counts
    # Validation is carved before the repeats (a fifth of the 45 unique rows), so no row straddles it.
    assert c.validation_carved == 9 and len(a.validation) == 9
    assert c.traffic_used + sum(is_traffic(e) for e in a.validation) == 15
    assert c.train_rows == len(a.train) == 3 * c.traffic_used + c.champion_used
    challenger = _write_inputs(project, run, a, tmp_path / "inputs", tmp_path / "log.db")
    assert not challenger.data.clean.exact_dedup and not challenger.data.clean.near_dedup.enabled
    # The lineage shares one request log: the challenger's server writes where this retrain read.
    assert challenger.serve.request_log.path == (tmp_path / "log.db").resolve()
    assert challenger.data.validation == tmp_path / "inputs" / "validation.jsonl"
    splits = prepare_data(challenger)
    # Every traffic row in training trains three times through the data stage.
    kept = [sum(e.input == t for e in splits.train) for t in {e.input for e in a.train if is_traffic(e)}]
    assert kept == [3] * c.traffic_used and len(splits.validation) == 9


def test_too_few_labelled_requests_is_an_input_error_naming_the_counts(tmp_path):
    run, project = fake_champion(tmp_path)
    rows = traffic_rows(9) + [(t, None) for t, _ in traffic_rows(5, seed=1)]
    fill_log(tmp_path / "log.db", rows)
    with pytest.raises(InputError) as e:
        assemble(project, run, tmp_path / "log.db")
    assert "9 usable of 9 with feedback" in e.value.what and "at least 10 (retrain.min_labelled)" in e.value.what


def test_rated_right_rows_train_but_are_never_held_out(tmp_path):
    """A rating 1 makes the model's own answer the truth, and a rating 0 gives none: held out, such rows
    would be a test set of answers the champion got right. The newest rows here are all rated right."""
    run, project = fake_champion(tmp_path)
    db = tmp_path / "log.db"
    rows = traffic_rows(35)
    fill_log(db, rows[:20])
    log = RequestLog(db, redact_pii=False)
    for i, (text, _) in enumerate(rows[20:]):
        # as served by a plain-prompt model: the answer after the format's space
        log.write([{"route": "/v1/classify", "request_id": f"right{i}", "input": text, "output": " gamma\n"}])
        log.add_feedback(f"right{i}", rating=1)
    log.close()
    a = assemble(project, run, db)
    from tunesmith.serve.store import labelled

    # the truth is the answer alone (a generation run's target is not stripped later, as a label is)
    assert {r.truth for r in labelled(db) if r.request_id.startswith("right")} == {"gamma"}
    c = a.counts
    assert c.usable == 35 and c.rating_only == 15 and c.held_out == 5  # max(5, ceil(0.25 * 20 labelled))
    assert [e.input for e in a.traffic_test] == [t for t, _ in rows[15:20]]  # the newest labelled rows
    assert {e.input for e in a.train if e.source.startswith("request-log:right")} == {t for t, _ in rows[20:]}
    assert c.to_json()["rating_only"] == 15


def test_too_few_rows_with_a_label_to_hold_out_is_an_input_error(tmp_path):
    run, project = fake_champion(tmp_path)
    db = tmp_path / "log.db"
    fill_log(db, traffic_rows(4))  # four labels, then thirty rows only rated right
    fill_log(db, traffic_rows(30, seed=2), prefix="r", rating=1)
    with pytest.raises(InputError) as e:
        assemble(project, run, db)
    assert "4 of them with a label or correction (30 only rated right" in e.value.what


def test_held_out_rows_are_counted_again_after_cleaning(tmp_path):
    """Five newest labelled rows, but four are copies of the fifth: after the test-file cleaning one is left,
    under retrain.min_holdout: refused before any training, with the counts."""
    run, project = fake_champion(tmp_path)
    rows = traffic_rows(15) + [("zebra quilt mango violet same", "alpha")] * 5
    fill_log(tmp_path / "log.db", rows)
    with pytest.raises(InputError) as e:
        assemble(project, run, tmp_path / "log.db")
    assert "too few held-out traffic rows after cleaning: 1" in e.value.what and "min_holdout is 5" in e.value.what


def test_token_id_prompts_never_train(tmp_path):
    """A token prompt's logged input is the ids decoded, the prompt format inside: not a plain text row."""
    run, project = fake_champion(tmp_path)
    db = tmp_path / "log.db"
    rows = traffic_rows(26)
    fill_log(db, rows[:20], prompt_kind="text")
    fill_log(db, rows[20:], prefix="tok", prompt_kind="tokens")
    assert [r.prompt_kind for r in labelled(db)] == ["text"] * 20 + ["tokens"] * 6
    a = assemble(project, run, db)
    assert a.counts.token_prompts == 6 and a.counts.usable == 20
    assert not {t for t, _ in rows[20:]} & {e.input for e in a.train + a.traffic_test}


def test_a_failed_write_of_the_inputs_leaves_no_folder_in_the_way(tmp_path, monkeypatch):
    run, project = fake_champion(tmp_path)
    fill_log(tmp_path / "log.db", traffic_rows(20))
    a = assemble(project, run, tmp_path / "log.db")
    calls = []

    def full_disk(path, rows, project):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        path.write_text("")

    monkeypatch.setattr(retrain_module, "write_rows", full_disk)
    inputs = tmp_path / ".out.retrain-inputs"
    with pytest.raises(OSError):
        _write_inputs(project, run, a, inputs, tmp_path / "log.db")
    assert len(calls) == 2 and not inputs.exists()


def test_truncated_inputs_and_wrong_ratings_without_a_label_never_train(tmp_path):
    run, project = fake_champion(tmp_path)
    db = tmp_path / "log.db"
    rows = traffic_rows(30)
    long_text = "lantern " * (STORED_CHARS // 8 + 100)  # stored cut, with the marker
    # A request that merely ends with the log's cut marker was not cut: the log records cuts apart from the text
    fill_log(db, [(long_text, "beta")] + rows[:9] + [(rows[9][0] + " [+3 characters not stored]", rows[9][1])])
    log = RequestLog(db, redact_pii=False)
    for i, (text, _) in enumerate(rows[10:13]):  # rated wrong, no truth given
        log.write([{"route": "/v1/classify", "request_id": f"wrong{i}", "input": text, "output": "alpha"}])
        log.add_feedback(f"wrong{i}", rating=0)
    for i, (text, _) in enumerate(rows[13:]):  # rated right: the answer is the truth
        log.write([{"route": "/v1/classify", "request_id": f"right{i}", "input": text, "output": "gamma"}])
        log.add_feedback(f"right{i}", rating=1)
    log.close()
    a = assemble(project, run, db)
    c = a.counts
    assert c.labelled == 31 and c.incomplete == 1 and c.no_truth == 3 and c.usable == 27
    assert c.feedback == {"label": 11, "rated_wrong": 3, "rated_right": 17}
    texts = {e.input for e in a.train + a.traffic_test}
    assert not any(t.startswith("lantern lantern") for t in texts)
    assert not {t for t, _ in rows[10:13]} & texts
    assert all(e.target == "gamma" for e in a.train + a.traffic_test if e.source.startswith("request-log:right"))
    assert any(t.endswith(" [+3 characters not stored]") for t in texts)


def test_planted_test_text_never_reaches_training(tmp_path):
    """The same text in the champion's test split, in traffic_test and in training traffic: training never has it."""
    run, project = fake_champion(tmp_path)
    champion_test = json.loads((run / "data" / "test.jsonl").read_text().splitlines()[0])["input"]
    rows = traffic_rows(40)
    held_text = rows[-1][0]                      # will be held out (newest)
    planted = [(champion_test, "alpha"), (champion_test.upper() + "!", "beta"),  # exact after folding
               # the held-out text, and a near duplicate of it (its other label keeps it through near dedup)
               (held_text, "gamma"), (held_text.replace("item", "itm"), "alpha")]
    fill_log(tmp_path / "log.db", planted + rows)
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"text": champion_test, "label": "beta"},
                                                   {"text": "brand new words here", "label": "delta"}])
    a = assemble(project, run, tmp_path / "log.db", extra)
    train = [e.input.lower() for e in a.train]
    assert champion_test.lower() not in train and not any(t.startswith(champion_test.lower()) for t in train)
    assert held_text in [e.input for e in a.traffic_test]
    assert held_text.lower() not in train and held_text.replace("item", "itm").lower() not in train
    # The exact copies of the test text went as duplicates of the --data row, which the test overlap removed,
    # as it removed the held-out text and its near duplicate from the training traffic.
    assert a.counts.duplicates_removed == 2
    assert a.counts.test_overlap_removed == 3 and a.counts.test_overlap_removed_traffic == 2
    assert a.counts.new_labels == ["delta"] and a.counts.extra_used == 1


def test_chat_runs_are_refused(tmp_path):
    _, project = fake_champion(tmp_path)
    check_supported(project)
    with pytest.raises(InputError, match="last user turn"):
        check_supported(derive(project, {"task.type": "chat", "objective.metric": "exact_match"}))


# -- the whole command on a tiny trained run ---------------------------------------------------------


@pytest.fixture(scope="module")
def champion_run(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("retrain")
    write_jsonl(folder / "train.jsonl", make_texts(30, 1))
    write_jsonl(folder / "test.jsonl", make_texts(12, 2))
    (folder / "project.yaml").write_text(CONFIG.format(model=tiny_model, weight=1))
    result = runner.invoke(cli, ["run", str(folder / "project.yaml"), "--out", str(folder / "champion"), "--quiet"])
    assert result.exit_code in (0, 3), result.output
    return folder / "champion"


def _digest(folder: Path) -> dict[str, str]:
    """Every file of a run but its live request log (SQLite adds its WAL files on any read)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).parts[0] != "monitor"}


def test_retrain_end_to_end(champion_run, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_REGISTRY", str(tmp_path / "registry.sqlite"))
    db = champion_run / "monitor" / "requests.db"  # where the champion's server logs by default
    rows = [(r["text"], r["label"]) for r in make_texts(24, 7)]
    fill_log(db, rows, run_dir=str(champion_run))
    before = _digest(champion_run)
    out = tmp_path / "challenger"
    result = runner.invoke(cli, ["retrain", str(champion_run), "--out", str(out), "--quiet"])
    assert result.exit_code in (0, 3), result.output
    record = json.loads((out / "promotion.json").read_text())
    assert result.exit_code == (0 if record["decision"]["promote"] else 3)
    assert record["champion"] == str(champion_run.resolve()) and record["challenger"] == str(out)
    assert record["data"]["held_out"] == 6 and record["data"]["usable"] == 24
    test, traffic = record["comparisons"]["test"], record["comparisons"]["traffic"]
    assert test["n"] == 12 and test["test"] == "McNemar" and traffic["n"] == 6
    assert {c["name"] for c in record["decision"]["checks"]} == {"test_not_worse", "traffic_better", "objective_met"}
    assert "promotion.json: " in result.output and "original test split: accuracy champion" in result.output
    assert _digest(champion_run) == before  # the champion is untouched
    config = load_config(out / "config.yaml")  # its data files exist, inside the challenger
    assert config.data.train == out / "retrain" / "train.jsonl" and config.data.test == out / "retrain" / "test.jsonl"
    assert len((out / "predictions" / "traffic_test.jsonl").read_text().splitlines()) == 6
    # A server swapped to the challenger keeps logging to the champion's log, where the next retrain reads.
    assert serve_settings(out)[1] == serve_settings(champion_run)[1].resolve() == db.resolve()
    from tunesmith import champions

    assert champions.current("tiny") == (out if record["decision"]["promote"] else None)


def test_retrain_with_too_little_feedback_exits_2_and_writes_nothing(champion_run, tmp_path):
    db = tmp_path / "few.db"
    fill_log(db, [(r["text"], r["label"]) for r in make_texts(4, 9)])
    out = tmp_path / "challenger"
    result = runner.invoke(cli, ["retrain", str(champion_run), "--db", str(db), "--out", str(out)])
    assert result.exit_code == 2 and "too few labelled requests" in result.output
    assert not out.exists() and not any(p.name.startswith(".challenger") for p in tmp_path.iterdir())


def test_retrain_names_a_missing_data_file_before_counting_feedback(champion_run, tmp_path):
    db = tmp_path / "few.db"
    fill_log(db, [(r["text"], r["label"]) for r in make_texts(4, 9)])  # too few as well: the file is said first
    result = runner.invoke(cli, ["retrain", str(champion_run), "--db", str(db), "--out", str(tmp_path / "c"),
                                 "--data", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2 and f"file not found, --data {tmp_path / 'nope.jsonl'}" in result.output
    (tmp_path / "zero.jsonl").symlink_to("/dev/zero")
    result = runner.invoke(cli, ["retrain", str(champion_run), "--db", str(db), "--out", str(tmp_path / "c"),
                                 "--data", str(tmp_path / "zero.jsonl")])
    assert result.exit_code == 2 and f"is not a regular file, --data {tmp_path / 'zero.jsonl'}" in result.output
    for name in ("", " ", "../up"):  # `--name ""` fell back to the project name, unsaid
        result = runner.invoke(cli, ["retrain", str(champion_run), "--db", str(db), "--out", str(tmp_path / "c"),
                                     "--name", name])
        assert result.exit_code == 2 and "registry name" in result.output and "--name" in result.output, name


def test_retrain_never_writes_its_challenger_over_a_run(champion_run, tmp_path):
    db = tmp_path / "log.db"
    fill_log(db, [(r["text"], r["label"]) for r in make_texts(4, 9)])
    before = _digest(champion_run)
    result = runner.invoke(cli, ["retrain", str(champion_run), "--db", str(db), "--out", str(champion_run)])
    assert result.exit_code == 2 and "already holds a tunesmith run (the champion)" in result.output
    assert "--overwrite" not in result.output and _digest(champion_run) == before


def test_retrain_on_a_file_that_is_not_a_request_log_exits_2(champion_run, tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not sqlite at all " * 200)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE t (x)")
    for db in (garbage, other):
        result = runner.invoke(cli, ["retrain", str(champion_run), "--db", str(db), "--out", str(tmp_path / "c")])
        assert result.exit_code == 2 and "not a request log" in result.output, result.output
        assert str(db) in result.output and "Traceback" not in result.output
    assert not (tmp_path / "c").exists()


def test_a_promoted_challenger_becomes_the_champion(champion_run, tmp_path, monkeypatch):
    """The rule's verdict is forced here (tiny random models rarely beat each other): what a promotion does."""
    import tunesmith.pipeline.retrain as retrain_module
    from tunesmith import champions
    from tunesmith.pipeline.promotion import Decision

    monkeypatch.setenv("TUNESMITH_REGISTRY", str(tmp_path / "registry.sqlite"))
    monkeypatch.setattr(retrain_module, "decide", lambda *a, **k: Decision(True, ["forced"], []))
    db = tmp_path / "log.db"
    fill_log(db, [(r["text"], r["label"]) for r in make_texts(20, 11)])
    out = tmp_path / "promoted"
    result = runner.invoke(cli, ["retrain", str(champion_run), "--db", str(db), "--out", str(out), "--name", "bank"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "promotion.json").read_text())
    assert record["promoted"] and record["registry"]["name"] == "bank"
    assert champions.current("bank") == out
    event = champions.history("bank")[-1]
    assert Path(event["parent"]) == champion_run.resolve() and event["reason"] == "retrain"


def test_a_champion_promoted_while_the_challenger_trained_is_not_replaced(champion_run, tmp_path, monkeypatch):
    """The challenger was judged against the champion it started from: when another run was promoted
    meanwhile, the challenger does not replace it unjudged (exit 3, promotion.json says why)."""
    import tunesmith.pipeline.retrain as retrain_module
    from tunesmith import champions
    from tunesmith.pipeline.promotion import Decision

    monkeypatch.setenv("TUNESMITH_REGISTRY", str(tmp_path / "registry.sqlite"))
    other = tmp_path / "other"
    shutil.copytree(champion_run, other)
    champions.promote("bank", champion_run)

    def promote_meanwhile(*args, **kwargs):
        champions.promote("bank", other)  # `tunesmith promote` from another shell during the retrain
        return Decision(True, ["forced"], [])

    monkeypatch.setattr(retrain_module, "decide", promote_meanwhile)
    db = tmp_path / "log.db"
    fill_log(db, [(r["text"], r["label"]) for r in make_texts(20, 11)])
    out = tmp_path / "challenger"
    result = runner.invoke(cli, ["retrain", "--registry", "bank", "--db", str(db), "--out", str(out)])
    assert result.exit_code == 3 and "REJECTED under bank" in result.output, result.output
    record = json.loads((out / "promotion.json").read_text())
    assert not record["promoted"] and f"'bank' serves {other.resolve()} now" in record["not_promoted"]
    assert champions.current("bank") == other.resolve()


def test_retraining_a_run_another_one_is_served_in_place_of_is_refused_before_training(champion_run, tmp_path,
                                                                                      monkeypatch):
    """The challenger would be judged against RUN_DIR and replace the run served: a whole training, then
    a refusal at promotion (exit 3) that was known at the start."""
    from tunesmith import champions

    monkeypatch.setenv("TUNESMITH_REGISTRY", str(tmp_path / "registry.sqlite"))
    other = tmp_path / "other"
    shutil.copytree(champion_run, other)
    champions.promote("bank", other)
    db = tmp_path / "log.db"
    fill_log(db, [(r["text"], r["label"]) for r in make_texts(20, 11)])
    result = runner.invoke(cli, ["retrain", str(champion_run), "--name", "bank", "--db", str(db),
                                 "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and f"'bank' serves {other.resolve()}, not {champion_run.resolve()}" in result.stderr
    assert "--registry bank" in result.stderr and not (tmp_path / "c").exists(), result.output


def test_a_champion_whose_model_cannot_load_is_refused_before_training(champion_run, tmp_path):
    """It answers the held-out traffic after training: a challenger was trained, then exit 2 left it behind."""
    damaged = tmp_path / "damaged"
    shutil.copytree(champion_run, damaged)
    (damaged / "model" / "adapter_model.safetensors").unlink()
    db = tmp_path / "log.db"
    fill_log(db, [(r["text"], r["label"]) for r in make_texts(20, 11)])
    result = runner.invoke(cli, ["retrain", str(damaged), "--db", str(db), "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "the model's weights are missing" in result.output, result.output
    assert not (tmp_path / "c").exists() and "eval" not in result.output


def test_a_log_from_before_the_cut_column_still_tells_cut_inputs_by_their_marker(tmp_path):
    """A log written before `input_cut` existed (read-only: never migrated) has only the marker to go by."""
    import sqlite3

    from tunesmith.serve.store import labelled

    db = tmp_path / "log.db"
    fill_log(db, [("lantern " * (STORED_CHARS // 8 + 100), "beta"), ("a short one", "alpha")])
    with sqlite3.connect(db) as con:
        con.execute("ALTER TABLE requests DROP COLUMN input_cut")
    old = {r.request_id: (r.input_cut, r.complete) for r in labelled(db)}
    assert old == {"req0000": (None, False), "req0001": (None, True)}
