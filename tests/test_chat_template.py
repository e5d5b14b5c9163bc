"""task.chat_template: built-ins, .jinja files, the pre-flight's located errors, and the template
travelling with the saved model."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import CHATML, GEN_PROJECT, make_texts, write_jsonl
from tunesmith.cli import app
from tunesmith.config import TaskConfig
from tunesmith.data.examples import load_examples
from tunesmith.errors import ConfigError, DataError
from tunesmith.models.load import load_tokenizer
from tunesmith.registry import CHAT_TEMPLATES
from tunesmith.tasks import chat_template as ct
from tunesmith.tasks.chat_template import check_chat_template, use_chat_template
from tunesmith.tasks.prompts import build_format, encode_prompt, render_prompt

runner = CliRunner()
CHAT = TaskConfig(type="chat")
ROWS = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "fine"}]},
        {"messages": [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "checking"},
                      {"role": "tool", "content": "sunny"}, {"role": "user", "content": "so?"},
                      {"role": "assistant", "content": "sunny"}]}]
_GEN = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
NO_TOOLS = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('tool turns are not supported') }}"
            "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}" + _GEN)
# The conversation calls the assistant "bot", the generation prompt "assistant": served != trained.
OTHER_HEADER = ("{% for m in messages %}{% set r = 'bot' if m['role'] == 'assistant' else m['role'] %}"
                "{{ '<|im_start|>' + r + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}" + _GEN)
NO_GENERATION_PROMPT = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                        "{% endfor %}")
# Earlier answers are elided once the conversation goes on (as templates that strip reasoning do).
REWRITES = ("{% for m in messages %}{% set c = '(answered)' if m['role'] == 'assistant' and not loop.last "
            "else m['content'] %}{{ '<|im_start|>' + m['role'] + '\n' + c + '<|im_end|>\n' }}{% endfor %}" + _GEN)


@pytest.fixture()
def rows(tmp_path):
    examples, problems = load_examples(write_jsonl(tmp_path / "train.jsonl", ROWS), CHAT)
    assert not problems
    return examples


def _check(tiny_model, examples, template: str, task: TaskConfig = CHAT, name: str = "custom.jinja"):
    tok = load_tokenizer(tiny_model)
    tok.chat_template = template
    return check_chat_template(tok, build_format(task, None, tok), examples, name)


def test_builtins_that_fit_the_vocabulary_pass(tiny_model, rows):
    assert _check(tiny_model, rows, CHAT_TEMPLATES["chatml"], name="chatml") == []
    assert _check(tiny_model, rows, CHAT_TEMPLATES["zephyr"], name="zephyr") == []  # ends turns with eos_token


def test_missing_end_of_turn_token_is_a_located_error(tiny_model, rows):
    """llama3's <|eot_id|> is not in the tiny vocabulary: the answer would end in plain text, never stop."""
    with pytest.raises(DataError) as e:
        _check(tiny_model, rows, CHAT_TEMPLATES["llama3"], name="llama3")
    assert "task.chat_template 'llama3'" in e.value.what and "EOS missing" in e.value.what
    assert e.value.where.endswith("train.jsonl:1")


def test_a_role_the_template_rejects_is_located_at_its_row(tiny_model, rows):
    with pytest.raises(DataError) as e:
        _check(tiny_model, rows, NO_TOOLS)
    assert e.value.where.endswith("train.jsonl:2") and "tool turns are not supported" in e.value.what
    assert "task.chat_template" in e.value.what


@pytest.mark.parametrize("template", [OTHER_HEADER, NO_GENERATION_PROMPT])
def test_a_generation_prompt_unlike_training_is_refused(tiny_model, rows, template):
    with pytest.raises(DataError, match="generation prompt") as e:
        _check(tiny_model, rows, template)
    assert e.value.where.endswith("train.jsonl:1")


def test_a_template_that_rewrites_earlier_turns_needs_last_turn(tiny_model, rows):
    with pytest.raises(DataError, match="assistant turn 1 differently") as e:
        _check(tiny_model, rows, REWRITES)
    assert e.value.where.endswith("train.jsonl:1") and "task.train_on: last_turn" in e.value.hint
    assert _check(tiny_model, rows, REWRITES, TaskConfig(type="chat", train_on="last_turn")) == []


