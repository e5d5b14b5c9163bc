"""Config: valid files load typed; every mistake names file, line and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.config import dump_config, load_config
from tunesmith.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "x"}\n', encoding="utf-8")
    path = tmp_path / "project.yaml"
    path.write_text(text, encoding="utf-8")
    return path


BASE = "name: demo\ndata:\n  train: train.jsonl\n"


def test_minimal_config_gets_defaults_and_resolves_paths(tmp_path):
    project = load_config(_write(tmp_path, BASE))
    assert project.train.method == "lora" and project.train.lora.r == 16
    assert project.data.train == (tmp_path / "train.jsonl").resolve()
    assert project.objective.metric == "accuracy"


def test_resolved_config_round_trips(tmp_path):
    project = load_config(_write(tmp_path, BASE + "train:\n  lora:\n    r: 4\n"))
    saved = tmp_path / "saved.yaml"
    saved.write_text(dump_config(project), encoding="utf-8")
    again = load_config(saved)
    assert again.train.lora.r == 4 and again.data.train == project.data.train


@pytest.mark.parametrize("text, key, line", [
    (BASE + "train:\n  lora_r: 8\n", "train.lora_r", 5),
    (BASE + "trian:\n  epochs: 1\n", "trian", 4),
    (BASE + "train:\n  epochs: many\n", "train.epochs", 5),
    (BASE + "train:\n  method: sparse_magic\n", "train.method", 5),
    (BASE + "objective:\n  metric: bleurt\n", "objective.metric", 5),
    (BASE + "objective:\n  constraints:\n    latency_p99: {max: 3}\n", "objective.constraints.latency_p99", 6),
    ("name: demo\ndata:\n  train: missing.jsonl\n", "data.train", 3),
    ("name: demo\n", "data", None),
])
def test_errors_name_key_and_line(tmp_path, text, key, line):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = info.value.line()
    assert message.startswith("error: ") and "\n" not in message
    assert f"({key})" in message
    if line:
        assert f"{path}:{line} " in message


def test_misspelt_nested_key_gets_a_hint(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, BASE + "train:\n  lora_r: 8\n"))
    assert "lora.r" in info.value.line()


def test_yaml_syntax_error_names_line(tmp_path):
    path = _write(tmp_path, BASE + "train:\n  epochs: [1,\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "invalid YAML" in info.value.line() and f"{path}:" in info.value.line()


def _alias_bomb(levels: int) -> str:
    """A dozen lines whose aliases expand to 10**levels strings."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text,problem,line", [
    # 400 KB of brackets: refused where the 65th opens (it took minutes when Python's recursion was the bound)
    ("eval:\n  stop: " + "[" * 200_000 + "]" * 200_000 + "\n", "the document nests deeper than 64 levels", 2),
    # block mappings: the document's own mapping is level 1, so the one of line 65 (k63) is level 65
    ("x:\n" + "".join(f"{' ' * (i + 1)}k{i}:\n" for i in range(70)) + " " * 71 + "v\n",
     "the document nests deeper than 64 levels", 65),
    ("x:\n" + "".join(f"{' ' * (i + 1)}k{i}:\n" for i in range(63)) + " " * 64 + "v\n", None, None),
    (_alias_bomb(9) + "eval:\n  stop: *l8\n", "anchors and aliases expand the document past 100,000 values", 5),
    ("task: &t {instruction: *t}\n", "an alias refers to the node that holds it", 1),
    ("train:\n  seed: 2001-02-30\n", "a value YAML cannot build (day is out of range for month)", None),
    ("train:\n  epochs: !!int abc\n", "a value YAML cannot build", None),
])
def test_hostile_yaml_is_refused_with_its_line(tmp_path, text, problem, line):
    # Expanded, the bomb is 10**9 strings: refused from the node counts, never built or walked.
    path = _write(tmp_path, BASE + text)
    if problem is None:  # 64 levels (the document's mapping, then those k0 to k62 open) are read; x is no key
        with pytest.raises(ConfigError, match="unknown key 'x'"):
            load_config(path)
        return
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"invalid YAML: {problem}" in info.value.line()
    if line is not None:
        assert f"{path}:{line + 3}" in info.value.line()


