"""Data: every supported format reads; every bad row is reported with file:line and reason."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import make_texts, write_jsonl
from tunesmith.config import DataConfig, Project, TaskConfig
from tunesmith.data.examples import load_examples
from tunesmith.data.prepare import prepare_data
from tunesmith.data.split import stratified_split
from tunesmith.errors import DataError, InputError

CLS = TaskConfig()


def test_jsonl_csv_parquet_read_the_same(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = make_texts(6, 0)
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        examples, problems = load_examples(tmp_path / name, CLS)
        assert not problems
        assert [(e.input, e.target) for e in examples] == [(r["text"], r["label"]) for r in rows]


def test_csv_multiline_rows_keep_their_start_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"two\nlines",a\n,b\n', encoding="utf-8")
    examples, problems = load_examples(path, CLS)
    assert examples[0].source == "d.csv:2"
    assert [(p.line, "empty" in p.reason) for p in problems] == [(4, True)]


@pytest.mark.parametrize("content, reason", [
    (b'{"text": "ok", "label": "a"}\n{"text": "broken", \n', "invalid JSON"),
    (b'{"text": "ok", "label": "a"}\n{"label": "a"}\n', "missing field 'text'"),
    (b'{"text": "ok", "label": "a"}\n{"text": "  ", "label": "a"}\n', "is empty"),
    (b'{"text": "ok", "label": "a"}\n{"text": "x", "label": [1]}\n', "must be a string"),
    (b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "a"}\n', "undecodable bytes"),
])
def test_bad_rows_name_line_two(tmp_path, content, reason):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    _, problems = load_examples(path, CLS)
    assert len(problems) == 1 and problems[0].line == 2 and reason in problems[0].reason


def test_group_values_are_grouped_by_what_they_say_not_by_str(tmp_path):
    """str() merged a JSON `true` with the text "True" and a literal "(missing)" with an absent value
    silently: booleans are written as JSON writes them, null/blank/"(missing)" are the missing group,
    and a list or object is a row problem naming the key."""
    values = [True, "True", "true", None, "  ", "(missing)", 3, "3", False]
    rows = [{"text": f"t{i}", "label": "a", "g": v} for i, v in enumerate(values)]
    rows.append({"text": "no g", "label": "a"})
    rows += [{"text": "bad", "label": "a", "g": ["x"]}, {"text": "bad2", "label": "a", "g": {"k": 1}},
             {"text": "bad3", "label": "a", "g": "north\nEVIL LINE"},
             {"text": "bad4", "label": "a", "g": "\u202enorth"}]
    examples, problems = load_examples(write_jsonl(tmp_path / "d.jsonl", rows), CLS, attribute_fields=["g"])
    assert [e.attributes["g"] for e in examples] == [
        "true", "True", "true", "(missing)", "(missing)", "(missing)", "3", "3", "false", "(missing)"]
    assert [(p.line, "fairness.group_fields" in p.reason) for p in problems] == [(11, True), (12, True), (13, True),
                                                                                 (14, True)]
    assert "control or invisible character" in problems[2].reason  # a group is named in reports, as a label
    grouped, problems = load_examples(write_jsonl(tmp_path / "s.jsonl", rows[:3] + rows[5:6]), CLS,
                                      group_field="g")
    assert [e.group for e in grouped] == ["true", "True", "true"]
    assert [p.line for p in problems] == [4]
    assert "missing group field 'g'" in problems[0].reason


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_examples(path, CLS)


def test_generation_formats(tmp_path):
    rows = [{"prompt": "p", "completion": "c"},
            {"instruction": "Do", "input": "this", "output": "done"},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "no answer"}]}]
    examples, problems = load_examples(write_jsonl(tmp_path / "g.jsonl", rows), TaskConfig(type="generation"))
    assert [(e.input, e.target) for e in examples] == [("p", "c"), ("Do\n\nthis", "done"), ("hi", "hello")]
    assert examples[2].messages[0]["role"] == "system"
    assert len(problems) == 1 and problems[0].line == 4 and "assistant" in problems[0].reason


def test_prepare_lists_all_bad_rows_and_raises_first(tmp_path):
    lines = [json.dumps(r) for r in make_texts(5, 0)] + ["{bad", '{"text": "x"}']
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    project = Project(name="p", data=DataConfig(train=path))
    with pytest.raises(DataError) as info:
        prepare_data(project)
    assert f"{path}:6" in info.value.line() and "1 more" in info.value.line()
    assert len(info.value.details) == 2 and info.value.details[1].startswith(f"{path}:7")


def test_stratified_split_is_deterministic_and_keeps_every_class():
    items = list(range(40))
    keys = ["a"] * 20 + ["b"] * 15 + ["c"] * 5
    rest1, held1 = stratified_split(items, keys, 0.2, seed=3)
    rest2, held2 = stratified_split(items, keys, 0.2, seed=3)
    assert held1 == held2 and rest1 == rest2
    assert sorted(rest1 + held1) == items
    assert {keys[i] for i in held1} == {"a", "b", "c"}
    assert sum(keys[i] == "a" for i in held1) == 4


def test_classes_that_cannot_give_their_share_leave_it_to_the_others():
    """Fifty one-row classes beside a 100-row class at 0.2 held out 21 rows, not 30."""
    keys = [f"one{i}" for i in range(50)] + ["big"] * 100
    rest, out = stratified_split(list(range(150)), keys, 0.2, seed=2)
    assert len(out) == 30 and all(keys[i] == "big" for i in out)
    keys = [f"two{i}" for i in range(10) for _ in range(2)] + ["ten"] * 10
    assert len(stratified_split(list(range(30)), keys, 0.6, seed=2)[1]) == 18
    # many keys and a big shortfall (a pass per missing item sorted every key each time: 10,000 sorts)
    keys = [f"one{i}" for i in range(50_000)] + ["big"] * 100_000
    assert len(stratified_split(list(range(150_000)), keys, 0.2, seed=2)[1]) == 30_000


@pytest.mark.parametrize("classes,size,fraction,held", [(300, 3, 0.1, 90), (2000, 2, 0.2, 800), (500, 2, 0.01, 10),
                                                        (3, 10, 0.2, 6), (1, 5, 0.05, 1), (2, 1, 0.5, 0)])
def test_many_small_classes_share_the_held_out_rows(classes, size, fraction, held):
    """Each class with two or more rows gave at least one: 300 classes of 3 rows at 0.1 held out a third
    of the data (300 rows, not 90), and at 0.01 of 500 two-row classes validation came out empty."""
    keys = [f"c{i}" for i in range(classes) for _ in range(size)]
    rest, out = stratified_split(list(range(len(keys))), keys, fraction, seed=1)
    assert len(out) == held and sorted(rest + out) == list(range(len(keys)))
    assert {keys[i] for i in rest} == set(keys)  # every class keeps a row to train on
    per_class = [sum(keys[i] == k for i in out) for k in set(keys)]
    assert max(per_class) - min(per_class) <= 1  # as even as whole rows allow


def test_prepare_builds_splits_and_label_set(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", make_texts(30, 0))
    splits = prepare_data(Project(name="p", data=DataConfig(train=path, test=0.2, validation=0.2)))
    assert splits.labels == ["alpha", "beta", "gamma"]
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 30
    assert {e.target for e in splits.test} == {"alpha", "beta", "gamma"}


def test_a_classification_set_it_cannot_learn_or_score_is_refused(tmp_path):
    """One training label trained a constant predictor that met its objective (accuracy 1.0 on a test of
    that label); test labels none of which the model can answer scored 0 for both models and passed a
    target of 0. Both exit 2 now; a test label spelled another way is named with its training spelling."""
    from tunesmith.errors import DataError

    rows = make_texts(30, 0)
    train = write_jsonl(tmp_path / "train.jsonl", [r for r in rows if r["label"] == "alpha"])
    with pytest.raises(DataError) as info:
        prepare_data(Project(name="p", data=DataConfig(train=train, test=0.2, validation=0.2)))
    assert "the training split holds a single label ('alpha')" in info.value.line() and str(train) in info.value.line()
    from tunesmith.data.stage import check  # `data check` says so too, on the files as given

    with pytest.raises(DataError, match="holds a single label"):
        check(Project(name="p", data=DataConfig(train=train, test=0.2, validation=0.2)))
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    test = write_jsonl(tmp_path / "test.jsonl", [{**r, "label": r["label"].title()} for r in make_texts(9, 1)])
    with pytest.raises(DataError) as info:
        prepare_data(Project(name="p", data=DataConfig(train=train, test=test, validation=0.2)))
    line = info.value.line()
    assert "none of the test labels (Alpha (training spells it 'alpha'), Beta (training spells it 'beta')" in line
    assert f"{test}:1" in line
    with pytest.raises(DataError, match="none of the test labels"):
        check(Project(name="p", data=DataConfig(train=train, test=test, validation=0.2)))
    some = [{**r, "label": "Alpha"} if i == 0 else r for i, r in enumerate(make_texts(9, 1))]
    write_jsonl(test, some)  # one of them: a warning, with the same hint
    splits = prepare_data(Project(name="p", data=DataConfig(train=train, test=test, validation=0.2)))
    assert "test labels never seen in training: Alpha (training spells it 'alpha')" in splits.warnings


def test_data_prepared_in_a_child_process_arrives_whole(tmp_path, monkeypatch):
    """`run` and `train` prepare data in a spawned child (its libraries never load here): the splits equal
    the in-process ones, a bad row arrives as the same located DataError, a bad mode is named."""
    import os
    import subprocess
    import sys

    from tunesmith.data.prepare import DATA_PROCESS_ENV, prepare_data_apart

    path = write_jsonl(tmp_path / "train.jsonl", make_texts(30, 0))
    project = Project(name="p", data=DataConfig(train=path, test=0.2, validation=0.2))
    inline = prepare_data(project)
    monkeypatch.setenv(DATA_PROCESS_ENV, "child")
    apart = prepare_data_apart(project)
    assert [(e.input, e.target) for e in apart.train] == [(e.input, e.target) for e in inline.train]
    assert apart.labels == inline.labels and apart.warnings == inline.warnings
    assert apart.curation.cached_vectors([e.input for e in apart.train]) is not None  # the embedder ran there
    script = ("import sys; from tunesmith.config import DataConfig, Project; "
              "from tunesmith.data.prepare import prepare_data_apart; "
              f"s = prepare_data_apart(Project(name='p', data=DataConfig(train={str(path)!r}, test=0.2, "
              "validation=0.2))); print(len(s.train), sorted({'sklearn', 'cleanlab', 'datasets'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**os.environ, DATA_PROCESS_ENV: "child"})
    assert done.stdout.split("\n")[-2] == f"{len(inline.train)} []"  # curation's libraries never loaded here
    with open(path, "a") as f:
        f.write("{not json\n")
    with pytest.raises(DataError) as bad:
        prepare_data_apart(project)
    assert bad.value.line() == _inline_error(project).line() and ":31" in bad.value.line()
    monkeypatch.setenv(DATA_PROCESS_ENV, "elsewhere")
    with pytest.raises(InputError, match=DATA_PROCESS_ENV):
        prepare_data_apart(project)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and signals as on Linux")
def test_ctrl_c_stops_the_data_child_at_once(tmp_path):
    """Ctrl-C reaches the parent only (the child has a session of its own); the parent kills the child
    and stops; a parent killed outright takes the child with it (die_with_parent)."""
    import os
    import signal
    import subprocess
    import time

    import psutil

    path = write_jsonl(tmp_path / "train.jsonl", make_texts(6000, 0))  # tens of seconds of curation in the child
    # A terminal's Ctrl-C raises KeyboardInterrupt even where this test runs with SIGINT ignored (a
    # background job inherits SIG_IGN, and so would the script).
    script = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "from tunesmith.config import DataConfig, Project; "
              "from tunesmith.data.prepare import prepare_data_apart; "
              f"prepare_data_apart(Project(name='p', data=DataConfig(train={str(path)!r}, test=0.2, validation=0.2)))")
    for how in (signal.SIGINT, signal.SIGKILL):
        parent = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "TUNESMITH_DATA_PROCESS": "child"},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        child = psutil.Process(parent.pid).children()[0]
        try:
            assert os.getsid(child.pid) != os.getsid(parent.pid)  # a terminal's Ctrl-C does not reach it
            time.sleep(1.0)
            parent.send_signal(how)
            parent.wait(timeout=8)  # not after the curation: the child is stopped, not awaited
            child.wait(timeout=8)  # gone, not left running
            if how == signal.SIGINT:
                assert "KeyboardInterrupt" in parent.stderr.read() and parent.returncode != 0
        finally:  # never leave either process behind, whatever failed
            for process in (parent, child):
                try:
                    process.kill()
                except (ProcessLookupError, psutil.NoSuchProcess):
                    pass


def _inline_error(project) -> DataError:
    with pytest.raises(DataError) as e:
        prepare_data(project)
    return e.value


def test_field_absent_from_every_row_points_at_the_config_key(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,category\nhello,a\nbye,b\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_examples(path, CLS)
    assert "task.label_field" in info.value.line() and "category" in info.value.line()
    assert f"{path}:2" in info.value.line()


def test_labels_read_from_data_are_checked_as_declared_labels_are(tmp_path):
    """A label with a line break, a zero-width space or a bell passed from the data into prompt.json, the
    system prompt and the reports, while task.labels refuses it and feedback could never name it."""
    rows = [{"text": "a", "label": "alpha"}, {"text": "b", "label": "al\npha"}, {"text": "c", "label": "be\u200bta"},
            {"text": "d", "label": "gam\u0007ma"}, {"text": "e", "label": "\u0645\u06cc\u200c\u0631\u0648\u062f"},
            {"text": "f", "label": "al\u00adpha"},  # a soft hyphen: "alpha" to the eye
            {"text": "g", "label": "x" * 201}, {"text": "h", "label": "y" * 200}]  # feedback could not name it
    examples, problems = load_examples(write_jsonl(tmp_path / "t.jsonl", rows), TaskConfig())
    assert [e.target for e in examples] == ["alpha", "\u0645\u06cc\u200c\u0631\u0648\u062f", "y" * 200]
    assert [p.line for p in problems] == [2, 3, 4, 6, 7]  # ZWNJ is a letter
    assert problems[0].reason.startswith('label "al\\npha" holds a control or invisible character')
    assert "is 201 characters long, over 200" in problems[4].reason
    assert all("\n" not in p.reason for p in problems)  # the message stays one line


def test_paraphrases_are_normalised_as_real_inputs_are(tmp_path, monkeypatch):
    """A paraphrase written by the model kept its NUL and DEL characters, which cleaning takes out of every
    real input (data.clean.normalize.control_chars)."""
    import tunesmith.data.paraphrase as paraphrase_module
    from tunesmith.data.prepare import _paraphraser

    monkeypatch.setattr(paraphrase_module, "paraphrase_with_model",
                        lambda model, texts, n, seed: [[f"{t}\x00 again\x7f"] * n for t in texts])
    made = _paraphraser(Project(name="p", data=DataConfig(train=tmp_path / "t.jsonl")))(["hello"], 2)
    assert made == [["hello again", "hello again"]]


def test_a_header_name_with_spaces_around_it_is_shown_quoted(tmp_path):
    """`text, label` as a CSV header names the column " label": listed bare, the space was invisible."""
    (tmp_path / "t.csv").write_text("text, label\nhello,a\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_examples(tmp_path / "t.csv", TaskConfig())
    assert "fields present: ' label', text" in info.value.line()


def test_labels_in_two_unicode_forms_are_one_class_and_look_alikes_are_warned_about(tmp_path):
    """"café" precomposed and as e + combining accent were two classes (the model was asked to choose
    between two identical-looking answers); labels differing only in case or width are kept apart, as the
    data says, with a warning."""
    from pydantic import ValidationError

    rows = make_texts(30, 0)
    for i, r in enumerate(rows):
        if r["label"] == "alpha":
            r["label"] = "caf\u00e9" if i % 2 else "cafe\u0301"
        elif r["label"] == "beta" and i % 2:
            r["label"] = "Beta"
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    splits = prepare_data(Project(name="p", data=DataConfig(train=path, test=0.2, validation=0.2)))
    assert splits.labels == ["Beta", "beta", "caf\u00e9", "gamma"]
    assert any("differ only in case or width" in w and "Beta / beta" in w for w in splits.warnings)
    assert TaskConfig(labels=["cafe\u0301", "x"]).labels == ["caf\u00e9", "x"]
    with pytest.raises(ValidationError, match="listed twice"):
        TaskConfig(labels=["caf\u00e9", "cafe\u0301"])


def test_an_empty_held_out_split_of_single_row_labels_says_why(tmp_path):
    rows = [{"text": f"text number {i}", "label": f"label{i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as info:
        prepare_data(Project(name="p", data=DataConfig(train=path, test=0.2, validation=0.2)))
    assert "split is empty (each of the 40 labels has a single training row" in info.value.line()


def test_every_reader_of_a_label_compares_its_nfc_form():
    """Data labels became NFC while a corrections file, fairness.positive_label and live-quality answers kept
    the form they were typed in: a decomposed "café" matched no row, was "not one of the model's labels", or
    scored a right answer as wrong."""
    from tunesmith.config.stages import FairnessConfig
    from tunesmith.data.corrections import parse_decision
    from tunesmith.serve.quality import figure, scored
    from tunesmith.serve.store import LabelledRequest

    nfd, nfc = "cafe\u0301", "caf\u00e9"
    decision = parse_decision({"text": "x", "given_label": nfd, "action": "relabel", "label": "the" + nfd})
    assert decision.given_label == nfc and decision.label == "the" + nfc
    assert FairnessConfig(positive_label=nfd).positive_labels == [nfc]
    rows = [LabelledRequest(f"r{i}", 0.0, "/v1/classify", "x", nfd, None, None, nfc if i % 2 else None, None,
                            None if i % 2 else 1, 0.0) for i in range(6)]
    assert figure(*scored(rows, "accuracy")[:2], "accuracy")[0] == 1.0


@pytest.mark.parametrize("row,says", [
    ({"text": "red one", "label": None}, "label 'label' must be a string, got null (or the key is missing)"),
    ({"text": "red one", "label": [1]}, "label 'label' must be a string, got a list"),
    ({"text": {"a": 1}, "label": "alpha"}, "field 'text' must be a string, got an object"),
])
def test_a_wrong_cell_is_named_in_json_words_not_python_types(tmp_path, row, says):
    """The error said `got NoneType` (a null or a missing key), `got dict`: Python's names for JSON values."""
    from tunesmith.errors import DataError

    path = write_jsonl(tmp_path / "train.jsonl", make_texts(30, 0) + [row])
    with pytest.raises(DataError) as info:
        prepare_data(Project(name="p", data=DataConfig(train=path, test=0.2, validation=0.2)))
    assert says in info.value.line() and f"{path}:31" in info.value.line(), info.value.line()


