"""Human evaluation round trip: export blinded pairs, simulated raters' files in, rates and kappa out."""

from __future__ import annotations

import csv
import json
import random

import pytest
from typer.testing import CliRunner

from tunesmith.cli import app
from tunesmith.evaluate.human import cohen_kappa, fleiss_kappa, wilson

runner = CliRunner()


def _run_dir(tmp_path, n: int = 40):
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    rows = [{"text": f"question {i}", "gold": "x", "prediction": f"tuned answer {i}",
             "baseline_prediction": f"base answer {i}", "source": f"test.csv:{i + 2}"} for i in range(n)]
    (run / "predictions" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _exported(tmp_path, n: int):
    """A run with n predictions, exported; returns (the human folder, its key)."""
    run = _run_dir(tmp_path, n)
    assert runner.invoke(app, ["human", "export", str(run)]).exit_code == 0
    folder = run / "human"
    return folder, json.loads((folder / "key.json").read_text())


def _rate(pairs_csv, rater: str, prefer_tuned: float, seed: int, copy_from: dict | None = None, agree: float = 1.0):
    """A simulated rater: picks the tuned answer with probability prefer_tuned (reading the text),
    or repeats another rater's choice with probability `agree`."""
    rng = random.Random(seed)
    choices = {}
    with open(pairs_csv, newline="") as f:
        for row in csv.DictReader(f):
            if copy_from is not None and rng.random() < agree:
                choices[row["id"]] = copy_from[row["id"]]
                continue
            r = rng.random()
            tuned_side = "A" if row["response_a"].startswith("tuned") else "B"
            choices[row["id"]] = (tuned_side if r < prefer_tuned else "tie" if r < prefer_tuned + 0.1
                                  else ("B" if tuned_side == "A" else "A"))
    return choices


def _write(path, rater: str, choices: dict):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "rater", "choice"])
        for pid, c in choices.items():
            w.writerow([pid, rater, c])
    return path


def _outcomes(choices: dict, key: dict) -> list[str]:
    out = []
    for pid in sorted(choices):
        c = choices[pid]
        out.append("tie" if c == "tie" else "win" if (c == "A") == (key["pairs"][pid]["A"] == "one") else "loss")
    return out


def test_export_is_blinded_and_shuffled(tmp_path):
    run = _run_dir(tmp_path)
    result = runner.invoke(app, ["human", "export", str(run)])
    assert result.exit_code == 0, result.output
    folder = run / "human"
    rows = list(csv.DictReader(open(folder / "pairs.csv", newline="")))
    key = json.loads((folder / "key.json").read_text())
    assert len(rows) == 40 and set(rows[0]) == {"id", "prompt", "response_a", "response_b"}
    sides = [key["pairs"][r["id"]]["A"] for r in rows]
    assert 5 < sides.count("one") < 35, "sides are randomised"
    assert [r["prompt"] for r in rows] != [f"question {i}" for i in range(40)], "order is shuffled"
    for r in rows:
        tuned_on_a = r["response_a"].startswith("tuned")
        assert tuned_on_a == (key["pairs"][r["id"]]["A"] == "one")
    page = (folder / "form.html").read_text()
    assert page.count("<fieldset") == 40 and "Save ratings" in page and "fine-tuned" not in page


def test_against_pairs_only_the_same_test_examples_and_names_both_runs(tmp_path):
    """Two projects' test.jsonl:3 are different examples: pairing by row alone put one run's prompt beside
    the other run's answer to another prompt. Both folders called `run`: the key tells them apart."""
    run = _run_dir(tmp_path / "a", 6)
    other = _run_dir(tmp_path / "b", 6)
    rows = [json.loads(line) for line in (other / "predictions" / "test.jsonl").read_text().splitlines()]
    rows[1]["text"], rows[2]["gold"] = "another prompt", "y"  # same rows, other examples
    (other / "predictions" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["human", "export", str(run), "--against", str(other), "--out", str(tmp_path / "h")])
    assert result.exit_code == 0, result.output
    key = json.loads((tmp_path / "h" / "key.json").read_text())
    assert sorted(p["source"] for p in key["pairs"].values()) == [f"test.csv:{i + 2}" for i in (0, 3, 4, 5)]
    assert (key["one"], key["two"]) == (str(run.resolve()), str(other.resolve()))
    pairs = list(csv.DictReader(open(tmp_path / "h" / "pairs.csv", newline="")))
    for p in pairs:  # each prompt beside the two runs' answers to it
        n = p["prompt"].split()[-1]
        assert {p["response_a"], p["response_b"]} == {f"tuned answer {n}"}
    rows[0]["text"] = rows[3]["text"] = rows[4]["text"] = rows[5]["text"] = "x"
    (other / "predictions" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["human", "export", str(run), "--against", str(other), "--out", str(tmp_path / "i")])
    assert result.exit_code == 2 and "share no test examples" in result.output


