"""distilled_minilm (classification): an all-MiniLM-L6-v2 classifier trained on the training split
against the fine-tuned model's label probabilities (KL at a temperature) and the gold labels."""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.optimize.minilm import new_classifier, save_classifier, train_classifier
from tunesmith.optimize.variants import NotApplicable
from tunesmith.tasks.predict import predict


def build(source, cfg, out_dir: Path) -> dict:
    labels = source.fmt.labels
    if not labels:
        raise NotApplicable("a sentence classifier student needs a classification task")
    settings = cfg.distill
    train = source.splits.train
    teacher = predict(source.model, source.tokenizer, source.fmt, train, progress=source.bar("teacher labels"))
    # The teacher's log-probabilities act as its logits over the label set. (N, L)
    teacher_logits = torch.tensor([[p[lab] for lab in labels] for p in teacher.probabilities]).clamp(min=1e-9).log()
    index = {lab: i for i, lab in enumerate(labels)}
    model, tokenizer = new_classifier(len(labels), source.project.train.seed)
    losses = train_classifier(model, tokenizer, [e.input for e in train], [index[e.target] for e in train],
                              teacher_logits, settings.minilm_epochs, settings.minilm_learning_rate,
                              settings.temperature, settings.alpha, seed=source.project.train.seed,
                              progress=source.bar("distil minilm"))
    save_classifier(model, tokenizer, labels, out_dir)
    agreement = sum(a == b for a, b in zip(teacher.texts, [e.target for e in train])) / max(len(train), 1)
    return {"student": "all-MiniLM-L6-v2 + linear head", "steps": len(losses),
            "final_loss": round(losses[-1], 4) if losses else None, "teacher_train_accuracy": round(agreement, 4)}