@pytest.mark.parametrize("name,encode,says", [
    ("train.jsonl", lambda text: text.encode("utf-16"), "the file is UTF-16 text; tunesmith reads UTF-8"),
    ("train.jsonl", lambda text: text.encode("utf-16-le"), "the file is UTF-16 text; tunesmith reads UTF-8"),
    ("train.csv", lambda text: text.encode("utf-16-be"), "the file is UTF-16 text; tunesmith reads UTF-8"),
    ("train.csv", lambda text: text.replace(",", ";").encode(),
     "the header reads as one field, 'text;label': the file seems to separate its fields with ';'"),
    ("train.tsv", lambda text: text.encode(), "separate its fields with ','; tunesmith reads .csv files"),
    ("train.jsonl", lambda text: bytes(100_000), "the file starts with NUL bytes, not text"),  # was "UTF-16 text"
    ("train.csv", lambda text: bytes(300) + text.encode(), "the file starts with NUL bytes, not text"),
])
def test_a_file_in_another_encoding_or_separator_is_named_for_what_it_is(tmp_path, name, encode, says):
    """UTF-16 without its byte-order mark read as UTF-8 with NULs ("invalid JSON: Expecting property
    name"); a semicolon CSV said only that no row had the field 'text' (fields present: text;label)."""
    import csv
    import io

    from tunesmith.errors import DataError

    rows = make_texts(30, 0)
    if name.endswith("jsonl"):
        text = "".join(json.dumps(r) + "\n" for r in rows)
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, ["text", "label"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    (tmp_path / name).write_bytes(encode(text))
    with pytest.raises(DataError) as info:
        prepare_data(Project(name="p", data=DataConfig(train=tmp_path / name, test=0.2, validation=0.2)))
    assert says in info.value.line() and str(tmp_path / name) in info.value.line(), info.value.line()
