"""Issue 16, items 13-15: hostile or odd input gives a located exit-2 error (never a traceback), the
judge cannot be pointed at secrets or plain-text hosts, and human-evaluation files are spreadsheet-safe."""

from __future__ import annotations

import csv
import json

import matplotlib.figure
import matplotlib.text
import pytest
from typer.testing import CliRunner

from conftest import PROJECT, make_texts, write_jsonl
from tunesmith.cli import app
from tunesmith.config import JudgeConfig, load_config
from tunesmith.data.io import read_rows
from tunesmith.errors import ConfigError
from tunesmith.evaluate.human import export_pairs

runner = CliRunner()


def _project(tmp_path, model, eval_extra: str = "") -> str:
    write_jsonl(tmp_path / "train.jsonl", make_texts(20, 1))
    write_jsonl(tmp_path / "test.jsonl", make_texts(9, 2))
    (tmp_path / "project.yaml").write_text(PROJECT.format(model=model, method="lora") + eval_extra, encoding="utf-8")
    return str(tmp_path / "project.yaml")


def _run_dir(tmp_path, answers: list[str] | None = None, n: int = 12):
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    answers = answers or [f"tuned answer {i}" for i in range(n)]
    rows = [{"text": f"question {i}", "gold": "x", "prediction": a, "baseline_prediction": f"base answer {i}",
             "source": f"test.csv:{i + 2}"} for i, a in enumerate(answers)]
    (run / "predictions" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


# --- item 13: bad input is a located error -------------------------------------------------------

def test_item13_jsonl_line_nested_100000_deep_is_a_located_error(tmp_path, tiny_model):
    config = _project(tmp_path, tiny_model)
    with open(tmp_path / "train.jsonl", "a", encoding="utf-8") as f:
        f.write('{"text": "deep", "label": "alpha", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    result = runner.invoke(app, ["data", "check", config])
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'train.jsonl'}:21" in result.stderr and "nested too deeply" in result.stderr
    assert "Traceback" not in result.output and "RecursionError" not in result.output


@pytest.mark.parametrize("command", ["check", "clean", "split"])
def test_an_escaped_lone_surrogate_is_a_located_error_and_leaves_no_output(tmp_path, tiny_model, command):
    """`"\\ud800"` is valid JSON (and a valid YAML escape) but no tokenizer or UTF-8 file takes it: the
    row, or the config line, is named; `clean` was an internal TypeError and `split` left its --out."""
    config = _project(tmp_path, tiny_model)
    with open(tmp_path / "train.jsonl", "a", encoding="utf-8") as f:
        f.write('{"text": "bad \\ud800 text", "label": "alpha"}\n')
    args = ["data", command, config] + ([] if command == "check" else ["--out", str(tmp_path / "out")])
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'train.jsonl'}:21" in result.stderr and "lone surrogate, escaped as \\ud800" in result.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "project.yaml").write_text(PROJECT.format(model=tiny_model, method="lora").replace(
        "name: ", 'instruction_note: "\\udc00"\nname: ', 1), encoding="utf-8")
    result = runner.invoke(app, ["data", "check", config])
    assert result.exit_code == 2 and f"{config}:1" in result.stderr and "lone surrogate" in result.stderr


