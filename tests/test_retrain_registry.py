"""`tunesmith retrain --registry NAME`: the champion is the run promoted under NAME."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tunesmith import champions
from tunesmith.cli import app
from tunesmith.cli.loop import _champion
from tunesmith.errors import InputError

runner = CliRunner()


@pytest.fixture()
def registry(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_REGISTRY", str(tmp_path / "registry.sqlite"))


def _trained(folder):
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "tunesmith.json").write_text("{}")
    return folder


def test_the_registry_names_the_champion_and_the_challenger_is_recorded_under_it(tmp_path, registry):
    first, second = _trained(tmp_path / "a"), _trained(tmp_path / "b")
    champions.promote("intents", first)
    champions.promote("intents", second)
    assert _champion(None, "intents", None) == (second.resolve(), "intents")
    assert _champion(None, "intents", "other") == (second.resolve(), "other")
    assert _champion(first, None, None) == (first, None)


@pytest.mark.parametrize("args, message", [
    (["retrain"], "give the champion as RUN_DIR or as --registry NAME"),
    (["retrain", "somewhere", "--registry", "intents"], "not both"),
    (["retrain", "--registry", "intents"], "nothing is promoted under 'intents'"),
])
def test_bad_champion_arguments_are_one_error_line(args, message, registry):
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_both_or_neither_is_an_input_error():
    with pytest.raises(InputError):
        _champion(None, None, None)
