"""Suspected label errors: out-of-fold probabilities from a fast embedding classifier, ranked by
confident learning (cleanlab).

Each row's label probabilities come from a logistic regression on all-MiniLM-L6-v2 embeddings
trained on the other folds, so a row never grades itself. cleanlab's `find_label_issues` then
flags rows whose given label is unlikely relative to each class's typical confidence; rows are
ranked by self-confidence (the out-of-fold probability of the given label, lowest first).
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Suspect:
    index: int
    given: str
    suggested: str
    score: float        # 1 - out-of-fold probability of the given label (higher: more suspect)


def out_of_fold_probs(embeddings: np.ndarray, labels: list[str], folds: int = 5,
                      seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """(N, C) probabilities of each class for each row, from models that did not see the row."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    classes = sorted(set(labels))
    y = np.array([classes.index(label) for label in labels])
    probs = np.full((len(labels), len(classes)), 1.0 / len(classes))
    # Stratified folds; classes rarer than the fold count are spread as far as they go (a warning).
    splitter = StratifiedKFold(n_splits=max(2, min(folds, int(np.bincount(y).max()))), shuffle=True,
                               random_state=seed)
    fold_of = np.zeros(len(y), dtype=int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, test) in enumerate(splitter.split(embeddings, y)):
            fold_of[test] = k
    for k in np.unique(fold_of):
        train, test = fold_of != k, fold_of == k
        seen = np.unique(y[train])
        if len(seen) < 2:  # a fold whose other rows hold one class (one big class, one row of another)
            probs[test] = 0.0
            probs[np.ix_(test, seen)] = 1.0  # ... can only say that class: no model to fit
            continue
        model = LogisticRegression(max_iter=1000, C=10.0)
        model.fit(embeddings[train], y[train])
        probs[np.ix_(test, model.classes_)] = model.predict_proba(embeddings[test])
        missing = np.setdiff1d(np.arange(len(classes)), model.classes_)
        probs[np.ix_(test, missing)] = 0.0
    return probs, classes


def find_suspects(embeddings: np.ndarray, labels: list[str], folds: int = 5, seed: int = 0) -> list[Suspect]:
    """Suspected mislabeled rows, most suspect first."""
    from cleanlab.filter import find_label_issues

    counts = Counter(labels)
    if len(counts) < 2 or max(counts.values()) < 2:  # a label seen once has no other row to be judged against
        return []
    probs, classes = out_of_fold_probs(embeddings, labels, folds, seed)
    y = np.array([classes.index(label) for label in labels])
    # n_jobs=1: cleanlab's worker pool shares its inputs through fork-inherited globals, which a spawned
    # data process (prepare_data_apart) does not have; the per-class work is small next to the folds.
    ranked = find_label_issues(y, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    return [Suspect(int(i), labels[i], classes[int(probs[i].argmax())], round(float(1 - probs[i, y[i]]), 4))
            for i in ranked]