def test_item13_nesting_that_parses_but_is_too_deep_is_a_row_problem(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n' + '{"text": "x", "label": "a", "m": ' + "[" * 500
                    + "]" * 500 + "}\n" + '{"messages": [{"role": "user", "content": "hi"}]}\n')
    result = read_rows(path)
    assert [r.line for r in result.rows] == [1, 3]
    assert [(p.line, "nested too deeply" in p.reason) for p in result.problems] == [(2, True)]


def _ratings_from(folder, rater: str) -> tuple[list[list[str]], dict]:
    """Rows id,rater,choice that always pick side A, and the key."""
    key = json.loads((folder / "key.json").read_text())
    return [["id", "rater", "choice"]] + [[pid, rater, "A"] for pid in key["pairs"]], key


def test_item13_ratings_saved_by_a_spreadsheet_import(tmp_path):
    run = _run_dir(tmp_path)
    assert runner.invoke(app, ["human", "export", str(run)]).exit_code == 0
    folder = run / "human"
    rows, key = _ratings_from(folder, "José")
    bom = tmp_path / "bom.csv"   # Excel's "CSV UTF-8": a byte-order mark, CRLF
    bom.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(",".join(r) for r in rows).encode("utf-8") + b"\r\n")
    rows2, _ = _ratings_from(folder, "Zoë")
    ansi = tmp_path / "ansi.csv"  # Excel's plain "CSV" on Windows: cp1252, `;` in many locales, blank tail row
    ansi.write_bytes(("\r\n".join(";".join(r) for r in rows2) + "\r\n;;\r\n").encode("cp1252"))
    result = runner.invoke(app, ["human", "import", str(bom), str(ansi), "--key", str(folder / "key.json")])
    assert result.exit_code == 0, result.output
    out = json.loads((folder / "results.json").read_text())
    wins = sum(v["A"] == "one" for v in key["pairs"].values())
    assert sorted(out["per_rater"]) == ["José", "Zoë"]
    assert out["per_rater"]["José"]["win"]["count"] == wins and out["per_rater"]["José"]["ratings"] == 12
    assert out["pooled"]["ratings"] == 24


def test_item13_undecodable_ratings_file_names_file_and_line(tmp_path):
    run = _run_dir(tmp_path)
    assert runner.invoke(app, ["human", "export", str(run)]).exit_code == 0
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"id,rater,choice\np0001,ann,A\np0002,\x81\x9d\xff,A\n")  # bytes neither UTF-8 nor cp1252
    result = runner.invoke(app, ["human", "import", str(bad), "--key", str(run / "human" / "key.json")])
    assert result.exit_code == 2 and f"{bad}:3" in result.stderr, result.output
    assert "Traceback" not in result.output


def test_item13_missing_ratings_or_key_file_is_exit_2_naming_it(tmp_path):
    run = _run_dir(tmp_path)
    assert runner.invoke(app, ["human", "export", str(run)]).exit_code == 0
    key = run / "human" / "key.json"
    ratings = tmp_path / "ann.csv"
    ratings.write_text("id,rater,choice\np0001,ann,A\n")
    missing = tmp_path / "nope.csv"
    result = runner.invoke(app, ["human", "import", str(ratings), str(missing), "--key", str(key)])
    assert result.exit_code == 2 and str(missing) in result.stderr and "not found" in result.stderr
    result = runner.invoke(app, ["human", "import", str(ratings), "--key", str(tmp_path / "no-key.json")])
    assert result.exit_code == 2 and str(tmp_path / "no-key.json") in result.stderr
    (tmp_path / "broken.json").write_text("{not json")
    result = runner.invoke(app, ["human", "import", str(ratings), "--key", str(tmp_path / "broken.json")])
    assert result.exit_code == 2 and f"{tmp_path / 'broken.json'}:1" in result.stderr
    assert not (run / "human" / "results.json").exists() and not (tmp_path / "results.json").exists()


LABELS = ["cost $5 or $10", "$\\notacommand$", "C:\\temp\\new", "100%$"]


@pytest.fixture()
def figures(monkeypatch):
    """Every figure saved while the test runs (after it rendered without raising)."""
    saved = []
    original = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        original(fig, *args, **kwargs)
        saved.append(fig)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    return saved


def _texts(fig) -> list[matplotlib.text.Text]:
    return [t for t in fig.findobj(matplotlib.text.Text) if t.get_text()]