def test_an_oversized_config_file_is_refused_unread(tmp_path):
    from tunesmith.config.load import MAX_CONFIG_BYTES

    path = _write(tmp_path, BASE + "# " + "x" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "over 1 MiB: not a project.yaml" in info.value.line() and str(path) in info.value.line()


def test_anchors_and_merge_keys_within_the_bound_still_load(tmp_path):
    from tunesmith.config import yaml_text

    text = "shared: &s {epochs: 2, batch_size: 4}\ntrain: {<<: *s, learning_rate: 0.001}\n"
    assert yaml_text.safe_load(text)["train"] == {"epochs": 2, "batch_size": 4, "learning_rate": 0.001}
    # The node tree returned for line numbers is the file's own: the merge is not written into it.
    root, value = yaml_text.load("base: &b {x: 1}\nm:\n  <<: *b\n  x: 2\n")
    assert value["m"] == {"x": 2} and [k.value for k, _ in root.value[1][1].value] == ["<<", "x"]
    # the root, its three keys, l0 (10 strings), l1 (10 x l0), l2 (10 x l1)
    assert yaml_text.expanded_size(yaml_text.load(_alias_bomb(3))[0]) == 1 + 3 + 11 + 111 + 1111
    project = load_config(_write(tmp_path, BASE.replace("name: demo", "name: &n demo") + "task: {instruction: *n}\n"))
    assert project.task.instruction == "demo"


def test_metric_must_fit_task(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, BASE + "task:\n  type: generation\nobjective:\n  metric: accuracy\n"))
    assert "objective.metric" in info.value.line()
    assert load_config(_write(tmp_path, BASE + "task:\n  type: generation\nobjective:\n  metric: rouge_l\n"))


@pytest.mark.parametrize("extra,metric", [
    ("task:\n  type: generation\n", "exact_match"), ("task:\n  type: chat\n", "exact_match"),
    ("task:\n  type: text\n", "perplexity"), ("task:\n  type: generation\ntrain:\n  method: dpo\n",
                                               "preference_accuracy"),
    ("task:\n  type: chat\ntrain:\n  method: kto\n", "exact_match"),  # KTO rows are no pairs to score
    ("objective:\n  target: 0.5\n", "accuracy")])
def test_an_unset_objective_metric_is_the_tasks_first_and_is_recorded(tmp_path, extra, metric):
    """A generation project without `objective.metric` is not refused for a key it never wrote."""
    project = load_config(_write(tmp_path, BASE + extra))
    assert project.objective.metric == metric
    assert f"metric: {metric}" in dump_config(project)


def test_compare_ranks_methods_on_a_metric_each_one_is_scored_on(tmp_path):
    """A DPO config's unset metric is preference_accuracy: carried into `compare --methods lora`, the lora
    run was refused ("unknown metric"); an unset metric is the task's first for every method instead."""
    from tunesmith.pipeline import _method_config

    dpo = load_config(_write(tmp_path, BASE + "task:\n  type: generation\ntrain:\n  method: dpo\n"))
    assert dpo.objective.metric == "preference_accuracy" and dpo.objective.metric_defaulted
    assert {_method_config(dpo, m).objective.metric for m in ("lora", "dpo", "kto")} == {"exact_match"}
    given = load_config(_write(tmp_path, BASE + "task:\n  type: generation\nobjective:\n  metric: rouge_l\n"))
    assert not given.objective.metric_defaulted and _method_config(given, "dpo").objective.metric == "rouge_l"


@pytest.mark.parametrize("key, value", [("validation", "1.5"), ("validation", ".nan"), ("test", ".inf"),
                                        ("test", "-.inf")])
def test_split_fraction_range(tmp_path, key, value):
    # A NaN is named as the fraction it is meant to be, not as a path (the key's other form)
    with pytest.raises(ConfigError, match=f"'data.{key}': a fraction must lie strictly between 0 and 1"):
        load_config(_write(tmp_path, BASE + f"  {key}: {value}\n"))


@pytest.mark.parametrize("key,value", [("paraphrases", 1_000_000), ("eda", 33), ("char_noise", 10**9)])
def test_augment_copies_per_row_are_bounded(tmp_path, key, value):
    with pytest.raises(ConfigError, match=f"data.augment.{key}"):
        load_config(_write(tmp_path, BASE + f"  augment: {{enabled: true, {key}: {value}}}\n"))


