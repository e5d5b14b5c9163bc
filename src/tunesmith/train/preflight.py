"""Checks before the first training step, each naming the examples or config key at fault.

Fatal problems (nothing to learn from, answers that can never stop) raise errors; suspicious
settings produce warnings that are printed and kept in train.json.
"""

from __future__ import annotations

from tunesmith.config import TrainConfig
from tunesmith.data.examples import Example
from tunesmith.errors import ConfigError, DataError
from tunesmith.models.tokens import stop_ids
from tunesmith.registry import METHOD_SPECS
from tunesmith.tasks.prompts import PromptFormat, encode_answer
from tunesmith.train import distributed
from tunesmith.train.batching import Encoded

SHOWN = 5


def preflight(tokenizer, fmt: PromptFormat, examples: list[Example], encoded: list[Encoded],
              cfg: TrainConfig) -> list[str]:
    """Raise on fatal problems; return warnings."""
    warnings = length_checks(examples, encoded, fmt)
    if fmt.task_type != "text":  # raw documents end with the EOS by construction (tasks/text.py)
        warnings += _stops(tokenizer, fmt)
    warnings += _hyperparameters(cfg, len(examples))
    return warnings


def length_checks(examples: list[Example], encoded: list[Encoded], fmt: PromptFormat,
                  what: str = "training examples") -> list[str]:
    """Examples cut at task.max_length: a warning naming them, and an error when every one lost its whole
    answer. `what` names them (a preference run checks its rejected answers too)."""
    return _masked(examples, encoded, what) + _truncated(examples, encoded, fmt, what)


def _masked(examples: list[Example], encoded: list[Encoded], what: str) -> list[str]:
    empty = [_where(ex) for ex, enc in zip(examples, encoded) if len(enc.ids) <= enc.n_prompt]
    if not empty:
        return []
    where = _names(empty)
    if len(empty) == len(examples):
        raise DataError(f"every one of the {what} has its answer cut off (no supervised tokens, the loss would "
                        "be 0)", where, hint="raise task.max_length or shorten the inputs")
    return [f"{len(empty)} {what} have no supervised tokens left after truncation and teach "
            f"nothing: {where}; raise task.max_length"]


def _truncated(examples: list[Example], encoded: list[Encoded], fmt: PromptFormat, what: str) -> list[str]:
    cut = [_where(ex) for ex, enc in zip(examples, encoded) if enc.truncated]
    if not cut:
        return []
    return [f"{len(cut)} of {len(examples)} {what} are longer than task.max_length={fmt.max_length} "
            f"tokens and were truncated: {_names(cut)}"]


def _stops(tokenizer, fmt: PromptFormat) -> list[str]:
    """A generated answer must end in a token generation stops at, or it runs to max_new_tokens."""
    answer = encode_answer(tokenizer, fmt, "x")
    if answer and answer[-1] in stop_ids(tokenizer):
        return []
    problem = (f"the answers the model learns end with token {answer[-1] if answer else None!r}, which is not "
               f"an end-of-sequence token ({', '.join(map(str, stop_ids(tokenizer)))}) of the tokenizer")
    if fmt.task_type == "classification":
        return [problem + "; label scoring is unaffected, but generated answers would not stop"]
    raise ConfigError(problem + ", so generated answers would never stop", "model",
                      "use a tokenizer whose chat template ends turns with its EOS token, or one with an eos_token")


def _hyperparameters(cfg: TrainConfig, n_examples: int) -> list[str]:
    warnings = []
    low, high = METHOD_SPECS[cfg.method].sane_lr or (0.0, float("inf"))
    if not low <= cfg.learning_rate <= high:
        warnings.append(f"train.learning_rate={cfg.learning_rate:g} is outside the usual range for "
                        f"{cfg.method} ({low:g} to {high:g})")
    if cfg.batch_size * cfg.grad_accum > n_examples:
        warnings.append(f"train.batch_size x grad_accum = {cfg.batch_size * cfg.grad_accum} exceeds the "
                        f"{n_examples} training examples: every step sees the whole set")
    elif cfg.batch_size > 256:
        warnings.append(f"train.batch_size={cfg.batch_size} is unusually large for fine-tuning")
    if cfg.fsdp and not distributed.active():  # one process has nothing to shard across: it trains whole
        warnings.append("train.fsdp is on, but this is a single process: the model trains unsharded (launch "
                        "with torchrun --nproc_per_node N to shard it across N processes)")
    return warnings


def _where(ex: Example) -> str:
    """The row's whole path and line where it was read from a file in this process: `train.jsonl:5` alone
    could be the user's file or one a run wrote (retrain's challenger trains on retrain/train.jsonl)."""
    return f"{ex.file}:{ex.line}" if ex.file and ex.line else ex.source


def _names(sources: list[str]) -> str:
    more = f" and {len(sources) - SHOWN} more" if len(sources) > SHOWN else ""
    return ", ".join(sources[:SHOWN]) + more
