"""Prompt optimisation: no weight changes; search instructions and few-shot sets on validation.

Stage 1 scores every candidate instruction (with and without the label list for classification)
without examples; stage 2 tries few-shot sets drawn from the training split with the best
instruction. The winner is the candidate with the best validation metric, ties going to the
shorter prompt (cheaper at inference). Few-shot examples belong to the shared prompt prefix, so
their cost is paid once per batch, not once per example.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import defaultdict

from tqdm.auto import tqdm

from tunesmith import hardware
from tunesmith.config import TrainConfig
from tunesmith.data.examples import Example
from tunesmith.tasks.metrics import better, compute_metrics
from tunesmith.tasks.predict import encode_prompts, predict
from tunesmith.tasks.prompts import PromptFormat

DEFAULT_INSTRUCTIONS = {
    "classification": ["Classify the text into one of the given categories.",
                       "Read the message and reply with its category name only."],
    "generation": ["Complete the task described in the input.",
                   "Answer the request concisely and accurately."],
    "chat": ["You are a helpful assistant. Answer concisely."],
}


def candidate_instructions(fmt: PromptFormat, extra: list[str]) -> list[str]:
    """The user's instruction first, then configured and built-in alternatives, without repeats."""
    seen, out = set(), []
    for text in [fmt.instruction, *extra, *DEFAULT_INSTRUCTIONS.get(fmt.task_type, [])]:
        if text.strip() not in seen:
            seen.add(text.strip())
            out.append(text.strip())
    return out


def shot_sets(train: list[Example], labels: list[str] | None, k: int, draws: int, seed: int,
              max_chars: int) -> list[list[dict]]:
    """`draws` few-shot sets: k examples per label for classification (at most 24 in all), k otherwise."""
    rng = random.Random(seed * 1000 + k)
    usable = [e for e in train if e.messages is None and len(e.input) <= max_chars]
    by_label = defaultdict(list)
    for ex in usable:
        by_label[ex.target].append(ex)
    sets = []
    for _ in range(draws):
        if labels:
            picked = [e for lab in labels for e in rng.sample(by_label[lab], min(k, len(by_label[lab])))]
            picked = rng.sample(picked, min(len(picked), 24))
        else:
            picked = rng.sample(usable, min(k, len(usable)))
        rng.shuffle(picked)
        if picked:
            sets.append([{"input": e.input, "output": e.target} for e in picked])
    return sets


def search(model, tokenizer, fmt: PromptFormat, train: list[Example], val: list[Example], cfg: TrainConfig,
           metric: str, log=None, progress: bool = True) -> tuple[PromptFormat, list[dict], dict]:
    """Best prompt format on `val`; returns (format, one record per candidate, the best record)."""
    settings = cfg.prompt_optimization
    val = val[: cfg.max_val_examples]
    listing = [True, False] if fmt.labels else [fmt.list_labels]
    first = [dataclasses.replace(fmt, instruction=text, list_labels=lst, shots=[])
             for text in candidate_instructions(fmt, settings.instructions) for lst in listing]
    n_second = sum(settings.draws for k in settings.shots if k > 0)
    history: list[dict] = []
    bar = tqdm(total=len(first) + n_second, desc="prompt search", unit="prompt", disable=not progress)
    best_fmt, best = _score_all(model, tokenizer, first, val, cfg, metric, history, bar, log)
    second = [dataclasses.replace(best_fmt, shots=shots) for k in settings.shots if k > 0
              for shots in shot_sets(train, fmt.labels, k, settings.draws, cfg.seed, settings.max_shot_chars)]
    # A prompt that would crowd out the input is not a candidate.
    second = [f for f in second if _prompt_tokens(tokenizer, f) <= fmt.max_length // 2]
    if second:
        cand_fmt, cand = _score_all(model, tokenizer, second, val, cfg, metric, history, bar, log)
        if better(cand, best, metric, tiebreak="prompt_tokens"):
            best_fmt, best = cand_fmt, cand
    bar.close()
    return best_fmt, history, best


def _score_all(model, tokenizer, formats, val, cfg, metric, history, bar, log):
    best_fmt, best = None, None
    for f in formats:
        started = time.perf_counter()
        preds = predict(model, tokenizer, f, val, batch_size=cfg.batch_size, autocast=hardware.use_bf16(
            cfg.precision, hardware.device()))
        score = compute_metrics(f.task_type, [e.target for e in val], preds.texts)[metric]
        record = {"step": len(history) + 1, "candidate": len(history), "instruction": f.instruction,
                  "list_labels": f.list_labels, "shots": len(f.shots), metric: score,
                  "prompt_tokens": _prompt_tokens(tokenizer, f), "seconds": round(time.perf_counter() - started, 3)}
        history.append(record)
        if log is not None:
            log.write(record)
        if better(record, best, metric, tiebreak="prompt_tokens"):
            best_fmt, best = f, record
        bar.update(1)
        bar.set_postfix(**{f"best_{metric}": f"{best[metric]:.3f}"})
    return best_fmt, best


def _prompt_tokens(tokenizer, fmt: PromptFormat) -> int:
    """Tokens of the prompt around an empty input: the fixed cost the candidate adds."""
    return len(encode_prompts(tokenizer, dataclasses.replace(fmt, max_length=10**6), [Example("", "", "probe")])[0])