@pytest.mark.parametrize("section,key", [
    ("train:\n  seed: 100000000000000000000000\n", "train.seed"),      # numpy: Overflow (internal error)
    ("train:\n  grad_accum: 1000000000\n", "train.grad_accum"),       # a step of 1e9 micro-batches: a hang
    ("train:\n  neftune_alpha: 1.0e+300\n", "train.neftune_alpha"),   # noise out of float range
    ("train:\n  weight_decay: 1.0e+300\n", "train.weight_decay"),     # NaN weights, blamed on the learning rate
    ("train:\n  epochs: 1.0e+300\n", "train.epochs"),                 # select estimated "inf s"
    ("train:\n  max_steps: 100000000000000000000\n", "train.max_steps"),  # select estimated 1.8e20 s
    ("eval:\n  judge: {timeout_s: 1.0e+300}\n", "eval.judge.timeout_s"),  # timestamp out of range, after training
    ("eval:\n  max_new_tokens: 100000000\n", "eval.max_new_tokens"),
    ("eval:\n  bootstrap_resamples: 1000000000\n", "eval.bootstrap_resamples"),  # 8 GB and a 1e9 loop
    ("data:\n  seed: -1\n", "data.seed"),
])
def test_values_that_fail_deep_inside_are_refused_at_their_key(tmp_path, section, key):
    text = BASE.replace("data:\n", section) if section.startswith("data:") else BASE + section
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(_write(tmp_path, text))


def test_source_weights_cannot_overflow_their_sum(tmp_path):
    text = "name: demo\ndata:\n  train: [{path: a.jsonl, weight: 1.0e+308}, {path: b.jsonl, weight: 1.0e+308}]\n"
    with pytest.raises(ConfigError, match="weight"):
        load_config(_write(tmp_path, text), check_files=False)


def test_learning_rate_defaults_per_method_and_explicit_value_wins():
    from tunesmith.config import TrainConfig
    from tunesmith.registry import METHOD_SPECS

    assert TrainConfig(method="prompt_tuning").learning_rate == METHOD_SPECS["prompt_tuning"].learning_rate == 3e-2
    assert TrainConfig(method="full").learning_rate == METHOD_SPECS["full"].learning_rate == 2e-5
    assert TrainConfig(method="full", learning_rate=1e-3).learning_rate == 1e-3


def test_a_relative_request_log_path_is_beside_the_config(tmp_path, monkeypatch):
    """It was resolved from the folder `serve` was started in: the log landed wherever that was."""
    monkeypatch.chdir("/")
    project = load_config(_write(tmp_path, BASE + "serve:\n  request_log: {path: logs/requests.db}\n"))
    assert project.serve.request_log.path == (tmp_path / "logs" / "requests.db").resolve()


@pytest.mark.parametrize("extra,key,says", [
    ("benchmarks:\n  - {name: a, data: t.jsonl}\n  - {name: a, data: t.jsonl}\n", "benchmarks",
     "two suites are named 'a'"),
    ("benchmarks:\n  - {name: a, data: t.jsonl, task: {type: text}}\n", "benchmarks", "task.type text does not apply"),
    ("fairness:\n  group_fields: [g, g]\n", "fairness.group_fields", "listed twice"),
    ("fairness:\n  group_fields: [religion]\n  lexicon: [religion]\n", "fairness.group_fields",
     "'religion' is both a group column and a fairness.lexicon category"),
    ("objective:\n  constraints: {latency_p95_ms: {min: 5, max: 1}}\n", "latency_p95_ms", "min 5 is above max 1"),
    ("fairness:\n  group_fields: [g]\n  counterfactual_examples: 0\nobjective:\n  constraints:\n"
     "    counterfactual_flip_rate: {max: 0.1}\n", "counterfactual_flip_rate", "counterfactual_examples is 0"),
    ('eval:\n  judge: {enabled: true, endpoint: "http://evil.invalid:80\\n@127.0.0.1:1/v1"}\n', "eval.judge.endpoint",
     "a space or a control character"),
    ("  augment: {enabled: true, oversample_to: 50}\ntask:\n  type: generation\n", "data.augment.oversample_to",
     "a generation task has no classes"),
])
def test_settings_that_cannot_mean_what_they_say_are_refused(tmp_path, extra, key, says):
    (tmp_path / "t.jsonl").write_text('{"text": "a", "label": "b"}\n')
    with pytest.raises(ConfigError) as refused:
        load_config(_write(tmp_path, BASE + extra), check_files=False)
    assert key in refused.value.line() and says in refused.value.line(), refused.value.line()


@pytest.mark.parametrize("label,says", [("alpha ", "starts or ends with whitespace"),
                                        ("alpha\u200b", "invisible"), ("al\npha", "control")])
