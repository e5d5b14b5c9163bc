"""prompt_optimization: candidates, few-shot sets, and the choice of the best on validation."""

from __future__ import annotations

from collections import Counter

from conftest import make_texts
from tunesmith.config import TaskConfig, TrainConfig
from tunesmith.data.examples import Example
from tunesmith.models.load import load_model, load_tokenizer
from tunesmith.tasks.metrics import compute_metrics
from tunesmith.tasks.predict import predict
from tunesmith.tasks.prompts import build_format
from tunesmith.train.prompt_search import candidate_instructions, search, shot_sets


def _data(n, seed):
    return [Example(r["text"], r["label"], "t") for r in make_texts(n, seed)]


def test_shot_sets_are_stratified_and_repeatable():
    train = _data(30, 1)
    sets = shot_sets(train, ["alpha", "beta", "gamma"], k=2, draws=3, seed=0, max_chars=400)
    assert len(sets) == 3
    for s in sets:
        assert Counter(x["output"] for x in s) == {"alpha": 2, "beta": 2, "gamma": 2}
    assert sets == shot_sets(train, ["alpha", "beta", "gamma"], k=2, draws=3, seed=0, max_chars=400)
    assert shot_sets(train, None, k=4, draws=1, seed=0, max_chars=400)[0].__len__() == 4


def test_candidates_start_with_the_users_instruction_without_repeats(tiny_model):
    fmt = build_format(TaskConfig(instruction="Classify."), ["alpha"], load_tokenizer(tiny_model))
    names = candidate_instructions(fmt, ["Classify.", "Pick a label."])
    assert names[0] == "Classify." and names.count("Classify.") == 1 and "Pick a label." in names


def test_search_keeps_the_best_candidate_by_validation_metric(tiny_model):
    tok, model = load_tokenizer(tiny_model), load_model(tiny_model)
    fmt = build_format(TaskConfig(instruction="Classify."), ["alpha", "beta", "gamma"], tok)
    val = _data(9, 2)
    cfg = TrainConfig(method="prompt_optimization", prompt_optimization={"shots": [0, 1], "draws": 2})
    best_fmt, history, best = search(model, tok, fmt, _data(30, 1), val, cfg, "accuracy", progress=False)
    # 4 built-in/user instructions x label list on/off, then 2 one-shot sets
    assert len(history) == 2 * len(candidate_instructions(fmt, [])) + 2
    assert best["accuracy"] == max(h["accuracy"] for h in history)
    rescored = compute_metrics("classification", [e.target for e in val], predict(model, tok, best_fmt, val).texts)
    assert rescored["accuracy"] == best["accuracy"]
    assert len(best_fmt.shots) == best["shots"]
