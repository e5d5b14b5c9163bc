"""Decoding settings (eval.generation) and batched generation on a tiny random model: greedy by
default, seeded sampling repeats, stop strings cut, batches with left padding change no answer."""

from __future__ import annotations

import pytest
import torch

from tunesmith.config import GenerationSettings
from tunesmith.models.load import load_model, load_tokenizer
from tunesmith.tasks.generation import generate
from tunesmith.tasks.sampling import (
    StopScanner,
    cut_at_stop,
    generate_kwargs,
    logits_processors,
    next_token,
    step_generator,
)

PROMPTS = ["my card", "where is the bank money please", "red", "help me now can you blue today green",
           "why", "the a my card bank money please help"]


@pytest.fixture(scope="module")
def lm(tiny_model):
    tok = load_tokenizer(tiny_model)
    return load_model(tiny_model).eval(), tok, [tok.encode(p) for p in PROMPTS]


def test_batched_left_padded_generation_equals_one_at_a_time(lm):
    model, tok, prompts = lm
    one = generate(model, tok, prompts, 12, batch_size=1)
    assert len({len(p) for p in prompts}) > 3  # the batch really is padded
    assert generate(model, tok, prompts, 12, batch_size=len(prompts)) == one
    assert generate(model, tok, prompts, 12, batch_size=4) == one


def test_defaults_are_plain_greedy(lm):
    model, tok, prompts = lm
    assert generate_kwargs(None) == generate_kwargs(GenerationSettings()) == {"do_sample": False}
    seed_only = GenerationSettings(seed=123)  # greedy ignores the seed
    assert generate(model, tok, prompts, 8, sampling=seed_only) == generate(model, tok, prompts, 8)


def test_same_seed_same_answers_other_seed_differs(lm):
    model, tok, prompts = lm
    hot = GenerationSettings(temperature=1.0, seed=7)
    torch.manual_seed(0)
    first = generate(model, tok, prompts, 16, sampling=hot)
    torch.manual_seed(99)  # the global RNG state does not matter: the seed is scoped to the call
    assert generate(model, tok, prompts, 16, sampling=hot) == first
    other = generate(model, tok, prompts, 16, sampling=hot.model_copy(update={"seed": 8}))
    assert other != first
    assert first != generate(model, tok, prompts, 16)  # sampling at temperature 1 is not the greedy answer


def test_seeded_call_leaves_the_callers_rng_alone(lm):
    model, tok, prompts = lm
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    generate(model, tok, prompts[:2], 4, sampling=GenerationSettings(temperature=1.0, seed=1))
    assert torch.equal(torch.rand(3), expected)


def test_stop_strings_cut_the_answer(lm):
    model, tok, prompts = lm
    full = generate(model, tok, prompts[:1], 16)[0]
    assert len(full) > 4
    stop = full[2:4]
    cut = generate(model, tok, prompts[:1], 16, sampling=GenerationSettings(stop=[stop]))[0]
    assert cut == full[:full.find(stop)].strip() and stop not in cut


def test_streaming_step_matches_generate_when_sampling(lm):
    """next_token (the server's streaming loop) draws what generate draws under the same seed and settings."""
    model, tok, prompts = lm
    s = GenerationSettings(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=3)
    torch.manual_seed(3)
    ref = model.generate(torch.tensor([prompts[1]]), max_new_tokens=10, min_new_tokens=10, eos_token_id=None,
                         pad_token_id=tok.pad_token_id, **generate_kwargs(s))[0, len(prompts[1]):].tolist()
    torch.manual_seed(1234)  # the loop draws from its own generator, not the global RNG
    ids, procs, got, gen = torch.tensor([prompts[1]]), logits_processors(s), [], step_generator(s, model.device)
    with torch.inference_mode():
        for _ in range(10):
            got.append(next_token(model(input_ids=ids).logits[:, -1], ids, s, procs, gen))
            ids = torch.cat([ids, torch.tensor([[got[-1]]])], dim=1)
    assert got == ref


@pytest.mark.parametrize("bad", [{"temperature": -0.1}, {"temperature": 2.5}, {"top_p": 0}, {"top_k": -1},
                                 {"repetition_penalty": 0}, {"stop": ["a"] * 5}, {"stop": [""]},
                                 {"stop": ["x" * 65]}, {"seed": -1}])
def test_settings_are_bounded(bad):
    with pytest.raises(ValueError):
        GenerationSettings(**bad)


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("abc END xyz STOP", ["STOP", "END"]) == ("abc ", True)
    assert cut_at_stop("no stop here", ["<script>"]) == ("no stop here", False)
    assert cut_at_stop("a.*b", [".*"]) == ("a", True)  # literal text, never a pattern


@pytest.mark.parametrize("pieces", [["hel", "lo wo", "rld"], list("hello world"), ["hello world"]])
def test_stop_scanner_streams_exactly_the_cut_text(pieces):
    for stops, expected in ((["o w"], "hell"), (["zz", "rld"], "hello wo"), (["nope"], "hello world")):
        scanner, sent, stopped = StopScanner(stops), "", False
        for p in pieces:
            out, stopped = scanner.feed(p)
            sent += out
            if stopped:
                break
        sent += "" if stopped else scanner.rest()
        assert sent == expected and stopped == (expected != "hello world")


def test_generation_stops_at_the_models_context(lm):
    """eval.max_new_tokens past the context decoded on for as long as asked (a rotary model) or failed
    (a learned position table): each batch now stops where its longest prompt's context ends."""
    model, tok, prompts = lm
    context = model.config.max_position_embeddings
    calls = []
    real = model.generate

    def counted(**kwargs):
        calls.append(kwargs["max_new_tokens"])
        return real(**kwargs)
    model.generate = counted
    try:
        generate(model, tok, [prompts[1], [5] * context], 10_000, batch_size=1)
    finally:
        del model.generate
    longest = len(prompts[1])
    assert calls == [context - longest]  # the full-context prompt makes no call and answers ""


def test_context_length_reads_the_models_config_and_gpt2s_alias():
    """One place says how far a model can attend: a llama config's `max_position_embeddings`, GPT-2's
    `n_positions` (behind the same name), None for an object with no such figure."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from tunesmith.models.load import context_length

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=96))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=8, n_layer=1, n_head=2, n_positions=40))
    assert (context_length(llama), context_length(gpt2), context_length(object())) == (96, 40, None)
