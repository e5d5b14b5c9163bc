"""Exact match and token F1 against the official SQuAD v1.1 evaluation functions, and ROUGE-L against
Google's rouge-score package."""

from __future__ import annotations

import random
import re
import string
from collections import Counter

import pytest

from tunesmith.registry import metric_names
from tunesmith.tasks.metrics import exact_match, exact_match_pair, rouge_l, rouge_l_pair, token_f1, token_f1_pair


# --- Reference: the official SQuAD v1.1 evaluation script, `evaluate-v1.1.py` -------------------------
# (https://rajpurkar.github.io/SQuAD-explorer/, "Evaluation Script v1.1"; Rajpurkar et al. 2016),
# its functions copied as they are there, only reformatted. Kept here so the check does not depend on ours.
def ref_normalize_answer(s):
    """Lower text and remove punctuation, articles and extra whitespace."""
    def remove_articles(text):
        return re.sub(r'\b(a|an|the)\b', ' ', text)

    def white_space_fix(text):
        return ' '.join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return ''.join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def ref_f1_score(prediction, ground_truth):
    prediction_tokens = ref_normalize_answer(prediction).split()
    ground_truth_tokens = ref_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def ref_exact_match_score(prediction, ground_truth):
    return (ref_normalize_answer(prediction) == ref_normalize_answer(ground_truth))


def ref_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    scores_for_ground_truths = []
    for ground_truth in ground_truths:
        score = metric_fn(prediction, ground_truth)
        scores_for_ground_truths.append(score)
    return max(scores_for_ground_truths)
# --- end of reference ---------------------------------------------------------------------------------


HOSTILE = ["", " ", "the", "The a an", "A.", "an apple", "the the the", "Theatre", "anthem", "a-b", "a_b",
           "¿Qué?", "naïve café", "İstanbul", "ﬁne", "3.14", "3,14", "1 000", "\t\nnew\r\nlines\u00a0nbsp\u2003em",
           "“quoted”", "'single'", "(the) [a] {an}", "don't", "U.S.A.", "e.g. a b c", "Ünïcödé", "日本語の答え",
           "Привет, мир", "emoji 😀 the end", "x" * 300, "a" * 5, "A A A A", "1,000,000 people", "Denver Broncos",
           "the Denver Broncos.", "Broncos Denver", "denver broncos denver", "---", "!!!", "an\u200bthe"]


def _pairs() -> list[tuple[str, str]]:
    rng = random.Random(0)
    words = ["the", "a", "an", "Cat", "cat.", "dog,", "Dög", "1", "1.0", "(x)", "—", "it's", "\t", "Über"]
    made = ["".join(rng.choice(words) + rng.choice(["", " ", "  ", "\n"]) for _ in range(rng.randint(0, 6)))
            for _ in range(300)]
    strings = HOSTILE + made
    return [(g, p) for g in strings[:60] for p in strings[:60]] + list(zip(made, reversed(made)))


def test_exact_match_and_f1_equal_the_squad_script_on_hostile_strings():
    for gold, pred in _pairs():
        assert exact_match_pair(gold, pred) == float(ref_exact_match_score(pred, gold)), (gold, pred)
        assert token_f1_pair(gold, pred) == pytest.approx(ref_f1_score(pred, gold), abs=1e-12), (gold, pred)


def test_several_gold_answers_score_the_best_match():
    rng = random.Random(1)
    for _ in range(200):
        golds = rng.sample(HOSTILE, rng.randint(1, 3))
        pred = rng.choice(HOSTILE)
        assert exact_match_pair(golds, pred) == float(
            ref_metric_max_over_ground_truths(ref_exact_match_score, pred, golds))
        assert token_f1_pair(golds, pred) == pytest.approx(
            ref_metric_max_over_ground_truths(ref_f1_score, pred, golds), abs=1e-12)


def test_corpus_figures_are_the_scripts_averages():
    pairs = _pairs()[:500]
    golds, preds = [g for g, _ in pairs], [p for _, p in pairs]
    # The script reports 100 x the mean; tunesmith reports the mean.
    assert exact_match(golds, preds) == pytest.approx(sum(ref_exact_match_score(p, g) for g, p in pairs) / len(pairs))
    assert token_f1(golds, preds) == pytest.approx(sum(ref_f1_score(p, g) for g, p in pairs) / len(pairs))
    assert token_f1(["Denver Broncos"], ["the Broncos"]) == pytest.approx(2 / 3)   # p=1, r=1/2


def test_token_f1_is_registered_for_generation_only():
    assert "token_f1" in metric_names("generation") and "token_f1" in metric_names("chat")
    assert "token_f1" not in metric_names("classification")


def test_rouge_l_is_the_rouge_score_package_with_stemming():
    from rouge_score import rouge_scorer

    stemmed = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = [("the cat sat on the mat", "the cat on the mat"), ("He runs daily.", "he is running daily"),
             ("Denver Broncos", "The Broncos of Denver"), ("a b", "c d"), ("", "x")]
    for gold, pred in pairs:
        assert rouge_l_pair(gold, pred) == pytest.approx(stemmed.score(gold, pred)["rougeL"].fmeasure)
    assert rouge_l([g for g, _ in pairs], [p for _, p in pairs]) == pytest.approx(
        sum(stemmed.score(g, p)["rougeL"].fmeasure for g, p in pairs) / len(pairs))


def test_rouge_l_equals_the_rouge_score_package_on_random_texts():
    """rouge_l_pair computes the LCS bit-parallel (linear in a long gold answer, no table): on texts from a
    small vocabulary, full of repeats and stems, its figure is rouge-score's own, pair by pair."""
    import random

    from rouge_score import rouge_scorer

    from tunesmith.tasks.metrics import lcs_length

    stemmed = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rng = random.Random(0)
    words = ["the", "cat", "cats", "running", "runs", "a", "b", "mat", "Mat,", "x1", "été", "—"]
    for _ in range(400):
        gold = " ".join(rng.choices(words, k=rng.randint(0, 40)))
        pred = " ".join(rng.choices(words, k=rng.randint(0, 70)))  # past 64 tokens: masks of several words
        assert rouge_l_pair(gold, pred) == pytest.approx(stemmed.score(gold, pred)["rougeL"].fmeasure, abs=1e-12)
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4 and lcs_length([], ["a"]) == 0


def test_rouge_l_stems_words():
    from rouge_score import rouge_scorer

    plain = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    # "runs"/"running" share the stem "run": a full match only with stemming.
    assert rouge_l_pair("runs", "running") == 1.0
    assert plain.score("runs", "running")["rougeL"].fmeasure == 0.0
    assert rouge_l_pair("the dogs are running", "the dog runs") > plain.score(
        "the dogs are running", "the dog runs")["rougeL"].fmeasure
