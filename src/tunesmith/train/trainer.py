"""The training loop: setup -> fit (validation, overfitting watch, checkpoints) -> restore best."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tunesmith import cores, fsio, hardware
from tunesmith.config import TrainConfig
from tunesmith.data.examples import Example
from tunesmith.errors import ConfigError
from tunesmith.models.load import load_model
from tunesmith.models.quantize import load_quantized, quantized_layers
from tunesmith.registry import VALIDATION_FIGURES
from tunesmith.tasks.cache import common_prefix_len
from tunesmith.tasks.metrics import compute_metrics
from tunesmith.tasks.predict import predict, reference_budget
from tunesmith.tasks.prompts import PromptFormat
from tunesmith.train import distributed, fsdp, grad_checkpointing
from tunesmith.train.batching import batch_stream, collate, encode_for_training, epoch_batch_counts, pad_multiple
from tunesmith.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from tunesmith.train.compiled import compiled
from tunesmith.train.loss import supervised_loss
from tunesmith.train.methods import get_method
from tunesmith.train.precision import frozen_in_bf16, has_weights, make_optimizer
from tunesmith.train.preflight import preflight
from tunesmith.train.regularize import neftune, set_dropout, shares_prefix
from tunesmith.train.text import encode_text
from tunesmith.train.trackers import Trackers
from tunesmith.train.watch import Watch


@dataclass(frozen=True)
class TrainStats:
    """What a fit cost and how it ended; train.json's "stats"."""

    train_seconds: float
    train_tokens: int
    tokens_per_second: float
    peak_rss_mb: float
    gpu_peak_mb: float | None  # torch's peak GPU allocation; None without CUDA (not measured)
    steps: int
    total_steps: int
    trainable_params: int
    total_params: int
    precision: str
    device: str
    world_size: int
    best_step: int | None
    stopped_early: bool
    stop_reason: str | None
    candidates: int | None = None  # prompts scored, for methods that search instead of training
    gradient_checkpointing: bool = False  # whether decoder activations were recomputed (train/grad_checkpointing.py)

    @classmethod
    def measure(cls, model, seconds: float, tokens: int, steps: int, total_steps: int, bf16: bool, dev,
                best: dict | None, stop_reason: str | None = None, candidates: int | None = None,
                checkpointing: bool = False) -> TrainStats:
        """The figures of a finished fit of `model` (the only place they are computed)."""
        n_trainable, n_total = hardware.parameter_counts(model)
        return cls(round(seconds, 3), tokens, hardware.throughput(tokens, seconds), hardware.peak_rss_mb(),
                   hardware.gpu_peak_mb(), steps,
                   total_steps, n_trainable, n_total, "bf16" if bf16 else "fp32", dev.type,
                   distributed.world_size(), best["step"] if best else None, bool(stop_reason), stop_reason,
                   candidates, checkpointing)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        if self.candidates is None:
            del data["candidates"]
        return data


@dataclass
class TrainResult:
    """The trained model (best checkpoint restored) and what happened on the way."""

    model: object
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    stopped_early: bool = False
    stats: TrainStats | None = None
    fmt: PromptFormat | None = None  # set by methods that change the prompt (prompt_optimization)
    overfitting: list[dict] = field(default_factory=list)
    stop_reason: str | None = None
    preflight: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """Step counts derived once from the data size and the config."""

    steps_per_epoch: int
    total: int
    eval_every: int
    checkpoint_every: int


