"""The training loop: setup -> fit (with validation and early stopping) -> restore best."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tunesmith import hardware
from tunesmith.config import TrainConfig
from tunesmith.data.examples import Example
from tunesmith.evaluate.metrics import METRICS, compute_metrics
from tunesmith.tasks.cache import common_prefix_len
from tunesmith.tasks.predict import predict
from tunesmith.tasks.prompts import PromptFormat
from tunesmith.train.batching import Encoded, collate, encode_for_training, length_grouped_batches
from tunesmith.train.loss import supervised_loss
from tunesmith.train.methods import get_method


@dataclass
class TrainResult:
    """The trained model (best checkpoint restored) and what happened on the way."""

    model: object
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    stopped_early: bool = False
    stats: dict = field(default_factory=dict)


def fit(model, tokenizer, fmt: PromptFormat, train: list[Example], val: list[Example], cfg: TrainConfig,
        metric: str, log_path: Path | None = None, progress: bool = True) -> TrainResult:
    """Train `model` with `cfg.method`, validating every `eval_every` steps on `metric`.

    Returns:
        TrainResult whose model holds the weights of the best validation evaluation.
    """
    torch.manual_seed(cfg.seed)
    dev = hardware.device()
    model = get_method(cfg.method).apply(model, cfg).to(dev)
    bf16 = hardware.use_bf16(cfg.precision, dev)
    encoded = encode_for_training(tokenizer, fmt, train)
    val_encoded = encode_for_training(tokenizer, fmt, val[: cfg.max_val_examples])
    steps_per_epoch = math.ceil(math.ceil(len(encoded) / cfg.batch_size) / cfg.grad_accum)
    total = cfg.max_steps or max(1, round(steps_per_epoch * cfg.epochs))
    eval_every = cfg.eval_every or max(1, steps_per_epoch // 4)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_linear(total, cfg.warmup_ratio))
    result = TrainResult(model)
    log = _Log(log_path)
    step, tokens, train_seconds, evals_without_gain, losses = 0, 0, 0.0, 0, []
    best_state = None
    bar = tqdm(total=total, desc=f"train ({cfg.method})", unit="step", disable=not progress, dynamic_ncols=True)
    # Prompts of a task share their system text: its keys/values are computed once per batch.
    prefix_len = common_prefix_len([e.ids[: e.n_prompt] for e in encoded + val_encoded])
    batches = _batch_stream(encoded, cfg, tokenizer.pad_token_id, prefix_len)
    model.train()
    while step < total:
        started = time.perf_counter()
        loss_value = 0.0
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(dev) for k, v in next(batches).items()}
            with hardware.autocast(bf16, dev):
                loss, _ = supervised_loss(model, batch)
            (loss / cfg.grad_accum).backward()
            loss_value += loss.item() / cfg.grad_accum
            tokens += hardware.count_tokens(batch)
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - started
        step += 1
        losses.append(loss_value)
        log.write({"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": round(loss_value, 6),
                   "lr": schedule.get_last_lr()[0]})
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
        if step % eval_every == 0 or step == total:
            record = _validate(model, tokenizer, fmt, val[: cfg.max_val_examples], val_encoded, cfg, metric, bf16,
                               prefix_len)
            record.update(step=step, epoch=round(step / steps_per_epoch, 4),
                          train_loss=round(sum(losses[-eval_every:]) / len(losses[-eval_every:]), 6))
            result.history.append(record)
            log.write(record)
            bar.set_postfix(loss=f"{record['train_loss']:.4f}", val_loss=f"{record['val_loss']:.4f}",
                            **{f"val_{metric}": f"{record[metric]:.3f}"})
            if _better(record, result.best, metric):
                result.best, evals_without_gain = record, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()
                              if k in _trainable_names(model)}
            else:
                evals_without_gain += 1
                if cfg.early_stopping and evals_without_gain >= cfg.patience:
                    result.stopped_early = True
                    break
            model.train()
    bar.close()
    log.close()
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    model.eval()
    n_trainable, n_total = hardware.parameter_counts(model)
    result.stats = {"train_seconds": round(train_seconds, 3), "train_tokens": tokens,
                    "tokens_per_second": hardware.throughput(tokens, train_seconds),
                    "peak_rss_mb": hardware.peak_rss_mb(), "steps": step, "total_steps": total,
                    "trainable_params": n_trainable, "total_params": n_total,
                    "precision": "bf16" if bf16 else "fp32", "device": dev.type,
                    "best_step": result.best["step"] if result.best else None, "stopped_early": result.stopped_early}
    return result


def _batch_stream(encoded: list[Encoded], cfg: TrainConfig, pad_id: int, prefix_len: int):
    """Batches forever, one reshuffle per epoch (seeded by epoch, so a run is repeatable)."""
    epoch = 0
    while True:
        for idx in length_grouped_batches([len(e.ids) for e in encoded], cfg.batch_size, cfg.seed + epoch):
            yield collate([encoded[i] for i in idx], pad_id, prefix_len)
        epoch += 1


@torch.no_grad()
def _validate(model, tokenizer, fmt, val, val_encoded, cfg, metric, bf16, prefix_len) -> dict:
    model.eval()
    dev = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(val_encoded), cfg.batch_size):
        batch = {k: v.to(dev) for k, v in collate(val_encoded[start:start + cfg.batch_size], tokenizer.pad_token_id,
                                                     prefix_len).items()}
        with hardware.autocast(bf16, dev):
            loss, n = supervised_loss(model, batch)
        total_loss += loss.item() * n
        total_tokens += n
    preds = predict(model, tokenizer, fmt, val, batch_size=cfg.batch_size, autocast=bf16)
    scores = compute_metrics(fmt.task_type, [e.target for e in val], preds.texts)
    return {"val_loss": round(total_loss / max(total_tokens, 1), 6), metric: scores[metric]}


def _better(record: dict, best: dict | None, metric: str) -> bool:
    """Better objective metric wins; on a tie, lower validation loss."""
    if best is None:
        return True
    if record[metric] != best[metric]:
        return (record[metric] > best[metric]) == METRICS[metric].higher_is_better
    return record["val_loss"] < best["val_loss"]


def _trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _warmup_linear(total: int, warmup_ratio: float):
    warmup = max(1, int(total * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


class _Log:
    """The run's own metrics log (JSONL), one record per step or evaluation."""

    def __init__(self, path: Path | None):
        self.f = open(path, "a", encoding="utf-8") if path else None

    def write(self, record: dict) -> None:
        if self.f:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()