def test_item13_plot_labels_with_dollar_and_backslash_render_literally(figures, tmp_path):
    from tunesmith.evaluate import leaderboard
    from tunesmith.report import plots

    per_label = {lab: {"f1": 0.5, "support": 3} for lab in LABELS}
    plots.confusion([[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 3, 0], [0, 0, 0, 4]], LABELS, "$title$")
    plots.per_class_f1(per_label)
    plots.data_profile({"train": {"rows": 4, "label_counts": {lab: 1 for lab in LABELS},
                                  "chars_histogram": {"0-50": 4}}})
    plots.group_rates({lab: {"n": 3, "selection_rate": 0.5, "tpr": 0.5, "fpr": 0.1} for lab in LABELS},
                      "region$", LABELS[1])
    plots.metric_bars({"accuracy": 0.4}, {"accuracy": 0.6}, ["accuracy"], legend=(LABELS[0], LABELS[1]))
    plots.curves_of_runs({LABELS[0]: [{"step": 1, "loss": 1.0}], LABELS[1]: [{"step": 1, "loss": 0.9}]}, "accuracy")
    leaderboard.plot([{"method": LABELS[1], "metric": LABELS[0], "value": 0.5, "gain": 0.1, "gain_ci": [0.0, 0.2],
                       "train_seconds": 3}], tmp_path / "compare.png")
    assert len(figures) == 7
    shown = {t.get_text() for fig in figures for t in _texts(fig)}
    for label in LABELS:
        assert any(label in s for s in shown), label
    for fig in figures:
        assert all(not t.get_parse_math() for t in _texts(fig)), "mathtext must be off for user text"
        assert all(t._preprocess_math(t.get_text()) == (t.get_text(), False) for t in _texts(fig))


# --- item 14: the judge cannot be aimed at secrets or plain-text hosts --------------------------

def test_item14_api_key_env_must_end_in_api_key_or_be_allowed(tmp_path, tiny_model):
    judge = "  judge:\n    enabled: true\n    endpoint: https://judge.example/v1\n    api_key_env: {name}\n{extra}"
    config = _project(tmp_path, tiny_model, judge.format(name="AWS_SECRET_ACCESS_KEY", extra=""))
    result = runner.invoke(app, ["data", "check", config])
    assert result.exit_code == 2 and "eval.judge.api_key_env" in result.stderr, result.output
    assert "AWS_SECRET_ACCESS_KEY" in result.stderr and "Traceback" not in result.output
    with pytest.raises(ConfigError) as err:
        load_config(_project(tmp_path, tiny_model, judge.format(name="HOME", extra="")))
    assert "(eval.judge.api_key_env)" in err.value.line()
    listed = judge.format(name="JUDGE_TOKEN", extra="    allowed_env: [JUDGE_TOKEN]\n")
    assert load_config(_project(tmp_path, tiny_model, listed)).eval.judge.api_key_env == "JUDGE_TOKEN"
    assert load_config(_project(tmp_path, tiny_model, judge.format(name="MY_API_KEY", extra=""))).eval.judge.enabled
    assert JudgeConfig().api_key_env == "OPENAI_API_KEY"  # the default still validates


def test_item14_plain_http_judge_only_on_loopback(tmp_path, tiny_model):
    for ok in ("http://127.0.0.1:8000/v1", "http://127.8.9.10/v1", "http://localhost:9/v1", "http://[::1]:80/v1",
               "https://judge.example/v1", "HTTPS://10.0.0.5/v1"):
        assert JudgeConfig(enabled=True, endpoint=ok).endpoint == ok
    for bad in ("http://judge.example/v1", "http://10.0.0.5:8000/v1", "http://127.0.0.1.evil.example/v1",
                "http://0.0.0.0:8000/v1", "ftp://127.0.0.1/v1", "127.0.0.1:8000"):
        with pytest.raises(ValueError):
            JudgeConfig(enabled=True, endpoint=bad)
    assert JudgeConfig(enabled=True, endpoint="http://10.0.0.5/v1", allow_insecure=True).allow_insecure
    text = "  judge:\n    enabled: true\n    endpoint: http://judge.example/v1\n"
    with pytest.raises(ConfigError) as err:
        load_config(_project(tmp_path, tiny_model, text))
    assert "project.yaml:" in err.value.where and err.value.where.endswith("(eval.judge.endpoint)")