def make_plan(n_examples: int, cfg: TrainConfig, world: int = 1, batch_counts: list[int] | None = None) -> Plan:
    """The step plan. `batch_counts`: each epoch's global batches (batching.epoch_batch_counts) where
    they do not follow from n_examples / batch_size (token budgets, packing)."""
    counts = batch_counts or [math.ceil(n_examples / cfg.batch_size)]
    steps = [max(1, math.ceil(b / (cfg.grad_accum * world))) for b in counts]
    total = cfg.max_steps or max(1, round(_epochs_steps(steps, cfg.epochs)))
    eval_every = cfg.eval_every or max(1, steps[0] // 4)
    return Plan(steps[0], total, eval_every, cfg.checkpoint_every or eval_every)


def _epochs_steps(steps: list[int], epochs: float) -> float:
    """Steps in `epochs` (a fraction allowed) when epoch e takes steps[e] (the last figure repeats)."""
    if len(steps) == 1:
        return steps[0] * epochs  # today's formula, to the bit
    return sum(steps[min(e, len(steps) - 1)] * min(1.0, epochs - e) for e in range(math.ceil(epochs)))


def fit(model, tokenizer, fmt: PromptFormat, train: list[Example], val: list[Example], cfg: TrainConfig,
        metric: str, out_dir: Path | None = None, progress: bool = True, resume: bool = False,
        on_validate=None) -> TrainResult:
    """Train `model` with `cfg.method`, validating every `eval_every` steps on `metric`.

    Args:
        out_dir: where train_log.jsonl, checkpoints/ and tracker files go (None: nowhere).
        resume: continue from the newest checkpoint under out_dir/checkpoints.
        on_validate: called with each validation record (step, val_loss, the metric, and more); may raise to stop.

    Returns:
        TrainResult whose model holds the weights of the best validation evaluation.
    """
    torch.manual_seed(cfg.seed)
    hardware.reset_peaks()  # the figures are this training's peaks, not an earlier stage's in the same process
    dev = hardware.device()
    rank, world = distributed.rank(), distributed.world_size()
    source = Path(getattr(model, "name_or_path", "") or ".")
    if cfg.quantize != "none" and not quantized_layers(model):  # QLoRA on a full-precision model: reload it
        model = load_base(_checkpoint(source), cfg)
    model = get_method(cfg.method).apply(model, cfg)
    set_dropout(model, cfg.dropout)
    bf16, sharded = hardware.use_bf16(cfg.precision, dev), fsdp.enabled(cfg)
    # The loop trains `net`: the model itself, or under FSDP a sharded copy gathered back at the end.
    net = fsdp.sharded_copy(model, dev) if sharded else model.to(dev)
    encoded, val, val_encoded, notes = _encode(tokenizer, fmt, train, val, cfg, rank)
    recompute = grad_checkpointing.wanted(cfg, model, [len(e.ids) for e in encoded])
    plan = make_plan(len(encoded), cfg, world, epoch_batch_counts(encoded, cfg, world, fmt.max_length))
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer, schedule = optimizer_and_schedule(trainable, cfg, plan.total)
    watch, loop = Watch(cfg, metric), {"step": 0, "tokens": 0, "train_seconds": 0.0, "losses": []}
    writes = out_dir is not None and rank == 0
    if resume:
        loop = _resume(out_dir, net, optimizer, schedule, watch)
    # Prompts of a task share their system text: its keys/values are computed once per batch. Not
    # under FSDP: a second pass through a sharded layer before backward is not supported there.
    prefix_len = 0 if sharded else common_prefix_len([e.ids[: e.start] for e in encoded + val_encoded])
    # Validation (eval mode, no NEFTune noise) shares it whatever shares_prefix says of training batches.
    batches = batch_stream(encoded, cfg, tokenizer.pad_token_id, prefix_len if shares_prefix(cfg) else 0, rank,
                           world, loop["step"] * cfg.grad_accum, fmt.max_length, pad_multiple(cfg, dev))
    # Frozen weights in bf16 while training (not under FSDP, which shards fp32 copies); train/precision.py.
    compiles = cfg.compile and not (recompute or sharded)
    with frozen_in_bf16(model, cfg, bf16 and not sharded, source, compiles), \
            TrainLog(out_dir / "train_log.jsonl" if writes else None, keep_until=loop["step"]) as log, \
            Trackers(cfg.trackers if writes else [], out_dir, "tunesmith", cfg.model_dump()) as trackers, \
            neftune(net, cfg.neftune_alpha), grad_checkpointing.checkpointed(net, recompute), \
            compiled(net, compiles), \
            tqdm(total=plan.total, initial=loop["step"], desc=f"train ({cfg.method})", unit="step",
                 disable=not progress or rank != 0, dynamic_ncols=True) as bar:
        net.train()
        while loop["step"] < plan.total and not watch.stop_reason:
            loss_value = _step(net, batches, optimizer, schedule, trainable, cfg, bf16, dev, loop)
            step = loop["step"]
            record = {"step": step, "epoch": round(step / plan.steps_per_epoch, 4), "loss": round(loss_value, 6),
                      "lr": schedule.get_last_lr()[0]}
            log.write(record)
            trackers.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{_mean(loop['losses'][-10:]):.4f}")
            if step % plan.eval_every == 0 or step == plan.total:
                record = _validate(net, tokenizer, fmt, val, val_encoded, cfg, metric, bf16, prefix_len)
                record.update(step=step, epoch=round(step / plan.steps_per_epoch, 4),
                              train_loss=round(_mean(loop["losses"][-plan.eval_every:]), 6))
                for signal in watch.observe(record, net):
                    log.write({"step": step, "overfitting": signal})
                    bar.write(f"warning: overfitting at step {step}: {signal['detail']}")
                log.write(record)
                trackers.log(record)
                if on_validate:  # e.g. a hyperparameter search that prunes hopeless trials
                    on_validate(record)
                bar.set_postfix(loss=f"{record['train_loss']:.4f}", val_loss=f"{record['val_loss']:.4f}",
                                **{f"val_{metric}": f"{record[metric]:.3f}"})
                net.train()
            # Every rank takes part (sharded weights are gathered); rank 0 writes.
            if out_dir and step % plan.checkpoint_every == 0 and step < plan.total and not watch.stop_reason:
                save_checkpoint(out_dir / "checkpoints", step, net, optimizer, schedule, loop, watch.state(),
                                watch.best_state, cfg.keep_checkpoints)
    watch.restore_best(net)
    _unwrap(model, net, sharded, dev)
    return _result(model, watch, loop, plan, cfg, bf16, dev, notes, recompute)


def _encode(tokenizer, fmt: PromptFormat, train: list[Example], val: list[Example], cfg: TrainConfig, rank: int):
    """(encoded train, val cut to max_val_examples, encoded val, pre-flight notes); rank 0 prints the notes."""
    # task.type text: every token of each document chunk is a target (train/text.py).
    encode = encode_text if fmt.task_type == "text" else encode_for_training
    encoded = encode(tokenizer, fmt, train)
    notes = preflight(tokenizer, fmt, train, encoded, cfg)
    for note in notes if rank == 0 else []:
        print(f"warning: {note}", file=sys.stderr)
    val = val[: cfg.max_val_examples]
    return encoded, val, encode(tokenizer, fmt, val), notes


def optimizer_and_schedule(trainable: list[torch.Tensor], cfg: TrainConfig, total: int):
    """AdamW over the trainable parameters and its warmup-then-linear-decay schedule over `total` steps."""
    optimizer = make_optimizer(trainable, cfg)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_linear(total, cfg.warmup_ratio))


