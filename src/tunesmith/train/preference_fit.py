"""Preference training (train.method dpo | orpo | simpo | kto): pairs in, the tuned model out.

The loop is the shared `train_step` with a preference loss (train/preference.py); validation scores
held-out pairs. The reference model of DPO and KTO is the policy with its adapter switched off
(`disable_adapter()`, no second copy); under train.preference.adapter: full it is a frozen copy
made before training (the weights twice in memory). ORPO and SimPO need no reference.

The run-level training settings act as in the supervised loop (train/trainer.py): train.dropout,
train.neftune_alpha (noise on the policy's embeddings only: the reference forward runs in eval mode),
train.gradient_checkpointing (auto sized for a batch of 2 x batch_size sequences, chosen and rejected)
and train.trackers; under bf16 the frozen weights are bf16 while training, as in the supervised loop
(train/precision.py), and validation runs under the same autocast. Those it does not implement
(train.batch_tokens, train.label_smoothing, checkpoints) the config refuses for a preference method
(config/schema.py), rather than have them ignored.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import random
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tunesmith import hardware
from tunesmith.config import TrainConfig, derive
from tunesmith.data.examples import Example
from tunesmith.data.pairs import Pair, pair_example, pairs_from_examples
from tunesmith.errors import InputError
from tunesmith.registry import METHOD_SPECS, PREFERENCE_METRICS
from tunesmith.tasks.cache import common_prefix_len
from tunesmith.tasks.metrics import compute_metrics
from tunesmith.tasks.predict import predict
from tunesmith.tasks.prompts import PromptFormat, answer_only
from tunesmith.train import grad_checkpointing
from tunesmith.train import preference as P
from tunesmith.train.batching import collate, encode_for_training
from tunesmith.train.methods import get_method
from tunesmith.train.precision import compact_for_training, frozen_in_bf16
from tunesmith.train.preflight import length_checks, preflight
from tunesmith.train.regularize import neftune, set_dropout, shares_prefix
from tunesmith.train.trackers import Trackers
from tunesmith.train.trainer import (
    TrainLog,
    TrainResult,
    TrainStats,
    check_finite,
    make_plan,
    optimizer_and_schedule,
    train_step,
)
from tunesmith.train.watch import Watch


def fit(model, tokenizer, fmt: PromptFormat, train: list[Example], val: list[Example], cfg: TrainConfig,
        metric: str, out_dir: Path | None = None, progress: bool = True, resume: bool = False,
        on_validate=None) -> TrainResult:
    """`fit` for preference methods: the examples' raw rows are read as preference rows (data/pairs.py)."""
    if resume:
        raise InputError(f"train.method {cfg.method} does not resume from checkpoints", "train.method",
                         "start the run anew")
    kto = cfg.method == "kto"
    val = val[: cfg.max_val_examples]
    # KTO validates its loss on unpaired rows; held-out pairs (if any) still give the pair figures.
    val_pairs = pairs_from_examples([e for e in val if e.rejected is not None]) if kto else None
    notes = _preflight(tokenizer, fmt, train, cfg)
    result = fit_pairs(model, tokenizer, fmt, pairs_from_examples(train, kto), pairs_from_examples(val, kto), cfg,
                       metric, out_dir, progress, on_validate, val_pairs)
    return dataclasses.replace(result, preflight=notes)


def _preflight(tokenizer, fmt: PromptFormat, train: list[Example], cfg: TrainConfig) -> list[str]:
    """The supervised loop's pre-flight (train/preflight.py: printed, kept in train.json) on the answers the
    preference loss scores: each row's chosen answer (a KTO completion), then a pair's rejected one. Rows
    cut at task.max_length were trained on silently."""
    fmt = answer_only(fmt)
    notes = preflight(tokenizer, fmt, train, encode_for_training(tokenizer, fmt, train), cfg)
    rejected = [dataclasses.replace(e, target=e.rejected) for e in train if e.rejected is not None]
    if rejected:
        notes += length_checks(rejected, encode_for_training(tokenizer, fmt, rejected), fmt, "rejected answers")
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    return notes


