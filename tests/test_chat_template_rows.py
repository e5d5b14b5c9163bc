"""task.chat_template beyond the pre-flight's sample: a row the template rewrites is a located error where
rows are encoded, test rows are checked before training, a relative .jinja file survives the run folder
(eval, resume), and train.init_from's weights are merged only after the checks pass."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from conftest import GEN_PROJECT, make_texts, write_jsonl
from tunesmith import pipeline
from tunesmith.cli import app
from tunesmith.config import TaskConfig, load_config
from tunesmith.data.examples import load_examples
from tunesmith.errors import DataError
from tunesmith.models.load import load_tokenizer
from tunesmith.tasks.chat_template import PREFLIGHT_ROWS, check_chat_template
from tunesmith.tasks.prompts import build_format
from tunesmith.train import stage as train_stage_module
from tunesmith.train.batching import encode_for_training

runner = CliRunner()
CHAT = TaskConfig(type="chat")
_GEN = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
# As Qwen3's template does: an earlier assistant turn loses its reasoning, but only if it has any.
STRIPS_THINKING = ("{% for m in messages %}{% set c = m['content'] %}"
                   "{% if m['role'] == 'assistant' and not loop.last and '</think>' in c %}"
                   "{% set c = c.split('</think>')[-1] %}{% endif %}"
                   "{{ '<|im_start|>' + m['role'] + '\n' + c + '<|im_end|>\n' }}{% endfor %}" + _GEN)
NO_TOOLS = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('tool turns are not supported') }}"
            "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}" + _GEN)


def _turns(i: int, earlier: str) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": earlier},
                         {"role": "user", "content": "and then?"}, {"role": "assistant", "content": f"answer {i}"}]}


def test_a_row_past_the_sample_that_the_template_rewrites_is_located(tmp_path, tiny_model):
    """Every row has the same roles, so the pre-flight samples the first PREFLIGHT_ROWS only; the row
    past them with a reasoning block is refused by the encoder with its file:line, not a bare ValueError."""
    rows = [_turns(i, "sure") for i in range(300)]
    rows[279] = _turns(279, "<think>let me see</think>sure")
    assert 279 >= PREFLIGHT_ROWS
    examples, problems = load_examples(write_jsonl(tmp_path / "train.jsonl", rows), CHAT)
    assert not problems and len(examples) == 300
    tok = load_tokenizer(tiny_model)
    tok.chat_template = STRIPS_THINKING
    fmt = build_format(CHAT, None, tok)
    assert check_chat_template(tok, fmt, examples, "qwen.jinja") == []  # the sample cannot see it
    with pytest.raises(DataError) as e:
        encode_for_training(tok, fmt, examples)
    assert e.value.where.endswith("train.jsonl:280"), e.value.where
    assert "task.chat_template" in e.value.what and "assistant turn 1 differently" in e.value.what
    assert "task.train_on: last_turn" in e.value.hint
    last_turn = build_format(TaskConfig(type="chat", train_on="last_turn"), None, tok)
    assert len(encode_for_training(tok, last_turn, examples)) == 300  # the hint's way out works


def _project(tmp_path, model, template: str, test_rows: list[dict] | None = None, extra: str = "",
             steps: int = 1) -> str:
    texts = make_texts(16, 3)
    rows = [{"messages": [{"role": "user", "content": r["text"]}, {"role": "assistant", "content": r["label"]},
                          {"role": "user", "content": f"again, number {i}"},
                          {"role": "assistant", "content": r["label"]}]} for i, r in enumerate(texts)]
    write_jsonl(tmp_path / "train.jsonl", rows[:14])
    write_jsonl(tmp_path / "test.jsonl", rows[14:] + (test_rows or []))
    text = GEN_PROJECT.format(name="chat", model=model, method="lora", steps=steps, new_tokens=2)
    text = text.replace("  type: generation\n", f"  type: chat\n  chat_template: {template}\n")
    text = text.replace("  batch_size: 4\n", "  batch_size: 4\n" + extra)  # `extra`: train keys
    (tmp_path / "project.yaml").write_text(text.replace("exact_match", "exact_match\n  target: 0.0"))
    return str(tmp_path / "project.yaml")


def test_a_test_row_the_template_cannot_render_fails_before_training(tmp_path, tiny_model):
    (tmp_path / "no_tools.jinja").write_text(NO_TOOLS)
    tool_row = {"messages": [{"role": "user", "content": "weather in Oslo?"}, {"role": "tool", "content": "sunny"},
                             {"role": "assistant", "content": "sunny"}]}
    config = _project(tmp_path, tiny_model, "no_tools.jinja", test_rows=[tool_row])
    result = runner.invoke(app, ["train", config, "--out", str(tmp_path / "out")])
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2, result.output
    assert "task.chat_template" in error and "tool turns are not supported" in error and "test.jsonl:3" in error
    assert not (tmp_path / "out").exists()


def test_a_relative_jinja_file_survives_the_run_folder(tmp_path, tiny_plain_model, monkeypatch):
    """The saved config names the template file absolutely: eval and resume from the run folder find it."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "house.jinja").write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}" + _GEN)
    config = _project(project, tiny_plain_model, "house.jinja", extra="  checkpoint_every: 1\n", steps=2)
    run = tmp_path / "run"
    trained = runner.invoke(app, ["run", config, "--out", str(run), "-q"])
    assert trained.exit_code in (0, 3), trained.output
    assert runner.invoke(app, ["eval", str(run), "-q"]).exit_code in (0, 3)

    def interrupt(*_):
        raise KeyboardInterrupt  # after step 1's checkpoint, before the model is saved

    again = tmp_path / "again"
    with monkeypatch.context() as m:
        m.setattr(train_stage_module, "save_finetuned", interrupt)
        with pytest.raises(KeyboardInterrupt):
            pipeline.train_only(load_config(config), again, progress=False)
    assert (tmp_path / ".again.partial" / "checkpoints").is_dir()
    resumed = runner.invoke(app, ["train", "--resume", str(again), "-q"])
    assert resumed.exit_code == 0, resumed.output
    assert load_tokenizer(again / "model").chat_template == (project / "house.jinja").read_text()


def test_a_missing_jinja_file_is_a_located_config_error(tmp_path, tiny_model):
    config = _project(tmp_path, tiny_model, "missing.jinja")
    result = runner.invoke(app, ["train", config, "--out", str(tmp_path / "out")])
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and "project.yaml:" in error and "task.chat_template" in error, result.output
    assert "missing.jinja" in error


def test_init_from_is_merged_only_after_the_template_checks(tmp_path, tiny_model, monkeypatch):
    first = tmp_path / "first"
    assert runner.invoke(app, ["train", _project(tmp_path, tiny_model, "chatml"), "--out", str(first), "-q"]
                         ).exit_code == 0

    def merged_too_early(*_):
        raise AssertionError("train.init_from merged before the chat template was checked")

    monkeypatch.setattr(train_stage_module, "merged_init", merged_too_early)
    config = _project(tmp_path, tiny_model, "llama3", extra=f"  init_from: {first}\n")  # EOS not in the vocab
    result = runner.invoke(app, ["train", config, "--out", str(tmp_path / "second")])
    assert result.exit_code == 2 and "EOS missing" in result.output, result.output