def _unwrap(model, net, sharded: bool, dev) -> None:
    """Bring the trained weights home: gather an FSDP copy into `model` and leave `model` in eval mode."""
    if sharded:
        fsdp.gather_into(model, net)
        model.to(dev)
    model.eval()


@dataclass(frozen=True)
class StepResult:
    """One optimiser step's mean loss over its micro-batches (this process) and the real tokens it saw."""

    loss: float
    tokens: int


def train_step(model, batches, optimizer, *, params: list[torch.Tensor], dev: torch.device,
               loss_fn: Callable | None = None, bf16: bool = False, grad_accum: int = 1,
               max_grad_norm: float | None = None, schedule=None) -> StepResult:
    """One optimiser step, the one `fit`, the recovery fine-tune and the MiniLM student all take.

    `grad_accum` micro-batches from the iterator `batches` (dicts of tensors, moved to `dev`): each
    forward and loss under bf16 autocast when `bf16`, backward of loss / grad_accum. Then the
    gradients of `params` are averaged over data-parallel ranks (a no-op in one process), clipped to
    `max_grad_norm` (None: not clipped), the optimiser and `schedule` (if any) step and the
    gradients are cleared.

    Args:
        loss_fn: `loss_fn(model, batch) -> scalar`; default the supervised answer-token cross-entropy.
    """
    loss_fn = loss_fn or _supervised
    loss_value, tokens = 0.0, 0
    cores.fit_threads(dev)  # beside a busy process, fewer threads than cores (cores.py)
    for _ in range(grad_accum):
        batch = {k: v.to(dev) for k, v in next(batches).items()}
        with hardware.autocast(bf16, dev):
            loss = loss_fn(model, batch)
        (loss / grad_accum).backward()
        loss_value += loss.item() / grad_accum
        tokens += hardware.count_tokens(batch)
    distributed.average_gradients(params)
    if max_grad_norm is not None:
        distributed.clip_grad_norm(params, max_grad_norm)
    optimizer.step()
    if schedule is not None:
        schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_value, tokens)