def test_a_declared_label_no_row_could_match_is_refused(tmp_path, label, says):
    text = BASE + f"task:\n  labels: [alpha, {json.dumps(label)}]\n"
    with pytest.raises(ConfigError, match=says):
        load_config(_write(tmp_path, text), check_files=False)
    load_config(_write(tmp_path, BASE + 'task:\n  labels: [alpha, "\u0645\u06cc\u200c\u0631\u0648\u062f"]\n'),
                check_files=False)  # a Persian label with a zero-width non-joiner is a word
    with pytest.raises(ConfigError, match="the list is empty"):  # every row's label was "not in task.labels"
        load_config(_write(tmp_path, BASE + "task:\n  labels: []\n"), check_files=False)


@pytest.mark.parametrize("extra,key", [("objective:\n  target: 5\n", "objective.target"),
                                       ("objective:\n  min_gain: 2\n", "objective.min_gain"),
                                       ("objective:\n  constraints: {ece: {max: -1}}\n", "ece"),
                                       ("objective:\n  constraints: {latency_p95_ms: {max: -5}}\n", "latency_p95_ms"),
                                       ("objective:\n  constraints: {f1_macro: {min: 1.5}}\n", "f1_macro")])
def test_an_objective_no_value_could_meet_is_refused(tmp_path, extra, key):
    with pytest.raises(ConfigError) as refused:
        load_config(_write(tmp_path, BASE + extra), check_files=False)
    assert key in refused.value.line() and "can" in refused.value.line()
    load_config(_write(tmp_path, BASE + "objective:\n  target: 1\n  min_gain: -0.5\n"), check_files=False)


def test_a_config_path_that_is_no_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    for odd in (tmp_path, Path("/dev/zero")):
        with pytest.raises(ConfigError, match="is not a regular file"):
            load_config(odd)


@pytest.mark.parametrize("value", ["{shots: [-1]}", "{shots: [100000]}", "{shots: []}", "{draws: 1000000000}"])
def test_prompt_search_sizes_are_bounded(tmp_path, value):
    """shots: [-1] was ignored silently; a huge count or draw number would score for ever."""
    with pytest.raises(ConfigError, match="train.prompt_optimization"):
        load_config(_write(tmp_path, BASE + f"train:\n  prompt_optimization: {value}\n"), check_files=False)


def test_a_glob_through_a_link_loop_is_refused_not_walked_for_ever(tmp_path):
    """glob's ** follows links to folders with no loop guard: two links back up made an exponential walk
    that never ended (the config loader and the workbench's form both match globs)."""
    import glob as globlib
    import threading

    from tunesmith.config.sources import GlobTooWide, glob_matches

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a").symlink_to("..")
    (tmp_path / "data" / "b").symlink_to("..")
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "b"}\n')
    outcome = []

    def load():
        try:
            load_config(_write(tmp_path, "name: demo\ndata:\n  train: data/**/*.csv\n"))
        except ConfigError as e:
            outcome.append(e.line())
    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(60)
    assert outcome and "symbolic link to a folder above it" in outcome[0] and "(data.train)" in outcome[0], outcome
    with pytest.raises(GlobTooWide):
        list(glob_matches(globlib.escape(str(tmp_path)) + "/data/**/*.csv"))
    assert list(glob_matches(globlib.escape(str(tmp_path)) + "/*.jsonl")) == [str(tmp_path / "train.jsonl")]


@pytest.mark.parametrize("task,key", [("task:\n  text_field: label\n", "task.label_field"),
                                      ("task:\n  type: generation\n  prompt_field: q\n  completion_field: q\n",
                                       "task.completion_field")])
def test_one_column_cannot_be_both_the_input_and_the_answer(tmp_path, task, key):
    """`task.text_field: label` trained the model to predict the label from itself (data.columns refused it)."""
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError

    (tmp_path / "p.yaml").write_text("name: p\nmodel: m\n" + task + "data:\n  train: t.jsonl\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "p.yaml")
    assert key in info.value.line() and "same column" in info.value.line()


@pytest.mark.parametrize("text,line", [("~: x\n", 4), ("train:\n  seed: 1\n  null: 2\n", 6), ("yes: 2\n", 4)])
def test_a_key_yaml_reads_as_no_string_is_refused_at_its_line(tmp_path, text, line):
    """`~`, `null` and `yes` are read as None and True: the error named no line (their text is not 'None')."""
    path = _write(tmp_path, BASE + text)
    with pytest.raises(ConfigError, match="Keys should be strings") as info:
        load_config(path)
    assert f"{path}:{line} " in info.value.line()