def fit_pairs(model, tokenizer, fmt: PromptFormat, train: list[Pair], val: list[Pair], cfg: TrainConfig,
              metric: str, out_dir: Path | None = None, progress: bool = True, on_validate=None,
              val_pairs: list[Pair] | None = None) -> TrainResult:
    """Train `model` with the preference loss of `cfg.method`, validating on `val` every eval_every steps;
    the weights of the best validation `metric` are restored at the end. `val_pairs`: KTO's held-out pairs
    for the pair figures (other methods use `val`)."""
    if metric in PREFERENCE_METRICS and cfg.method == "kto" and not val_pairs:
        raise InputError(f"objective.metric {metric} needs held-out pairs; KTO's validation rows have none",
                         "objective.metric", "give validation {prompt, chosen, rejected} rows, or use val_loss")
    if cfg.method == "kto" and metric not in PREFERENCE_METRICS and metric != "val_loss" and \
            not any(p.label is not False for p in val):
        # a generation metric is scored on the desirable completions; without one it was an IndexError
        raise InputError(f"objective.metric {metric} is scored on the validation rows labelled desirable "
                         "(label: true); the validation split has none", "data.validation",
                         "give validation rows with label: true (a larger data.validation share), or judge "
                         "preference_accuracy on held-out {prompt, chosen, rejected} rows")
    torch.manual_seed(cfg.seed)
    hardware.reset_peaks()
    dev = hardware.device()
    bf16 = hardware.use_bf16(cfg.precision, dev)
    source = Path(getattr(model, "name_or_path", "") or ".")
    model = get_method(cfg.method).apply(model, cfg).to(dev)
    set_dropout(model, cfg.dropout)
    ref = reference(model, cfg)
    if ref is not None:  # a full fine-tuning reference copy: nothing of it trains, it is compacted whole
        compact_for_training(ref, cfg, bf16, source)
    recompute = _checkpointing(model, tokenizer, fmt, train, cfg)
    plan = make_plan(len(train), cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = optimizer_and_schedule(trainable, cfg, plan.total)
    watch, loop = Watch(cfg, metric), {"tokens": 0, "seconds": 0.0, "losses": [], "step": 0}
    batches = pair_batches(train, tokenizer, fmt, cfg, kto=cfg.method == "kto")
    loss_fn = functools.partial(preference_loss, cfg=cfg, ref=ref)
    # Frozen weights in bf16 while training (train/precision.py); the adapter-off reference shares them.
    with frozen_in_bf16(model, cfg, bf16, source), \
            TrainLog(out_dir / "train_log.jsonl" if out_dir else None) as log, \
            Trackers(cfg.trackers if out_dir else [], out_dir, "tunesmith", cfg.model_dump()) as trackers, \
            neftune(model, cfg.neftune_alpha), grad_checkpointing.checkpointed(model, recompute), \
            tqdm(total=plan.total, desc=f"train ({cfg.method})", unit="step", disable=not progress) as bar:
        def record(entry: dict) -> None:
            log.write(entry)
            trackers.log(entry)

        while loop["step"] < plan.total and not watch.stop_reason:
            model.train()
            started = time.perf_counter()
            done = train_step(model, batches, optimizer, params=trainable, dev=dev, loss_fn=loss_fn, bf16=bf16,
                              grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm, schedule=schedule)
            loop["seconds"] += time.perf_counter() - started
            loop["tokens"] += done.tokens
            loop["step"] += 1
            check_finite(done.loss, loop["step"])
            loop["losses"].append(done.loss)
            record({"step": loop["step"], "loss": round(done.loss, 6), "lr": schedule.get_last_lr()[0]})
            bar.update(1)
            if loop["step"] % plan.eval_every == 0 or loop["step"] == plan.total:
                _validate_step(model, tokenizer, fmt, (val, val_pairs), cfg, ref, metric, loop, plan.eval_every,
                               watch, record, on_validate)
    watch.restore_best(model)
    model.eval()
    stats = TrainStats.measure(model, loop["seconds"], loop["tokens"], loop["step"], plan.total, bf16, dev,
                               watch.best, watch.stop_reason, checkpointing=recompute)
    return TrainResult(model, history=watch.history, best=watch.best, stopped_early=bool(watch.stop_reason),
                       stats=stats, overfitting=watch.flags, stop_reason=watch.stop_reason)


def _checkpointing(model, tokenizer, fmt: PromptFormat, train: list[Pair], cfg: TrainConfig) -> bool:
    """train.gradient_checkpointing resolved as the supervised loop resolves it (grad_checkpointing.wanted),
    for the batches this loop runs: 2 x batch_size sequences (chosen and rejected, or KTO's completion and
    its mismatched one) in one forward. The reference forward keeps no activations (no gradient)."""
    # Only "auto" consults the estimate, and so needs the longest sequence: no encoding otherwise.
    lengths = ([len(e.ids) for both in encode_pairs(train, tokenizer, fmt, cfg.method == "kto") for e in both]
               if cfg.gradient_checkpointing == "auto" else [])
    return grad_checkpointing.wanted(derive(cfg, {"batch_size": 2 * cfg.batch_size}), model, lengths)


def _validate_step(model, tokenizer, fmt, val, cfg, ref, metric, loop, window, watch: Watch, record, on_validate):
    entry = validate(model, tokenizer, fmt, val[0], cfg, ref, metric, pairs=val[1])
    recent = loop["losses"][-window:]
    entry.update(step=loop["step"], train_loss=round(sum(recent) / len(recent), 6))
    watch.observe(entry, model)
    record(entry)
    if on_validate:
        on_validate(entry)


def reference(model, cfg: TrainConfig):
    """The reference for DPO/KTO: None where the policy's adapter can be switched off (no copy); a frozen
    copy of the model for full fine-tuning; None for ORPO and SimPO, which use none."""
    if not METHOD_SPECS[cfg.method].reference or hasattr(model, "disable_adapter"):
        return None
    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    return frozen


@torch.no_grad()
def reference_logps(model, batch: dict[str, torch.Tensor], ref) -> torch.Tensor:
    """Summed answer log-probs (B,) under the reference, without dropout (as TRL's disable_dropout)."""
    net = ref if ref is not None else model
    adapter_off = model.disable_adapter() if ref is None else contextlib.nullcontext()
    was_training = net.training
    net.eval()
    try:
        with adapter_off:
            return P.sequence_logps(net, batch)[0]
    finally:
        net.train(was_training)


def preference_loss(model, batch: dict[str, torch.Tensor], cfg: TrainConfig, ref=None) -> torch.Tensor:
    """The loss of cfg.method on one batch from `pair_batches` (first half chosen, second half rejected;
    for KTO: completions, then the mismatched completions of the KL estimate)."""
    logps, counts = P.sequence_logps(model, batch)  # (2B,), (2B,)
    n = len(logps) // 2
    if cfg.method == "kto":
        ref_logps = reference_logps(model, batch, ref)
        kl = P.kto_kl(logps[n:].detach(), ref_logps[n:])
        return P.kto_loss(logps[:n], ref_logps[:n], batch["kto_labels"], kl, cfg.beta,
                          cfg.preference.kto_desirable_weight, cfg.preference.kto_undesirable_weight)
    if cfg.method == "dpo":
        ref_logps = reference_logps(model, batch, ref)
        return P.dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], cfg.beta)
    mean = logps / counts.clamp(min=1)  # (2B,) mean per-token log-probs
    if cfg.method == "orpo":
        nll = -logps[:n].sum() / counts[:n].sum().clamp(min=1)  # chosen answers' token cross-entropy
        return P.orpo_loss(mean[:n], mean[n:], nll, cfg.preference.orpo_lambda)
    return P.simpo_loss(mean[:n], mean[n:], cfg.beta, cfg.preference.simpo_gamma)