def _supervised(model, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
    return supervised_loss(model, batch, label_smoothing=label_smoothing)[0]


def _step(model, batches, optimizer, schedule, trainable, cfg: TrainConfig, bf16: bool, dev, loop: dict) -> float:
    """`train_step` with fit's bookkeeping (tokens, seconds, step count); returns the loss averaged over ranks."""
    started = time.perf_counter()
    done = train_step(model, batches, optimizer, params=trainable, dev=dev, bf16=bf16, grad_accum=cfg.grad_accum,
                      max_grad_norm=cfg.max_grad_norm, schedule=schedule,
                      loss_fn=functools.partial(_supervised, label_smoothing=cfg.label_smoothing))
    loop["tokens"] += done.tokens
    loop["train_seconds"] += time.perf_counter() - started
    loop["step"] += 1
    loss_value = distributed.mean_scalar(done.loss)  # the same on every rank: all stop together below
    check_finite(loss_value, loop["step"])
    loop["losses"].append(loss_value)
    return loss_value


def check_finite(loss: float, step: int) -> None:
    """ConfigError at the first step whose loss is NaN or infinite: every later step would keep the
    weights NaN, and a NaN model still predicts (one label for every row) and can pass a low target."""
    if not math.isfinite(loss):
        raise ConfigError(f"training diverged: the loss is {loss} at step {step}", "train.learning_rate",
                          "lower train.learning_rate (or train.max_grad_norm, which clips the gradients)")


def _resume(out_dir: Path | None, model, optimizer, schedule, watch: Watch) -> dict:
    found = list_checkpoints(out_dir / "checkpoints") if out_dir else []
    if not found:
        from tunesmith.errors import RunDirError

        raise RunDirError("no checkpoint to resume from", str(out_dir),
                          "a run leaves checkpoints every train.checkpoint_every steps; start it anew")
    state, best_state = load_checkpoint(found[-1], model, optimizer, schedule)
    watch.load_state(state["watch"], best_state)
    return state["loop"]


def _result(model, watch: Watch, loop: dict, plan: Plan, cfg: TrainConfig, bf16: bool, dev,
            notes: list[str], recompute: bool = False) -> TrainResult:
    tokens = distributed.sum_int(loop["tokens"])
    stats = TrainStats.measure(model, loop["train_seconds"], tokens, loop["step"], plan.total, bf16, dev, watch.best,
                               watch.stop_reason, checkpointing=recompute)
    return TrainResult(model, history=watch.history, best=watch.best, stopped_early=bool(watch.stop_reason),
                       stats=stats, overfitting=watch.flags, stop_reason=watch.stop_reason, preflight=notes)


@torch.no_grad()
def _validate(model, tokenizer, fmt, val, val_encoded, cfg, metric, bf16, prefix_len) -> dict:
    model.eval()
    dev = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(val_encoded), cfg.batch_size):
        batch = {k: v.to(dev) for k, v in collate(val_encoded[start:start + cfg.batch_size], tokenizer.pad_token_id,
                                                     prefix_len, pad_multiple(cfg, dev),
                                                     fmt.max_length - prefix_len).items()}
        with hardware.autocast(bf16, dev):
            loss, n = supervised_loss(model, batch)
        total_loss += loss.item() * n
        total_tokens += n
    if fmt.task_type == "text":  # raw text: the validation figures are the held-out token loss itself
        return {"val_loss": round(total_loss / max(total_tokens, 1), 6),
                **compute_metrics(fmt.task_type, [total_tokens], [total_loss])}
    budget = 64 if fmt.labels else reference_budget(tokenizer, [e.target for e in val])
    preds = predict(model, tokenizer, fmt, val, batch_size=cfg.batch_size, autocast=bf16, max_new_tokens=budget)
    scores = compute_metrics(fmt.task_type, [e.target for e in val], preds.texts)
    # Classification also logs the four figures `tunesmith ui`'s watch page charts, whatever the objective.
    watched = {name: scores[name] for name in VALIDATION_FIGURES.get(fmt.task_type, ())}
    return {"val_loss": round(total_loss / max(total_tokens, 1), 6), **watched, metric: scores[metric]}


def load_base(path: Path, cfg: TrainConfig):
    """The base model as training wants it: its linear layers quantized when train.quantize says so
    (QLoRA: the full-precision weights are never all in memory), else in full precision."""
    if cfg.quantize == "none":
        return load_model(path)
    dev = hardware.device()
    return load_quantized(path, cfg.quantize, dev, hardware.use_bf16(cfg.precision, dev))


def _checkpoint(source: Path) -> Path:
    """The checkpoint folder the model came from (QLoRA reloads it quantized)."""
    if not has_weights(source):
        from tunesmith.errors import InputError

        raise InputError(f"train.quantize needs the model's safetensors checkpoint; {source} has none",
                         "train.quantize", "set train.quantize to none")
    return source


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _warmup_linear(total: int, warmup_ratio: float):
    warmup = max(1, int(total * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


class TrainLog:
    """The run's own metrics log (JSONL), one record per step, evaluation or flag.

    On resume (`keep_until` > 0) records past the checkpoint's step, written by the interrupted
    run, are dropped so the log reads as one uninterrupted run.
    """

    def __init__(self, path: Path | None, keep_until: int = 0):
        self.f = None
        if path is None:
            return
        if keep_until and path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").split("\n")
                    if line.strip() and json.loads(line).get("step", 0) <= keep_until]
            fsio.write_text(path, "".join(line + "\n" for line in kept))
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.f:
            self.f.write(fsio.dumps(record) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()

    def __enter__(self) -> TrainLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
