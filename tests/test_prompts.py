"""Prompt formatting: chat template and plain fallback, answer suffix, truncation to the budget."""

from __future__ import annotations

import dataclasses

from tunesmith.config import TaskConfig
from tunesmith.data.examples import Example
from tunesmith.models.load import load_tokenizer
from tunesmith.tasks.prompts import PromptFormat, answer_suffix, build_format, encode_prompt, render_prompt


def test_chat_prompt_lists_labels_and_answer_ends_turn(tiny_model):
    tok = load_tokenizer(tiny_model)
    fmt = build_format(TaskConfig(instruction="Classify."), ["alpha", "beta"], tok)
    text = render_prompt(tok, fmt, Example("red card", "alpha", "t"))
    assert text.startswith("<|im_start|>system\nClassify.\nAnswer with one of: alpha, beta.<|im_end|>")
    assert text.endswith("<|im_start|>user\nred card<|im_end|>\n<|im_start|>assistant\n")
    assert answer_suffix(tok, fmt, "alpha") == "alpha<|im_end|>"


def test_label_list_left_out_when_it_does_not_fit(tiny_model):
    tok = load_tokenizer(tiny_model)
    labels = [f"label_number_{i}" for i in range(200)]
    fmt = build_format(TaskConfig(instruction="Classify.", max_length=64), labels, tok)
    assert not fmt.list_labels and "Answer with one of" not in fmt.system_text()


def test_plain_template_without_chat_template(tiny_plain_model):
    tok = load_tokenizer(tiny_plain_model)
    fmt = build_format(TaskConfig(type="generation", instruction="Answer."), None, tok)
    assert render_prompt(tok, fmt, Example("2+2?", "4", "t")) == "Answer.\n\nInput: 2+2?\nOutput:"
    assert answer_suffix(tok, fmt, "4") == " 4" + tok.eos_token


def test_long_input_is_cut_to_the_budget_keeping_the_instruction(tiny_model):
    tok = load_tokenizer(tiny_model)
    fmt = build_format(TaskConfig(instruction="Classify."), ["alpha", "beta"], tok)
    long = Example(" ".join(["red blue green money"] * 200), "alpha", "t")
    ids, truncated = encode_prompt(tok, fmt, long, budget=60)
    assert truncated and len(ids) <= 60
    assert tok.decode(ids).startswith("<|im_start|>system\nClassify.")
    short_ids, short_truncated = encode_prompt(tok, fmt, Example("red", "alpha", "t"), budget=60)
    assert not short_truncated and len(short_ids) < 60


def test_a_long_input_loses_its_middle_so_a_question_at_the_end_survives(tiny_model):
    tok = load_tokenizer(tiny_model)
    fmt = build_format(TaskConfig(type="generation", instruction="Answer."), None, tok)
    context = "Opening words. " + " ".join(["filler text"] * 300)
    ex = Example(context + " Question: who built the bridge?", "Ada", "t")
    ids, truncated = encode_prompt(tok, fmt, ex, budget=80)
    text = tok.decode(ids)
    assert truncated and len(ids) <= 80
    assert "Opening words." in text and "who built the bridge?" in text and " … " in text
    chat = Example(ex.input, "Ada", "t", messages=[{"role": "user", "content": ex.input}])
    chat_text = tok.decode(encode_prompt(tok, fmt, chat, budget=80)[0])
    assert "Opening words." in chat_text and "who built the bridge?" in chat_text


def test_chat_examples_keep_their_own_system_turn(tiny_model):
    tok = load_tokenizer(tiny_model)
    fmt = build_format(TaskConfig(type="chat", instruction="Default system."), None, tok)
    own = Example("hi", "hello", "t", messages=[{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "hi"}])
    text = render_prompt(tok, fmt, own)
    assert "Be brief." in text and "Default system." not in text


def test_few_shot_examples_come_before_the_input(tiny_model, tiny_plain_model):
    shots = [{"input": "red hat", "output": "alpha"}, {"input": "blue sky", "output": "beta"}]
    tok = load_tokenizer(tiny_model)
    fmt = dataclasses.replace(build_format(TaskConfig(instruction="Classify."), ["alpha", "beta"], tok), shots=shots)
    text = render_prompt(tok, fmt, Example("green", "gamma", "t"))
    assert ("<|im_start|>user\nred hat<|im_end|>\n<|im_start|>assistant\nalpha<|im_end|>\n"
            "<|im_start|>user\nblue sky<|im_end|>\n<|im_start|>assistant\nbeta<|im_end|>\n"
            "<|im_start|>user\ngreen<|im_end|>") in text
    plain_tok = load_tokenizer(tiny_plain_model)
    plain = dataclasses.replace(build_format(TaskConfig(type="generation", instruction="Answer."), None, plain_tok),
                                shots=shots)
    assert render_prompt(plain_tok, plain, Example("green", "gamma", "t")) == (
        "Answer.\n\nInput: red hat\nOutput: alpha\n\nInput: blue sky\nOutput: beta\n\nInput: green\nOutput:")
    assert PromptFormat.from_json(fmt.to_json()) == fmt