def test_rows_past_the_sample_are_checked_once_per_role_sequence(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(ct, "PREFLIGHT_ROWS", 3)
    plain = ROWS[0]
    examples, _ = load_examples(write_jsonl(tmp_path / "train.jsonl", [plain] * 6 + [ROWS[1]]), CHAT)
    with pytest.raises(DataError) as e:
        _check(tiny_model, examples, NO_TOOLS)
    assert e.value.where.endswith("train.jsonl:7")


def test_plain_tokenizer_warns_that_only_last_turns_train(tiny_plain_model, rows):
    notes = _check(tiny_plain_model, rows, None)
    assert len(notes) == 1 and "2 conversations" in notes[0] and "task.chat_template" in notes[0]


def test_config_names_the_key_for_bad_templates(tmp_path, tiny_model):
    with pytest.raises(ValueError, match="unknown chat template 'chatlm'"):
        TaskConfig(chat_template="chatlm")
    tok = load_tokenizer(tiny_model)
    with pytest.raises(ConfigError) as e:
        use_chat_template(tok, TaskConfig(chat_template="missing.jinja"), tmp_path)
    assert e.value.where == "task.chat_template" and "missing.jinja" in e.value.what
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m['content'] }}")  # no endfor
    with pytest.raises(ConfigError, match="does not render") as e:
        use_chat_template(tok, TaskConfig(chat_template="broken.jinja"), tmp_path)
    assert tok.chat_template == CHATML  # untouched by a failed choice


def test_builtin_replaces_the_model_template(tiny_plain_model):
    tok = load_tokenizer(tiny_plain_model)
    use_chat_template(tok, TaskConfig(chat_template="model"), Path("."))
    assert not tok.chat_template  # `model` keeps the tokenizer's own (none here: the plain prompt)
    use_chat_template(tok, TaskConfig(chat_template="chatml"), Path("."))
    assert tok.chat_template == CHAT_TEMPLATES["chatml"]


def _chat_project(tmp_path: Path, model: Path, template: str) -> Path:
    texts = make_texts(16, 3)  # distinct rows: curation drops duplicates and test look-alikes
    rows = [{"messages": [{"role": "user", "content": r["text"]}, {"role": "assistant", "content": r["label"]},
                          {"role": "user", "content": f"again, number {i}"},
                          {"role": "assistant", "content": r["label"]}]}
            for i, r in enumerate(texts)]
    write_jsonl(tmp_path / "train.jsonl", rows[:14])
    write_jsonl(tmp_path / "test.jsonl", rows[14:])
    text = GEN_PROJECT.format(name="chat", model=model, method="lora", steps=1, new_tokens=2)
    text = text.replace("  type: generation\n", f"  type: chat\n  chat_template: {template}\n")
    (tmp_path / "project.yaml").write_text(text.replace("exact_match", "exact_match\n  target: 0.0"))
    return tmp_path / "project.yaml"


def test_the_chosen_template_is_saved_and_renders_the_trained_prompt(tmp_path, tiny_plain_model):
    """A base model without a template, a .jinja file chosen: the saved tokenizer carries the file and
    gives the prompt training used, token for token."""
    variant = CHATML.replace("{% for message", "{{ '<|im_start|>system\nHouse rules.<|im_end|>\n' }}{% for message")
    (tmp_path / "house.jinja").write_text(variant)
    result = runner.invoke(app, ["train", str(_chat_project(tmp_path, tiny_plain_model, "house.jinja")),
                                 "--out", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    saved = load_tokenizer(tmp_path / "out" / "model")
    assert saved.chat_template == variant
    trained = load_tokenizer(tiny_plain_model)
    use_chat_template(trained, TaskConfig(chat_template="house.jinja"), tmp_path)
    ex = load_examples(tmp_path / "test.jsonl", CHAT)[0][0]
    fmt = build_format(CHAT, None, trained)
    assert render_prompt(saved, fmt, ex) == render_prompt(trained, fmt, ex)
    assert "House rules." in render_prompt(saved, fmt, ex)
    assert encode_prompt(saved, fmt, ex, 512) == encode_prompt(trained, fmt, ex, 512)


def test_cli_refuses_a_template_without_the_end_of_turn_token(tmp_path, tiny_model):
    result = runner.invoke(app, ["train", str(_chat_project(tmp_path, tiny_model, "llama3")),
                                 "--out", str(tmp_path / "out")])
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and error.startswith("error: task.chat_template 'llama3'"), result.output
    assert "EOS missing" in error and "train.jsonl:" in error
    assert not (tmp_path / "out" / "model").exists()  # refused before any training


def test_a_template_path_that_is_a_folder_is_refused_as_one(tmp_path, tiny_model):
    (tmp_path / "house.jinja").mkdir()
    result = runner.invoke(app, ["train", str(_chat_project(tmp_path, tiny_model, "house.jinja")),
                                 "--out", str(tmp_path / "out")])
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and "is a folder, not a file" in error and "project.yaml:" in error, result.output
    assert not (tmp_path / "out").exists()
