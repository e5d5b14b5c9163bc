"""Task metrics, each computed by one function; the names, task types and directions are in
tunesmith.registry.METRIC_SPECS, and `register` adds a user's metric to both.

Kept free of torch: the bootstrap, the leaderboard and the report import it.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
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


def register(name: str, tasks: tuple[str, ...], higher_is_better: bool = True, cost: int = 1):
    """Add a metric function `fn(golds, preds) -> float` to the registry under `name`.

    A user extends tunesmith by importing this and decorating a function before loading a config; the
    new metric is then computed, compared (bootstrap) and can be named as the objective's metric.
    """
    def deco(fn: MetricFn) -> MetricFn:
        METRIC_SPECS[name] = MetricSpec(name, tasks, higher_is_better, cost)
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
    if record[metric] != best[metric]:
        return (record[metric] > best[metric]) == METRIC_SPECS[metric].higher_is_better
    return record[tiebreak] < best[tiebreak]


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
    total, ece = len(correct), 0.0
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


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


@_builtin("exact_match")
def exact_match(golds: Golds, preds: Preds) -> float:
    return sum(normalize_answer(g) == normalize_answer(p) for g, p in zip(golds, preds)) / max(len(golds), 1)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_pair(gold: str, pred: str) -> float:
    """ROUGE-L F1 of one pair on lower-cased whitespace tokens."""
    g, p = gold.lower().split(), pred.lower().split()
    if not g or not p:
        return float(g == p)
    lcs = _lcs(g, p)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(g)
    return 2 * precision * recall / (precision + recall)


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


_missing = set(METRIC_SPECS) - set(METRICS)
if _missing:  # a spec without a function would fail only when first computed
    raise ImportError(f"metrics listed in tunesmith.registry without a function: {sorted(_missing)}")