def test_overwrite_drops_the_old_results_and_refuses_over_collected_ratings(tmp_path):
    folder, _ = _exported(tmp_path, 6)
    (folder / "results.json").write_text("{}")  # the old key's results
    run = folder.parent
    assert runner.invoke(app, ["human", "export", str(run), "--overwrite"]).exit_code == 0
    assert not (folder / "results.json").exists()
    (folder / "ratings-ann.csv").write_text("id,rater,choice\np0001,ann,A\n")  # collected by the workbench
    result = runner.invoke(app, ["human", "export", str(run), "--overwrite"])
    assert result.exit_code == 2 and "holds ratings collected for the current pairs (ratings-ann.csv)" in result.stderr
    assert (folder / "ratings-ann.csv").is_file()


def test_an_export_inside_a_run_goes_to_its_human_folder_only(tmp_path):
    run = _run_dir(tmp_path, 4)
    (run / "model").mkdir()
    (run / "model" / "tunesmith.json").write_text("{}")  # a trained run directory
    result = runner.invoke(app, ["human", "export", str(run), "--out", str(run / "model" / "human")])
    assert result.exit_code == 2 and "where an export goes to" in result.stderr
    assert not (run / "model" / "human").exists()
    assert runner.invoke(app, ["human", "export", str(run)]).exit_code == 0 and (run / "human" / "key.json").is_file()


def test_two_raters_round_trip_with_cohen_kappa(tmp_path):
    from sklearn.metrics import cohen_kappa_score

    folder, key = _exported(tmp_path, 60)
    first = _rate(folder / "pairs.csv", "ann", 0.7, 1)
    second = _rate(folder / "pairs.csv", "bob", 0.6, 2, copy_from=first, agree=0.7)
    files = [_write(tmp_path / "ann.csv", "ann", first), _write(tmp_path / "bob.csv", "bob", second)]
    result = runner.invoke(app, ["human", "import", *map(str, files), "--key", str(folder / "key.json")])
    assert result.exit_code == 0, result.output
    out = json.loads((folder / "results.json").read_text())
    a, b = _outcomes(first, key), _outcomes(second, key)
    assert out["agreement"]["statistic"] == "cohen_kappa"
    assert out["agreement"]["value"] == pytest.approx(cohen_kappa_score(a, b), abs=1e-6)
    wins = a.count("win") + b.count("win")
    assert out["pooled"]["win"]["count"] == wins and out["pooled"]["ratings"] == 120
    assert out["pooled"]["win"]["ci_low"] < wins / 120 < out["pooled"]["win"]["ci_high"]
    # two raters of the same 60 pairs: the interval of 60 trials at the pooled rate, not of 120
    from tunesmith.evaluate.human import wilson
    assert (out["pooled"]["win"]["ci_low"], out["pooled"]["win"]["ci_high"]) == wilson(wins / 2, 60)
    assert out["per_rater"]["ann"]["win"]["count"] == a.count("win")
    assert "agreement: cohen_kappa" in result.stdout


def test_three_raters_use_fleiss_kappa(tmp_path):
    from statsmodels.stats.inter_rater import fleiss_kappa as sm_fleiss

    folder, key = _exported(tmp_path, 30)
    base = _rate(folder / "pairs.csv", "r1", 0.7, 1)
    raters = {"r1": base, "r2": _rate(folder / "pairs.csv", "r2", 0.7, 2, base, 0.6),
              "r3": _rate(folder / "pairs.csv", "r3", 0.5, 3, base, 0.4)}
    files = [str(_write(tmp_path / f"{r}.csv", r, c)) for r, c in raters.items()]
    assert runner.invoke(app, ["human", "import", *files, "--key", str(folder / "key.json")]).exit_code == 0
    out = json.loads((folder / "results.json").read_text())
    outcomes = {r: _outcomes(c, key) for r, c in raters.items()}
    table = [[sum(outcomes[r][i] == o for r in raters) for o in ("win", "tie", "loss")] for i in range(30)]
    assert out["agreement"]["statistic"] == "fleiss_kappa"
    assert out["agreement"]["value"] == pytest.approx(sm_fleiss(table), abs=1e-6)


