"""Config: valid files load typed; every mistake names file, line and key."""

from __future__ import annotations

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


def test_metric_must_fit_task(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, BASE + "task:\n  type: generation\n"))  # default metric is accuracy
    assert "objective.metric" in info.value.line()
    assert load_config(_write(tmp_path, BASE + "task:\n  type: generation\nobjective:\n  metric: rouge_l\n"))


def test_validation_fraction_range(tmp_path):
    with pytest.raises(ConfigError, match="data.validation"):
        load_config(_write(tmp_path, BASE + "  validation: 1.5\n"))


def test_learning_rate_defaults_per_method_and_explicit_value_wins():
    from tunesmith.config import TrainConfig
    from tunesmith.registry import METHOD_SPECS

    assert TrainConfig(method="prompt_tuning").learning_rate == METHOD_SPECS["prompt_tuning"].learning_rate == 3e-2
    assert TrainConfig(method="full").learning_rate == METHOD_SPECS["full"].learning_rate == 2e-5
    assert TrainConfig(method="full", learning_rate=1e-3).learning_rate == 1e-3