def encode_pairs(pairs: list[Pair], tokenizer, fmt: PromptFormat, kto: bool = False) -> list[list]:
    """Per pair [chosen, rejected] encodings with the task's prompt format, only the answer supervised
    (a multi-turn prompt's earlier assistant turns are context: the losses are TRL's on the answer);
    KTO: [completion, completion of the previous row after this prompt] (TRL's KL rotation)."""
    fmt = answer_only(fmt)
    first = encode_for_training(tokenizer, fmt, [pair_example(p, p.chosen) for p in pairs])
    if kto:
        rotated = [pair_example(pairs[i], pairs[i - 1].chosen) for i in range(len(pairs))]
        return [list(x) for x in zip(first, encode_for_training(tokenizer, fmt, rotated))]
    second = encode_for_training(tokenizer, fmt, [pair_example(p, p.rejected) for p in pairs])
    return [list(x) for x in zip(first, second)]


def collate_pairs(encoded: list[list], pairs: list[Pair], pad_id: int, share_prefix: bool = True
                  ) -> dict[str, torch.Tensor]:
    """One (2B, T) batch: every first item, then every second (one forward for both halves).

    With `share_prefix`, the prompt tokens all rows begin with (the system text; a one-pair batch's whole
    prompt) go once into `prefix_ids`: their keys/values are computed once per forward, not 2B times
    (train/loss.py)."""
    items = [e[0] for e in encoded] + [e[1] for e in encoded]
    batch = collate(items, pad_id, common_prefix_len([it.ids[: it.start] for it in items]) if share_prefix else 0)
    if pairs and pairs[0].label is not None:
        batch["kto_labels"] = torch.tensor([bool(p.label) for p in pairs])  # (B,)
    return batch


