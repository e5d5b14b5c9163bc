"""Task metrics, each computed by one function; the names, task types and directions are in
tunesmith.registry.METRIC_SPECS, and `register` adds a user's metric to both.

Kept free of torch: the bootstrap, the leaderboard and the report import it.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

from tunesmith.registry import METRIC_SPECS, MetricSpec, metric_names

Golds = Sequence[str]
Preds = Sequence[str]
MetricFn = Callable[[Golds, Preds], float]


@dataclass(frozen=True)
class Metric:
    """A registered metric: its spec and the function computing it."""

    spec: MetricSpec
    fn: MetricFn

    @property
    def higher_is_better(self) -> bool:
        return self.spec.higher_is_better

    @property
    def cost(self) -> int:
        return self.spec.cost


METRICS: dict[str, Metric] = {}


def register(name: str, tasks: tuple[str, ...], higher_is_better: bool = True, cost: int = 1,
             unit_interval: bool = True):
    """Add a metric function `fn(golds, preds) -> float` to the registry under `name`
    (`unit_interval`: its values lie in [0, 1]; the report's bar chart shows only such metrics).

    A user extends tunesmith by importing this and decorating a function before loading a config; the
    new metric is then computed, compared (bootstrap) and can be named as the objective's metric.
    """
    def deco(fn: MetricFn) -> MetricFn:
        METRIC_SPECS[name] = MetricSpec(name, tasks, higher_is_better, cost, unit_interval)
        METRICS[name] = Metric(METRIC_SPECS[name], fn)
        return fn
    return deco


def _builtin(name: str):
    """Attach the function of a metric listed in tunesmith.registry."""
    def deco(fn: MetricFn) -> MetricFn:
        METRICS[name] = Metric(METRIC_SPECS[name], fn)
        return fn
    return deco


def compute_metrics(task_type: str, golds: Golds, preds: Preds) -> dict[str, float]:
    """Every registered metric for the task type, rounded for stable files."""
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} golds but {len(preds)} predictions")
    return {name: round(float(METRICS[name].fn(golds, preds)), 6) for name in metric_names(task_type)}


def better(record: dict, best: dict | None, metric: str, tiebreak: str) -> bool:
    """Whether `record` beats `best`: the better `metric` (its direction decides) wins; on a tie, the
    lower `tiebreak` (e.g. validation loss, prompt length). Anything beats no record."""
    if best is None:
        return True
    mine, theirs = record[metric], best[metric]
    if _nan(mine) or _nan(theirs):  # a NaN figure never wins ((NaN > x) is False: "better" for a loss)
        return _nan(theirs) and not _nan(mine)
    if mine != theirs:
        return (mine > theirs) == METRIC_SPECS[metric].higher_is_better
    return record[tiebreak] < best[tiebreak]


def _nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


@_builtin("accuracy")
def accuracy(golds: Golds, preds: Preds) -> float:
    return sum(g == p for g, p in zip(golds, preds)) / max(len(golds), 1)


def per_class(golds: Golds, preds: Preds, labels: Sequence[str] | None = None) -> dict[str, dict]:
    """Precision, recall, F1 and support for each label (labels absent from both score 0)."""
    labels = list(labels) if labels is not None else sorted(set(golds) | set(preds))
    tp = Counter(g for g, p in zip(golds, preds) if g == p)
    gold_n, pred_n = Counter(golds), Counter(preds)
    out = {}
    for lab in labels:
        p = tp[lab] / pred_n[lab] if pred_n[lab] else 0.0
        r = tp[lab] / gold_n[lab] if gold_n[lab] else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        out[lab] = {"precision": round(p, 6), "recall": round(r, 6), "f1": round(f, 6), "support": gold_n[lab]}
    return out


def _macro(golds: Golds, preds: Preds, key: str) -> float:
    # Macro averages run over the labels present in the gold set, as scikit-learn does with labels=gold.
    table = per_class(golds, preds, sorted(set(golds)))
    return sum(row[key] for row in table.values()) / max(len(table), 1)


@_builtin("f1_macro")
def f1_macro(golds: Golds, preds: Preds) -> float:
    return _macro(golds, preds, "f1")


@_builtin("precision_macro")
def precision_macro(golds: Golds, preds: Preds) -> float:
    return _macro(golds, preds, "precision")


@_builtin("recall_macro")
def recall_macro(golds: Golds, preds: Preds) -> float:
    return _macro(golds, preds, "recall")


@_builtin("f1_micro")
def f1_micro(golds: Golds, preds: Preds) -> float:
    # Micro averaging pools every decision; for single-label predictions inside the label set it
    # equals accuracy, and differs when predictions fall outside the gold labels.
    labels = set(golds)
    tp = sum(g == p for g, p in zip(golds, preds))
    predicted = sum(p in labels for p in preds)
    precision, recall = tp / max(predicted, 1), tp / max(len(golds), 1)
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def expected_calibration_error(correct: Sequence[bool], confidences: Sequence[float], bins: int = 10) -> dict:
    """ECE: the gap between confidence and accuracy, averaged over equal-width confidence bins
    weighted by their size; also the per-bin figures a reliability diagram plots."""
    rows = []
    # A NaN confidence (a model that gave NaN scores) is in no bin: it counts in no bin's weight either.
    # Rounding may put a probability a hair outside [0, 1]: it belongs to the end bin.
    kept = [(bool(ok), min(max(float(c), 0.0), 1.0)) for ok, c in zip(correct, confidences) if math.isfinite(c)]
    correct, confidences = [ok for ok, _ in kept], [c for _, c in kept]
    total, ece = len(kept), 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(confidences) if (lo < c <= hi) or (b == 0 and c == 0)]
        if not idx:
            continue
        acc = sum(correct[i] for i in idx) / len(idx)
        conf = sum(confidences[i] for i in idx) / len(idx)
        ece += len(idx) / total * abs(acc - conf)
        rows.append({"low": lo, "high": hi, "count": len(idx), "accuracy": round(acc, 6),
                     "confidence": round(conf, 6)})
    return {"ece": round(ece, 6), "bins": rows}


def confusion_matrix(golds: Golds, preds: Preds, labels: Sequence[str]) -> list[list[int]]:
    """Rows are gold labels, columns predicted labels, in the order of `labels`."""
    index = {lab: i for i, lab in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for g, p in zip(golds, preds):
        if g in index and p in index:
            matrix[index[g]][index[p]] += 1
    return matrix


_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation (its evaluate script): lower case, punctuation removed, then the
    articles a/an/the, then runs of whitespace collapsed."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _answers(gold: str | Sequence[str]) -> Sequence[str]:
    """The gold answers of one row: SQuAD rows may have several, and a prediction scores its best match."""
    return [gold] if isinstance(gold, str) else gold


def exact_match_pair(gold: str | Sequence[str], pred: str) -> float:
    """1.0 when the normalised prediction equals a normalised gold answer."""
    return max(float(normalize_answer(g) == normalize_answer(pred)) for g in _answers(gold))


def token_f1_pair(gold: str | Sequence[str], pred: str) -> float:
    """SQuAD v1.1 token F1: the F1 of the bags of normalised tokens, best over the gold answers."""
    return max(_bag_f1(normalize_answer(g).split(), normalize_answer(pred).split()) for g in _answers(gold))


def _bag_f1(gold: list[str], pred: list[str]) -> float:
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


@_builtin("exact_match")
def exact_match(golds: Golds, preds: Preds) -> float:
    return sum(exact_match_pair(g, p) for g, p in zip(golds, preds)) / max(len(golds), 1)


@_builtin("token_f1")
def token_f1(golds: Golds, preds: Preds) -> float:
    return sum(token_f1_pair(g, p) for g, p in zip(golds, preds)) / max(len(golds), 1)


class _RememberedStems:
    """rouge-score's stemmer (nltk's Porter, as its DefaultTokenizer makes it) with each word's stem
    remembered: a long answer repeats its words, and stemming each occurrence again was most of the time."""

    def __init__(self) -> None:
        from nltk.stem import porter

        self.stem = lru_cache(maxsize=1 << 16)(porter.PorterStemmer().stem)


@lru_cache(maxsize=1)
def _stems() -> _RememberedStems:
    return _RememberedStems()


def _rouge_tokens(text: str) -> list[str]:
    """rouge-score's own tokenizer with stemming: lower case, ASCII letters and digits only, Porter stems."""
    from rouge_score import tokenize

    return tokenize.tokenize(text, _stems())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists: the bit-parallel algorithm
    (Hyyro, 2004) over `b`, linear in len(a) for a `b` of a few hundred tokens and in no memory beyond
    one mask per distinct token of `b` (the usual table holds len(a) x len(b) numbers: 460 MB for a
    gold answer of 800,000 words against a 64-word prediction)."""
    masks: dict[str, int] = {}
    for i, token in enumerate(b):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(b)) - 1
    v = full  # a 0 bit for each position of b matched so far
    for token in a:
        if (m := masks.get(token)) is not None:
            u = v & m
            v = ((v + u) | (v - u)) & full
    return len(b) - bin(v).count("1")


def rouge_l_pair(gold: str | Sequence[str], pred: str) -> float:
    """ROUGE-L F1 of one pair, best over the gold answers: the figure Google's rouge-score package gives
    (its tokenizer, stemmed; text in other scripts than ASCII letters and digits scores 0), with the
    LCS computed by `lcs_length` instead of its table."""
    ours = _rouge_tokens(pred)
    return max(_lcs_f1(_rouge_tokens(g), ours) for g in _answers(gold))


def _lcs_f1(target: list[str], prediction: list[str]) -> float:
    if not target or not prediction:
        return 0.0
    lcs = lcs_length(target, prediction)
    precision, recall = lcs / len(prediction), lcs / len(target)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


@_builtin("rouge_l")
def rouge_l(golds: Golds, preds: Preds) -> float:
    return sum(rouge_l_pair(g, p) for g, p in zip(golds, preds)) / max(len(golds), 1)


@_builtin("bleu")
def bleu(golds: Golds, preds: Preds) -> float:
    """Corpus BLEU (sacrebleu, default 13a tokenisation) on a 0-1 scale."""
    import sacrebleu

    return sacrebleu.corpus_bleu(list(preds), [list(golds)]).score / 100


@_builtin("chrf")
def chrf(golds: Golds, preds: Preds) -> float:
    """Corpus chrF (sacrebleu) on a 0-1 scale."""
    import sacrebleu

    return sacrebleu.corpus_chrf(list(preds), [list(golds)]).score / 100


# task.type text: a "gold" is a document's count of predicted tokens and a "prediction" the model's summed
# negative log-likelihood of them (nats, evaluate/text.py), so the paired bootstrap resamples documents.
@_builtin("token_loss")
def token_loss(golds: Sequence[int], preds: Sequence[float]) -> float:
    """Mean negative log-likelihood per token over all documents (token-weighted)."""
    return sum(preds) / max(sum(golds), 1)


@_builtin("perplexity")
def perplexity(golds: Sequence[int], preds: Sequence[float]) -> float:
    """exp(token_loss): the standard corpus perplexity."""
    return math.exp(token_loss(golds, preds))


# Preference pairs (train.method dpo|orpo|simpo|kto): a "prediction" is a pair's margin, log p(chosen) -
# log p(rejected) under the model in nats (train/preference_fit.pair_margins), so the bootstrap resamples pairs.
@_builtin("preference_accuracy")
def preference_accuracy(golds: Sequence[str], preds: Sequence[float]) -> float:
    """Share of pairs whose chosen answer the model finds likelier than the rejected one."""
    return sum(float(p) > 0 for p in preds) / max(len(preds), 1)


@_builtin("reward_margin")
def reward_margin(golds: Sequence[str], preds: Sequence[float]) -> float:
    """Mean margin, log p(chosen) - log p(rejected), in nats."""
    return sum(float(p) for p in preds) / max(len(preds), 1)


_missing = set(METRIC_SPECS) - set(METRICS)
if _missing:  # a spec without a function would fail only when first computed
    raise ImportError(f"metrics listed in tunesmith.registry without a function: {sorted(_missing)}")