def test_bad_ratings_file_is_one_error_line(tmp_path):
    run = _run_dir(tmp_path, 5)
    assert runner.invoke(app, ["human", "export", str(run)]).exit_code == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("id,rater,choice\np0001,ann,A\np0002,ann,maybe\n")
    result = runner.invoke(app, ["human", "import", str(bad), "--key", str(run / "human" / "key.json")])
    assert result.exit_code == 2 and f"{bad}:3" in result.stderr and "maybe" in result.stderr
    bad.write_text("id,rater,choice\np0001,ann,A\n\nzzz,ann,B\n")
    result = runner.invoke(app, ["human", "import", str(bad), "--key", str(run / "human" / "key.json")])
    assert result.exit_code == 2 and f"pair 'zzz' is not in the key, {bad}:4," in result.stderr
    bad.write_text("id,rater,choice,choice\np0001,ann,A,B\n")  # csv.DictReader keeps the last cell: B
    result = runner.invoke(app, ["human", "import", str(bad), "--key", str(run / "human" / "key.json")])
    assert result.exit_code == 2 and "the column 'choice' appears twice in the header" in result.stderr
    assert f"{bad}:1" in result.stderr
    key = run / "human" / "key.json"
    original = json.loads(key.read_text())
    for side, name in (("one", "\u001b[2J"), ("two", ["x"])):  # an escape code printed to the terminal
        key.write_text(json.dumps({**original, side: name}))
        result = runner.invoke(app, ["human", "import", str(bad), "--key", str(key)])
        assert result.exit_code == 2 and f"key file's '{side}' is not a system's name" in result.stderr
    key.write_text(json.dumps(original))
    result = runner.invoke(app, ["human", "import", str(tmp_path), "--key", str(key)])
    assert result.exit_code == 2 and f"ratings file is a folder, not a file, {tmp_path}" in result.stderr
    bad.write_text("id,rater,choice\np0001,\u001b[31mann,A\n")
    result = runner.invoke(app, ["human", "import", str(bad), "--key", str(key)])
    assert result.exit_code == 2 and "the rater's name holds a control" in result.stderr and f"{bad}:2" in result.stderr
    for pairs in ({"p0001": 5}, {"p0001": {"source": "x"}}, {"p0001": {"A": "three"}}):
        key.write_text(json.dumps({**json.loads(key.read_text()), "pairs": pairs}))
        result = runner.invoke(app, ["human", "import", str(bad), "--key", str(key)])
        assert result.exit_code == 2 and "pair 'p0001' does not say which system is A" in result.stderr
    # a pair given twice (the second says B is system one): read as its last entry before
    key.write_text('{"one": "a", "two": "b", "pairs": {"p0001": {"A": "one"}, "p0001": {"A": "two"}}}')
    result = runner.invoke(app, ["human", "import", str(bad), "--key", str(key)])
    assert result.exit_code == 2 and "the key 'p0001' is given twice" in result.stderr, result.output
    long_name = str(tmp_path / ("d" * 250) / "run")  # two runs both called `run` are named by their paths
    key.write_text(json.dumps({**original, "one": long_name}))
    bad.write_text("id,rater,choice\np0001,ann,A\n")
    assert runner.invoke(app, ["human", "import", str(bad), "--key", str(key)]).exit_code == 0


def test_kappa_and_wilson_edge_cases():
    import numpy as np
    from sklearn.metrics import cohen_kappa_score
    from statsmodels.stats.inter_rater import fleiss_kappa as sm_fleiss

    assert cohen_kappa(["win", "loss"], ["win", "loss"]) == 1.0
    assert fleiss_kappa([[3, 0, 0], [0, 3, 0]]) == 1.0
    # One outcome throughout: chance agreement is 1 and kappa undefined, as the libraries say (NaN), not 1.
    assert cohen_kappa(["win", "win"], ["win", "win"]) is None and np.isnan(cohen_kappa_score(["w", "w"], ["w", "w"]))
    assert fleiss_kappa([[3, 0, 0]]) is None and np.isnan(sm_fleiss([[3, 0, 0]]))
    low, high = wilson(0, 10)
    assert low == 0.0 and 0.2 < high < 0.35


def test_a_key_that_is_a_folder_and_a_control_character_in_a_choice_are_said_as_they_are(tmp_path):
    folder, _ = _exported(tmp_path, 3)
    ratings = tmp_path / "r.csv"
    ratings.write_text("id,rater,choice\np0001,ann,A\n")
    result = runner.invoke(app, ["human", "import", str(ratings), "--key", str(folder)])
    assert result.exit_code == 2 and "key file is a folder, not a file" in result.stderr
    ratings.write_text("id,rater,choice\np0001,ann,A\x00\n")  # showed as "choice 'A' is not one of"
    result = runner.invoke(app, ["human", "import", str(ratings), "--key", str(folder / "key.json")])
    assert result.exit_code == 2 and 'choice "A\\u0000" is not one of A, B, tie' in result.stderr, result.stderr


def test_a_text_run_has_no_answers_to_rate(tmp_path):
    run = tmp_path / "text-run"
    (run / "predictions").mkdir(parents=True)
    row = {"text": "a document", "source": "d.jsonl:1", "tokens": 3, "nll_per_token": 2.0,
           "baseline_nll_per_token": 2.5}
    (run / "predictions" / "test.jsonl").write_text(json.dumps(row) + "\n")
    result = runner.invoke(app, ["human", "export", str(run)])
    assert result.exit_code == 2 and "a text run (task.type text) makes no answers to rate" in result.stderr


def test_an_export_against_itself_or_of_no_predictions_is_refused(tmp_path):
    run = _run_dir(tmp_path, 5)
    result = runner.invoke(app, ["human", "export", str(run), "--against", str(run)])
    assert result.exit_code == 2 and "is the run itself" in result.stderr and "--against" in result.stderr
    (run / "predictions" / "test.jsonl").write_text("")
    result = runner.invoke(app, ["human", "export", str(run)])
    assert result.exit_code == 2 and "holds no test examples: nothing to rate" in result.stderr, result.output
    assert not (run / "human").exists()
