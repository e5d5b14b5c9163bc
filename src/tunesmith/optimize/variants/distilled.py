"""distilled: a layer-dropped copy of the fine-tuned model (`optimize.distill.layers` share of the
layers kept, evenly spaced) trained to match the teacher's answer-token distributions (KL at a
temperature) and the gold answers (cross-entropy)."""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.optimize.engines import save_hf
from tunesmith.optimize.layers import decoder_layers, evenly_spaced, keep_layers
from tunesmith.optimize.recover import short_finetune
from tunesmith.train.loss import distillation_loss, supervised_logits


def build(source, cfg, out_dir: Path) -> dict:
    settings = cfg.distill
    teacher = source.plain()
    n = len(decoder_layers(teacher))
    keep = evenly_spaced(n, max(1, min(n - 1, round(n * settings.layers))))
    student = keep_layers(source.plain_copy(), keep)

    def loss(model, batch):
        with torch.no_grad():
            teacher_logits, _ = supervised_logits(teacher, batch)  # (N, V)
        student_logits, targets = supervised_logits(model, batch)  # (N, V), (N,)
        return distillation_loss(student_logits, teacher_logits, targets, settings.temperature, settings.alpha)

    losses = short_finetune(student, source.tokenizer, source.fmt, source.splits.train, settings.steps,
                            settings.learning_rate, seed=source.project.train.seed, loss_fn=loss,
                            progress=source.bar("distil"))
    save_hf(student, source.tokenizer, source.fmt, out_dir)
    return {"student_layers": keep, "teacher_layers": n, "steps": len(losses),
            "final_loss": round(losses[-1], 4) if losses else None}
