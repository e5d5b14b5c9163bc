"""Watching training: best checkpoint, early stopping, and the overfitting detector.

Two signals of overfitting are checked after every validation:
- widening gap: validation loss minus training loss was positive and grew at each of the last
  N evaluations, and validation loss ended the window above where it started and above its
  best, i.e. the model fits the training set better and the held-out set worse;
- falling metric: the validation metric got worse at each of the last N evaluations.
Either one flags the run (log, report, summary.json); with `overfit.stop` it also stops it,
and the best checkpoint is restored as with patience-based early stopping.
"""

from __future__ import annotations

import torch

from tunesmith.config import TrainConfig
from tunesmith.registry import METRIC_SPECS
from tunesmith.tasks.metrics import better


def overfitting_signals(history: list[dict], metric: str, n: int) -> list[dict]:
    """Signals raised by the latest evaluation of `history` (records with val_loss, train_loss, metric)."""
    if len(history) < n + 1:
        return []
    recent = history[-(n + 1):]
    signals = []
    gaps = [r["val_loss"] - r["train_loss"] for r in recent]
    best_val = min(r["val_loss"] for r in history)
    # Early in training the gap is negative (the windowed train loss still holds the first, high
    # losses) and grows as training converges: only a positive, widening gap with validation
    # loss rising across the window is overfitting.
    widening = all(b > a for a, b in zip(gaps, gaps[1:])) and all(g > 0 for g in gaps)
    if widening and recent[-1]["val_loss"] > max(best_val, recent[0]["val_loss"]):
        signals.append({"signal": "widening_gap", "step": recent[-1]["step"],
                        "detail": f"validation-train loss gap grew {n} evaluations in a row "
                                  f"({gaps[0]:.4f} -> {gaps[-1]:.4f}); validation loss "
                                  f"{recent[-1]['val_loss']:.4f} vs best {best_val:.4f}"})
    higher = METRIC_SPECS[metric].higher_is_better
    values = [r[metric] for r in recent]
    if all((b < a) if higher else (b > a) for a, b in zip(values, values[1:])):
        signals.append({"signal": "metric_falling", "step": recent[-1]["step"],
                        "detail": f"validation {metric} got worse {n} evaluations in a row "
                                  f"({values[0]:.4f} -> {values[-1]:.4f})"})
    return signals


class Watch:
    """Keeps the best evaluation and its trainable weights, and decides when to stop."""

    def __init__(self, cfg: TrainConfig, metric: str):
        self.cfg, self.metric = cfg, metric
        self.history: list[dict] = []
        self.best: dict | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.evals_without_gain = 0
        self.flags: list[dict] = []
        self.stop_reason: str | None = None

    def observe(self, record: dict, model) -> list[dict]:
        """Take one validation record; returns the overfitting signals it raised (new kinds only)."""
        self.history.append(record)
        if better(record, self.best, self.metric, tiebreak="val_loss"):
            self.best, self.evals_without_gain = record, 0
            self.best_state = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
        else:
            self.evals_without_gain += 1
            if self.cfg.early_stopping and self.evals_without_gain >= self.cfg.patience:
                self.stop_reason = f"no better validation {self.metric} for {self.cfg.patience} evaluations"
        known = {f["signal"] for f in self.flags}
        raised = [s for s in overfitting_signals(self.history, self.metric, self.cfg.overfit.evals)
                  if s["signal"] not in known]
        self.flags += raised
        if raised and self.cfg.overfit.stop and self.cfg.early_stopping:
            self.stop_reason = f"overfitting: {raised[0]['detail']}"
        return raised

    def restore_best(self, model) -> None:
        if self.best_state is not None:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in self.best_state.items():
                    params[name].copy_(value)

    def state(self) -> dict:
        """JSON-able state for a checkpoint (best_state travels separately as tensors)."""
        return {"history": self.history, "best": self.best, "evals_without_gain": self.evals_without_gain,
                "flags": self.flags}

    def load_state(self, state: dict, best_state: dict[str, torch.Tensor] | None) -> None:
        self.history, self.best = state["history"], state["best"]
        self.evals_without_gain, self.flags = state["evals_without_gain"], state["flags"]
        self.best_state = best_state
