"""Post-processing mitigation: Fairlearn's ThresholdOptimizer picks group-specific thresholds on
the model's probability of the positive label (fitted on validation, applied to test)."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin


class ScoreAsProbability(ClassifierMixin, BaseEstimator):
    """A prefit 'classifier' whose input is already P(positive); lets ThresholdOptimizer work on scores."""

    def fit(self, X, y):
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, X):
        p = np.asarray(X, dtype=float).reshape(-1)
        return np.stack([1 - p, p], axis=1)

    def predict(self, X):
        return (np.asarray(X, dtype=float).reshape(-1) >= 0.5).astype(int)


def optimize_thresholds(val_scores: list[float], val_positive: list[bool], val_groups: list[str],
                        test_scores: list[float], test_groups: list[str], constraint: str, seed: int = 0) -> list[bool]:
    """Positive decisions on test under `constraint` (demographic_parity or equalized_odds)."""
    from fairlearn.postprocessing import ThresholdOptimizer

    base = ScoreAsProbability().fit(np.zeros((2, 1)), [0, 1])
    opt = ThresholdOptimizer(estimator=base, constraints=constraint, predict_method="predict_proba", prefit=True,
                             objective=("accuracy_score" if constraint == "demographic_parity"
                                        else "balanced_accuracy_score"))
    opt.fit(np.asarray(val_scores).reshape(-1, 1), np.asarray(val_positive, dtype=int),
            sensitive_features=np.asarray(val_groups))
    decided = opt.predict(np.asarray(test_scores).reshape(-1, 1), sensitive_features=np.asarray(test_groups),
                          random_state=seed)
    return [bool(d) for d in decided]