def pair_batches(pairs: list[Pair], tokenizer, fmt: PromptFormat, cfg: TrainConfig, kto: bool = False):
    """An endless stream of shuffled training batches (a new order each epoch, from train.seed)."""
    rng = random.Random(cfg.seed)
    order = list(range(len(pairs)))
    epoch = 0
    while True:
        rng.shuffle(order)
        for start in range(0, len(order), cfg.batch_size):
            chunk = [pairs[i] for i in order[start:start + cfg.batch_size]]
            # KTO's mismatched completions rotate within the batch, as TRL builds them per batch.
            yield collate_pairs(encode_pairs(chunk, tokenizer, fmt, kto), chunk, tokenizer.pad_token_id,
                                shares_prefix(cfg))
        epoch += 1


@torch.no_grad()
def pair_margins(model, tokenizer, fmt: PromptFormat, pairs: list[Pair], batch_size: int = 8) -> list[float]:
    """Per pair, log p(chosen) - log p(rejected) under `model` (summed answer tokens): the figure behind
    preference_accuracy and reward_margin, the same for a base and a tuned model."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    margins: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = {k: v.to(dev) for k, v in collate_pairs(encode_pairs(chunk, tokenizer, fmt), chunk,
                                                         tokenizer.pad_token_id).items()}
        logps = P.sequence_logps(model, batch)[0]
        margins += (logps[: len(chunk)] - logps[len(chunk):]).tolist()
    model.train(was_training)
    return margins


@torch.no_grad()
def validate(model, tokenizer, fmt: PromptFormat, val: list[Pair], cfg: TrainConfig, ref, metric: str,
             pairs: list[Pair] | None = None) -> dict:
    """val_loss (the preference loss), the pair figures (on `pairs`, else `val` unless KTO) and, when the
    objective is a task metric, that metric (reference: the chosen or desirable answer)."""
    model.eval()
    dev = next(model.parameters()).device
    # Under the training's autocast, as the supervised loop validates (bf16 frozen weights need it).
    bf16 = hardware.use_bf16(cfg.precision, dev)
    kto = cfg.method == "kto"
    losses = []
    for start in range(0, len(val), cfg.batch_size):
        chunk = val[start:start + cfg.batch_size]
        batch = {k: v.to(dev) for k, v in collate_pairs(encode_pairs(chunk, tokenizer, fmt, kto), chunk,
                                                         tokenizer.pad_token_id).items()}
        with hardware.autocast(bf16, dev):
            losses.append(float(preference_loss(model, batch, cfg, ref)) * len(chunk))
    record = {"val_loss": round(sum(losses) / max(len(val), 1), 6)}
    pairs = pairs if pairs is not None else ([] if kto else val)  # KTO rows are not pairs
    if pairs:
        with hardware.autocast(bf16, dev):
            margins = pair_margins(model, tokenizer, fmt, pairs, cfg.batch_size)
        record.update(compute_metrics("preference", [""] * len(margins), margins))
    if metric not in record and metric not in PREFERENCE_METRICS:
        good = [p for p in val if p.label is not False]  # an undesirable completion is no reference
        prompts = [pair_example(p, p.chosen) for p in good]
        texts = predict(model, tokenizer, fmt, prompts, batch_size=cfg.batch_size, autocast=bf16).texts
        record[metric] = compute_metrics(fmt.task_type, [p.chosen for p in good], texts)[metric]
    return record