def test_item14_readme_says_config_and_harness_tasks_are_trusted_code():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Trusted input"):]
    section = section[: section.index("\n#", 1)]
    assert "project.yaml" in section and "include_path" in section and "!function" in section


# --- item 15: spreadsheet-safe pairs.csv, random blinding seed ----------------------------------

DANGEROUS = ["=HYPERLINK(\"http://evil\",\"x\")", "+1+2", "-3", "@SUM(A1)", "\tcmd", "\rcmd", "'=already quoted"]


def test_item15_formula_cells_are_escaped_and_read_back(tmp_path):
    from tunesmith.evaluate.human import unescape_cell

    run = _run_dir(tmp_path, DANGEROUS)
    export_pairs(run, run / "human", seed=3)
    folder = run / "human"
    with open(folder / "pairs.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    cells = [v for r in rows for v in r.values()]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")], "no cell may start a formula"
    tuned = {unescape_cell(r["response_a"]) for r in rows} | {unescape_cell(r["response_b"]) for r in rows}
    assert set(DANGEROUS) <= tuned
    # A rater who fills the choice into the sheet itself, with a formula-like name, escaped by the sheet.
    sheet = tmp_path / "sheet.csv"
    with open(sheet, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt", "response_a", "response_b", "rater", "choice"])
        w.writerows([r["id"], r["prompt"], r["response_a"], r["response_b"], "'=evil()", "A"] for r in rows)
    result = runner.invoke(app, ["human", "import", str(sheet), "--key", str(folder / "key.json")])
    assert result.exit_code == 0, result.output
    assert list(json.loads((folder / "results.json").read_text())["per_rater"]) == ["=evil()"]
    form = (folder / "form.html").read_text()
    assert "s=\"'\"+s" in form, "the form escapes the rater's name in the file it saves"


def test_item15_default_blinding_seed_is_random_and_recorded(tmp_path):
    run = _run_dir(tmp_path, n=40)
    keys, sheets = [], []
    for name in ("a", "b"):
        assert runner.invoke(app, ["human", "export", str(run), "--out", str(tmp_path / name)]).exit_code == 0
        keys.append(json.loads((tmp_path / name / "key.json").read_text()))
        sheets.append((tmp_path / name / "pairs.csv").read_text())
    assert keys[0]["seed"] != keys[1]["seed"] and keys[0]["seed"] != 0
    assert sheets[0] != sheets[1], "two default exports must not share a blinding"
    export_pairs(run, tmp_path / "again", seed=keys[0]["seed"])  # the recorded seed reproduces it
    assert (tmp_path / "again" / "pairs.csv").read_text() == sheets[0]
    for name in ("s1", "s2"):
        assert runner.invoke(app, ["human", "export", str(run), "--out", str(tmp_path / name),
                                   "--seed", "7"]).exit_code == 0
    assert (tmp_path / "s1" / "pairs.csv").read_text() == (tmp_path / "s2" / "pairs.csv").read_text()
    assert json.loads((tmp_path / "s1" / "key.json").read_text())["seed"] == 7


def test_item15_rating_form_escapes_a_formula_rater_name(tmp_path):
    import os

    from browser import chromium, rate_form

    if chromium() is None and os.environ.get("TUNESMITH_REQUIRE_BROWSER") != "1":
        pytest.skip("chromium not installed (apt-get install chromium)")
    run = _run_dir(tmp_path, n=4)
    export_pairs(run, run / "human")
    saved = rate_form(run / "human" / "form.html", tmp_path / "downloads", "=evil()", "B")
    assert saved is not None
    with open(saved, newline="", encoding="utf-8") as f:
        raters = {row["rater"] for row in csv.DictReader(f)}
    assert raters == {"'=evil()"}, "the saved file must not hold a formula"
    result = runner.invoke(app, ["human", "import", str(saved), "--key", str(run / "human" / "key.json")])
    assert result.exit_code == 0, result.output
    assert list(json.loads((run / "human" / "results.json").read_text())["per_rater"]) == ["=evil()"]


def test_a_plot_that_fails_on_damaged_figures_closes_its_figure():
    """pyplot keeps open figures for the life of the process (the workbench serves for days)."""
    import matplotlib.pyplot as plt

    from tunesmith.report import plots

    before = len(plt.get_fignums())
    for _ in range(3):
        with pytest.raises(KeyError):  # raised once the figure is open
            plots.per_class_f1({"a": {"f1": 0.5}})
    assert len(plt.get_fignums()) == before


def test_a_failed_data_write_removes_the_folder_it_made_and_keeps_an_existing_one(tmp_path, tiny_model,
                                                                                  monkeypatch):
    from tunesmith.data import stage

    config = _project(tmp_path, tiny_model)

    def full_disk(splits, out):
        (out / "train.jsonl").write_text("half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(stage, "save_splits", full_disk)
    result = runner.invoke(app, ["data", "split", config, "--out", str(tmp_path / "new")])
    assert result.exit_code != 0 and not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    result = runner.invoke(app, ["data", "split", config, "--out", str(tmp_path / "mine")])
    assert result.exit_code != 0 and (tmp_path / "mine").is_dir()  # a folder the user gave is never removed


def test_an_empty_split_says_what_cleaning_removed(tmp_path, tiny_model):
    config = _project(tmp_path, tiny_model)
    write_jsonl(tmp_path / "train.jsonl", [{"text": "same text", "label": "alpha"}] * 50)
    result = runner.invoke(app, ["data", "clean", config, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "split is empty (cleaning removed 49 exact_duplicate; each of the 1 labels" \
        in result.stderr


def test_a_key_given_twice_in_a_json_row_is_a_row_problem(tmp_path):
    """json keeps the last of two equal keys silently: a row with two labels is refused, as YAML is."""
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": "x", "label": "alpha", "label": "beta"}\n'
                    '{"text": "y", "meta": {"k": 1, "k": 2}, "label": "a"}\n')
    result = read_rows(path)
    assert [r.line for r in result.rows] == [1]
    assert [(p.line, p.reason) for p in result.problems] == [(2, "the key 'label' is given twice in one object"),
                                                             (3, "the key 'k' is given twice in one object")]
    array = tmp_path / "rows.json"
    array.write_text('[{"text": "ok", "label": "a"},\n {"text": "x", "label": "a", "text": "b"},\n'
                     ' {"text": "after", "label": "a"}]')
    result = read_rows(array)  # the rows after it are read too (reading stopped at the repeated key)
    assert [r.line for r in result.rows] == [1, 3] and [p.line for p in result.problems] == [2]
    array.write_text('[{"text": "b", "m": {"k": 1, "k": 2}, "z": }]')  # and invalid after it: reading stops there
    assert [p.line for p in read_rows(array).problems] == [1] and read_rows(array).rows == []


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_target_modules_that_name_no_layer_are_a_config_error(tmp_path, tiny_model, method):
    """PEFT's NoMatchingPeftModuleError was an internal error (exit 1)."""
    _project(tmp_path, tiny_model)
    text = PROJECT.format(model=tiny_model, method=method).replace(
        "  max_steps: 6\n", "  max_steps: 6\n  lora: {target_modules: [nothing_here]}\n")
    (tmp_path / "project.yaml").write_text(text, encoding="utf-8")
    result = runner.invoke(app, ["train", str(tmp_path / "project.yaml"), "--out", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 2, result.output
    assert "names no layer of the model" in result.stderr and "train.lora.target_modules" in result.stderr
    assert not (tmp_path / "run").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]
    (tmp_path / "project.yaml").write_text(text.replace("[nothing_here]", "[]"), encoding="utf-8")
    result = runner.invoke(app, ["data", "check", str(tmp_path / "project.yaml")])
    assert result.exit_code == 2 and "train.lora.target_modules" in result.stderr


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_lora_rank_no_layer_can_take_is_a_config_error(tmp_path, tiny_model, method):
    """r 100,000,000 allocated adapters until the process ran out of memory: an internal error (exit 1),
    after `compare` had trained the methods before it."""
    _project(tmp_path, tiny_model)
    import transformers

    config = transformers.AutoConfig.from_pretrained(tiny_model)
    widest = max(config.hidden_size, config.intermediate_size)
    for r, says in ((100_000_000, "'train.lora.r': Input should be less than or equal to 1024"),
                    (widest + 1, f"{widest + 1} is larger than the widest layer it would adapt ({widest} features)")):
        text = PROJECT.format(model=tiny_model, method=method).replace(
            "  max_steps: 6\n", f"  max_steps: 6\n  lora: {{r: {r}}}\n")
        (tmp_path / "project.yaml").write_text(text, encoding="utf-8")
        result = runner.invoke(app, ["train", str(tmp_path / "project.yaml"), "--out", str(tmp_path / "run"), "-q"])
        assert result.exit_code == 2 and says in result.stderr and "train.lora.r" in result.stderr, result.output
        assert not (tmp_path / "run").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]
    text = PROJECT.format(model=tiny_model, method=method).replace("  max_steps: 6\n",
                                                                   f"  max_steps: 1\n  lora: {{r: {widest}}}\n")
    (tmp_path / "project.yaml").write_text(text, encoding="utf-8")
    result = runner.invoke(app, ["train", str(tmp_path / "project.yaml"), "--out", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 0, result.output  # as wide as the widest layer: taken


def test_long_labels_and_group_names_are_shortened_on_every_plot(figures):
    """A 1.3M-character label asked matplotlib for a 9-million-pixel image (it refused: `data report` exit 1)."""
    from tunesmith.report import plots

    long = ["y" * 5000, "z" * 5000]
    plots.confusion([[1, 0], [0, 2]], long, "t")
    plots.per_class_f1({lab: {"f1": 0.5, "support": 3} for lab in long})
    plots.data_profile({"train": {"rows": 4, "label_counts": {lab: 2 for lab in long}, "chars_histogram": {"0-50": 4}}})
    plots.group_rates({lab: {"n": 3, "selection_rate": 0.5, "tpr": 0.5, "fpr": 0.1} for lab in long}, long[0], long[1])
    assert len(figures) == 4
    longest = max(len(t.get_text()) for fig in figures for t in _texts(fig))
    assert longest <= plots.TICK_CHARS + 40, longest  # a tick label, or a title around one


def test_long_labels_sharing_their_start_stay_distinct_on_every_plot(figures):
    """Shortened to their first 39 characters, 'the customer asks about ... card' and '... pin' read alike."""
    from tunesmith.report import plots

    start = "the customer asks about the status of their "
    labels = [start + "card", start + "pin", start + "transfer", "short"]
    plots.confusion([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], labels, "t")
    plots.per_class_f1({lab: {"f1": 0.5, "support": 3} for lab in labels})
    plots.data_profile({"train": {"rows": 4, "label_counts": {lab: 1 for lab in labels},
                                  "chars_histogram": {"0-50": 4}}})
    plots.group_rates({lab: {"n": 3, "selection_rate": 0.5, "tpr": 0.5, "fpr": 0.1} for lab in labels}, "a", "b")
    assert len(figures) == 4
    checked = 0
    for fig in figures:
        for ax in fig.axes:
            for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
                texts = [t.get_text() for t in ticks if t.get_text()]
                if any("\u2026" in t for t in texts):
                    assert len(set(texts)) == len(texts), texts
                    assert "short" in " ".join(texts)
                    assert all(len(t) <= plots.TICK_CHARS + 12 for t in texts), texts
                    checked += 1
    assert checked == 5  # the confusion matrix's two axes, the label bars, per-class F1, group rates