def test_validation_decodes_about_as_long_as_the_references(tiny_model):
    from tunesmith.tasks.predict import reference_budget

    tok = load_tokenizer(tiny_model)
    short, long = reference_budget(tok, ["Ada"]), reference_budget(tok, [" ".join(["word"] * 200)])
    assert 8 <= short < 16 and long > 200 and reference_budget(tok, [" ".join(["w"] * 5000)]) == 512
    assert reference_budget(tok, []) == 8


def test_label_answers_are_each_labels_encoding_and_follow_the_tokenizer_and_format(tiny_model):
    from tunesmith.tasks.prompts import encode_answer, label_answers

    tok = load_tokenizer(tiny_model)
    fmt = build_format(TaskConfig(instruction="Classify."), ["positive", "neg", "<|im_end|>"], tok)
    assert label_answers(tok, fmt) == [encode_answer(tok, fmt, lab) for lab in fmt.labels]
    label_answers(tok, fmt)[0].append(-1)  # a caller changing its copy changes nothing remembered
    assert label_answers(tok, fmt)[0] == encode_answer(tok, fmt, "positive")
    other = dataclasses.replace(fmt, labels=["yes", "no"], instruction="Answer.")
    assert label_answers(tok, other) == [encode_answer(tok, other, lab) for lab in ["yes", "no"]]
    # a token added after the first call (a pad token, say) may change the encoding: it is not reused
    before = label_answers(tok, fmt)
    tok.add_tokens(["positive"])
    assert label_answers(tok, fmt) == [encode_answer(tok, fmt, lab) for lab in fmt.labels] != before
    for i in range(10):  # the memo keeps a few formats per tokenizer, not every one ever seen
        label_answers(tok, dataclasses.replace(fmt, instruction=f"Classify {i}."))
    from tunesmith.tasks.prompts import _FORMATS_PER_TOKENIZER, _LABEL_ANSWERS
    assert len(_LABEL_ANSWERS[tok]) == _FORMATS_PER_TOKENIZER
    tok.chat_template = {"default": tok.chat_template, "tool_use": tok.chat_template}  # named templates
    assert label_answers(tok, fmt) == [encode_answer(tok, fmt, lab) for lab in fmt.labels]


def test_a_huge_input_or_answer_is_cut_before_tokenizing_to_the_same_ids(tiny_model, monkeypatch):
    """Only the middle the head-and-tail cut drops (and an answer's part past what training keeps) is
    left untokenized: prompts, training rows and the validation answer budget equal those computed from
    the whole text. A 10 MB prompt was tokenized whole at every validation (seconds each)."""
    import random

    from tunesmith.models.tokens import longest_token_chars
    from tunesmith.tasks import predict, prompts
    from tunesmith.train.batching import encode_for_training

    tok = load_tokenizer(tiny_model)
    rng = random.Random(3)
    words = ["red", "blue", "green", "money", "card", "été", "中文", "  ", "\n", "x" * 40, "<|im_end|>"]
    huge = " ".join(rng.choice(words) for _ in range(30_000))  # far past 2 x 2 x budget x longest characters
    fmt = build_format(TaskConfig(type="generation", instruction="Answer.", max_length=96), None, tok)
    rows = [Example(huge, "short answer", "t:1"), Example("a question", huge, "t:2"),
            Example("ab" * 20_000, "a long unbroken run: no whitespace to cut at", "t:4"),
            Example(huge, "ok", "t:3", messages=[{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": huge}])]
    assert len(huge) > 4 * 2 * 96 * longest_token_chars(tok)
    cut = ([encode_prompt(tok, fmt, ex, 60) for ex in rows], encode_for_training(tok, fmt, rows),
           predict.reference_budget(tok, [huge, "ok"], ceiling=40))
    # the cuts engage where they can (whitespace near them), and leave an unbroken run whole
    assert [prompts._precut(tok, ex, 60)[1] for ex in rows] == [True, False, False, True]
    assert len(prompts.answer_head(tok, huge, 96)) < len(huge) // 10
    calls = []
    monkeypatch.setattr(prompts, "_precut", lambda t, ex, budget: calls.append(1) or (ex, False))
    monkeypatch.setattr(prompts, "answer_head", lambda t, answer, tokens: answer)
    monkeypatch.setattr(predict, "answer_head", lambda t, answer, tokens: answer)
    whole = ([encode_prompt(tok, fmt, ex, 60) for ex in rows], encode_for_training(tok, fmt, rows),
             predict.reference_budget(tok, [huge, "ok"], ceiling=40))
    assert calls and cut == whole
    assert [truncated for _, truncated in cut[0]] == [True, False, True, True] and all(e.truncated for e in cut[1])
    assert cut[2] == 40
    assert longest_token_chars(object()) is None  # llama.cpp's vocabulary (export's read-back): nothing cut
