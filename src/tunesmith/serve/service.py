"""The model behind the server: which weights to load for a run directory or model name, and the
three things the routes ask of it (classify texts, complete prompts, stream one completion)."""

from __future__ import annotations

import threading
import time
import unicodedata
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith import fsio
from tunesmith.config import GenerationSettings
from tunesmith.data.examples import Example
from tunesmith.models.load import context_length
from tunesmith.models.tokens import stop_ids
from tunesmith.optimize.engines import load_variant
from tunesmith.optimize.predictor import Predictor
from tunesmith.tasks.cache import cache_kwargs, output_cache
from tunesmith.tasks.predict import answer_budget, encode_prompts
from tunesmith.tasks.prompts import PromptFormat
from tunesmith.tasks.sampling import (
    StopScanner,
    cut_at_stop,
    generate_kwargs,
    logits_processors,
    next_token,
    seeded,
    step_generator,
)


@dataclass
class Completion:
    text: str
    finish_reason: str       # "stop" (end of turn) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int
    ids: tuple[int, ...] = ()  # the completion's tokens where this process decoded them (for a stop string's cut)


@dataclass(frozen=True)
class TokenPrompt:
    """A completion prompt given as token ids (OpenAI's `"prompt": [int, ...]`): used as it is, with no
    prompt format around it. The vLLM sidecar sends its prompts this way, encoded with user text as
    literal characters, so the engine never re-tokenizes (and never parses control tokens out of) user text."""

    ids: tuple[int, ...]
    input: str  # the ids decoded, for the request log

    @classmethod
    def checked(cls, ids: list[int], tokenizer, max_length: int) -> TokenPrompt:
        """ValueError (the client's 400) for an empty or over-long prompt or an id outside the vocabulary."""
        vocab = len(tokenizer)
        if not 0 < len(ids) <= max_length:
            raise ValueError(f"a token prompt holds 1 to {max_length} ids (task.max_length, or a served checkpoint's "
                             "context up to 2,048)")
        if any(not 0 <= i < vocab for i in ids):
            raise ValueError(f"token ids must lie in [0, {vocab})")
        return cls(tuple(ids), tokenizer.decode(ids))


def prompt_ids(tokenizer, fmt: PromptFormat, items: list) -> list[list[int]]:
    """Token ids of each prompt: a TokenPrompt's own ids, an Example through the run's prompt format."""
    examples = [x for x in items if not isinstance(x, TokenPrompt)]
    encoded = iter(encode_prompts(tokenizer, fmt, examples) if examples else [])
    return [list(x.ids) if isinstance(x, TokenPrompt) else next(encoded) for x in items]


@dataclass
class Service:
    """A loaded model and what it serves; `variant` names the optimisation variant in use."""

    name: str
    predictor: Predictor
    variant: str
    load_seconds: float
    run_dir: Path | None = None
    scores_labels = True  # per-label probabilities for /v1/classify (an upstream engine has none)
    threads = 1           # model calls at once: one model, one thread (see batcher.py)
    _answer: int | None = field(default=None, init=False, repr=False)  # answer_budget, once

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        """Nothing to release: the weights go with the process."""

    @property
    def fmt(self) -> PromptFormat:
        return self.predictor.fmt

    @property
    def labels(self) -> list[str] | None:
        return self.fmt.labels

    @property
    def samples(self) -> bool:
        """Whether requests may sample (temperature > 0, repetition_penalty): a torch model decodes
        here; another runtime (ct2) decodes greedily only."""
        return self.predictor.complete is None and self.predictor.module is not None

    def classify(self, texts: list[str]) -> list[tuple[str, dict[str, float]]]:
        examples = [Example(t, "", "request") for t in texts]
        preds = self.predictor.predict(examples, len(examples))
        return list(zip(preds.texts, preds.probabilities))

    def row_tokens(self, kind: str, items: list) -> list[tuple[int, int]]:
        """Tokens each item puts in a model call, as (prompt, appended): its encoded prompt (at most
        task.max_length) and what the call runs after it, the longest label answer for a classifier
        (label scoring appends each answer) or max_tokens for a completion. `items` are texts
        ("classify") or (Example, max_tokens) pairs; `call_tokens` prices a call of such rows."""
        if kind == "classify" or self.labels:
            examples = [Example(t, "", "request") for t in items] if kind == "classify" else [it[0] for it in items]
            answer = self._answer_tokens()
            return [(n, answer) for n in self._prompt_tokens(examples)]
        return [(n, it[1]) for n, it in zip(self._prompt_tokens([it[0] for it in items]), items)]

    def _answer_tokens(self) -> int:
        if self.predictor.tokenizer is None:  # the MiniLM classifier scores labels from one pass, no answer
            return 0
        if self._answer is None:
            self._answer = answer_budget(self.predictor.tokenizer, self.fmt)
        return self._answer

    def _prompt_tokens(self, examples: list[Example]) -> list[int]:
        tok, limit = self.predictor.tokenizer, self.fmt.max_length
        if tok is None:  # the MiniLM classifier: a wordpiece covers at least one character, plus [CLS] [SEP]
            return [min(limit, len(e.input) + 2) for e in examples]
        return [len(p) for p in prompt_ids(tok, self.fmt, examples)]

    def example(self, prompt: str | list[int] | None = None,
                messages: list[dict] | None = None) -> Example | TokenPrompt:
        if isinstance(prompt, list):
            return TokenPrompt.checked(prompt, self.predictor.tokenizer, self.fmt.max_length)
        return request_example(self.fmt, prompt, messages)

    def complete(self, examples: list[Example], max_tokens: list[int],
                 sampling: list[GenerationSettings | None] | None = None,
                 abandoned: Callable[[], bool] | None = None) -> list[Completion]:
        """Completions, greedy unless a row's `sampling` says otherwise, cut at its stop strings; a
        classification model answers with its predicted label. Greedy rows share one model call; a
        sampling row is decoded alone, so its seed gives the same answer whatever else is in the batch.
        Decoding stops at the next token once `abandoned()` is true (every request of the call has gone:
        its answers would be thrown away, and the requests queued behind it wait)."""
        if self.labels:  # usage counts the prompt the label was scored after, as for a generated answer
            labels = self.classify([e.input for e in examples])
            return [Completion(label, "stop", n, 1) for (label, _), n in zip(labels, self._prompt_tokens(examples))]
        sampling = sampling or [None] * len(examples)
        together = [i for i, s in enumerate(sampling) if s is None or generate_kwargs(s) == {"do_sample": False}]
        out: list = [None] * len(examples)
        if together:
            done = self._decode([examples[i] for i in together], [max_tokens[i] for i in together], None, abandoned)
            for i, c in zip(together, done):
                out[i] = c
        for i in (i for i in range(len(examples)) if out[i] is None):
            out[i] = self._decode([examples[i]], [max_tokens[i]], sampling[i], abandoned)[0]
        return [_cut(self.predictor.tokenizer, c, s.stop) if s and s.stop else c for c, s in zip(out, sampling)]

    def _decode(self, examples: list, max_tokens: list[int], sampling: GenerationSettings | None,
                abandoned: Callable[[], bool] | None = None) -> list[Completion]:
        """One model call over `examples` (left-padded), under `sampling`'s seed when it samples."""
        tok, model = self.predictor.tokenizer, self.predictor.module
        prompts = prompt_ids(tok, self.fmt, examples)
        if self.predictor.complete is not None:  # another runtime (ct2) decodes, greedily (routes refuse sampling)
            rows = self.predictor.complete(prompts, max_tokens)
            return [_completion(tok, row, len(p), limit) for row, p, limit in zip(rows, prompts, max_tokens)]
        rooms = [self._room(len(p), m) for p, m in zip(prompts, max_tokens)]
        if len(examples) > 1 and any(self._room(len(p), max(rooms)) < max(rooms) for p in prompts):
            # Left-padded rows all decode the batch's longest answer, positions growing in each: a batch
            # that would run any row past the context goes one row at a time.
            return [self._decode([ex], [m], sampling, abandoned)[0] for ex, m in zip(examples, max_tokens)]
        if max(rooms) == 0:  # a token prompt that fills the context: nothing can follow it
            return [_completion(tok, [], len(p), 0) for p in prompts]
        max_tokens = rooms
        with seeded(sampling, model.device):
            out = model.generate(**_left_padded(prompts, tok.pad_token_id, model.device),
                                 max_new_tokens=max(max_tokens), eos_token_id=stop_ids(tok),
                                 pad_token_id=tok.pad_token_id, **generate_kwargs(sampling),
                                 **({"stopping_criteria": _until(abandoned)} if abandoned else {}))
        new = out[:, max(len(p) for p in prompts):]  # (B, new tokens)
        return [_completion(tok, row.tolist(), len(p), limit) for row, p, limit in zip(new, prompts, max_tokens)]

    def _room(self, n_prompt: int, wanted: int) -> int:
        """New tokens a row of `n_prompt` prompt tokens may decode: `wanted`, less whatever would run
        past the model's context (a learned position table has no row beyond it: an IndexError, not an
        answer); the answer then ends with finish_reason "length"."""
        context = context_length(self.predictor.module)
        return wanted if context is None else max(0, min(wanted, context - n_prompt))

    def stream(self, example: Example, max_tokens: int, cancelled: threading.Event,
               sampling: GenerationSettings | None = None) -> Generator[str, None, str]:
        """Text pieces of one completion as they are decoded (greedy unless `sampling` says otherwise);
        stops at end of turn, a stop string (text that may begin one is held back until it cannot),
        `max_tokens` or when `cancelled` is set (the client went away). Returns the finish reason
        ("length": `max_tokens` tokens were decoded), which the yielded pieces cannot tell: a piece may
        hold several tokens (text held back for a stop string, a character spanning tokens) or none."""
        if self.labels:
            yield self.classify([example.input])[0][0]
            return Finish("stop", 1)  # one answer, counted as `complete` counts it
        if self.predictor.complete is not None:  # no token-by-token hook into another runtime: one piece
            done = self.complete([example], [max_tokens], [sampling])[0]
            yield done.text
            return Finish(done.finish_reason, done.completion_tokens)
        scanner, produced = StopScanner(sampling.stop if sampling else []), []
        pieces = self._pieces(example, max_tokens, cancelled, sampling, produced)
        while True:
            try:
                piece = next(pieces)
            except StopIteration as end:
                finish = end.value
                break
            out, stopped = scanner.feed(piece)
            if out:
                yield out
            if stopped:
                return Finish("stop", len(produced))
        if rest := scanner.rest():
            yield rest
        return Finish(finish, len(produced))

    @torch.inference_mode()
    def _pieces(self, example: Example, max_tokens: int, cancelled: threading.Event,
                sampling: GenerationSettings | None, produced: list[int]) -> Generator[str, None, str]:
        """The decoding loop with the KV cache: one token per step from the last position's logits,
        each appended to `produced`; returns the finish reason."""
        tok, model, settings = self.predictor.tokenizer, self.predictor.module, sampling or GenerationSettings()
        seen = torch.tensor(prompt_ids(tok, self.fmt, [example]), device=model.device)  # (1, T)
        ids, stops, past, pieces = seen, set(stop_ids(tok)), None, PieceDecoder(tok, produced)
        processors, generator = logits_processors(settings), step_generator(settings, model.device)
        finish = "length"
        for _ in range(self._room(seen.shape[1], max_tokens)):
            if cancelled.is_set():
                return "stop"
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, past))
            past = output_cache(out)
            token = next_token(out.logits[:, -1], seen, settings, processors, generator)
            if token in stops:
                finish = "stop"
                break
            if piece := pieces.add(token):
                yield piece
            ids = torch.tensor([[token]], device=model.device)  # (1, 1)
            seen = torch.cat([seen, ids], dim=1)  # (1, T + produced): the repetition penalty sees them all
        if rest := pieces.rest():  # what was held back: the answer says it too
            yield rest
        return finish


class PieceDecoder:
    """The text of a growing list of tokens, piece by piece, as a stream sends it: `add(token)` appends
    the token to `ids` and returns the text it completes. The whole tail is decoded each time (a
    multi-byte character may span tokens); until its last token comes it decodes to U+FFFD, held back,
    as sending it would leave the text sent behind the text decoded, and every later piece unsent."""

    def __init__(self, tok, ids: list[int]):
        self.tok, self.ids, self.text = tok, ids, ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        full = self.tok.decode(self.ids, skip_special_tokens=True)
        if full.endswith("\ufffd") or not full.startswith(self.text) or len(full) <= len(self.text):
            return ""
        piece, self.text = full[len(self.text):], full
        return piece

    def rest(self) -> str:
        full = self.tok.decode(self.ids, skip_special_tokens=True)
        if not full.startswith(self.text) or len(full) <= len(self.text):
            return ""
        piece, self.text = full[len(self.text):], full
        return piece


def _until(abandoned: Callable[[], bool]):
    """generate's stopping criteria: every row stops once `abandoned()` is true."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Abandoned(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):  # (B, T) -> (B,)
            return torch.full((input_ids.shape[0],), abandoned(), dtype=torch.bool, device=input_ids.device)
    return StoppingCriteriaList([Abandoned()])


class Finish(str):
    """A stream's finish reason ("stop", "length") with what the stream's end knows besides: `tokens`
    decoded (None: not counted, as by an upstream engine) and `run_dir`, the run that decoded it (set
    by a hot-swapping ServiceSlot)."""

    tokens: int | None
    run_dir: Path | None

    def __new__(cls, reason: str, tokens: int | None = None, run_dir: Path | None = None):
        self = super().__new__(cls, reason)
        self.tokens, self.run_dir = tokens, run_dir
        return self


def call_tokens(costs: list) -> int:
    """Tokens of one model call over rows of these costs (see Service.row_tokens): prompts are
    left-padded to the longest and every row runs the largest appended part (generate decodes
    max(max_tokens) for all rows), so rows x (longest prompt + largest appended). A plain int is a
    prompt with nothing appended."""
    pairs = [c if isinstance(c, tuple) else (c, 0) for c in costs]
    return len(pairs) * (max(p for p, _ in pairs) + max(a for _, a in pairs)) if pairs else 0


def first_batch(costs: list, budget: int, max_rows: int | None = None) -> int:
    """How many rows from the front (arrival order) go in the next model call: as many as keep
    `call_tokens` (the padded size of the forward) within `budget`, and at most `max_rows`; at
    least one (a row is never split, and task.max_length + serve.max_tokens bound it)."""
    pairs = [c if isinstance(c, tuple) else (c, 0) for c in costs]
    n, prompt, appended = 1, *(pairs[0] if pairs else (0, 0))
    while n < len(pairs) and (max_rows is None or n < max_rows):
        prompt, appended = max(prompt, pairs[n][0]), max(appended, pairs[n][1])
        if (n + 1) * (prompt + appended) > budget:
            break
        n += 1
    return n


def token_batches(costs: list, budget: int, max_rows: int | None = None) -> list[list[int]]:
    """All rows, in order, cut into model calls as `first_batch` cuts them."""
    groups, at = [], 0
    while at < len(costs):
        n = first_batch(costs[at:], budget, max_rows)
        groups.append(list(range(at, at + n)))
        at += n
    return groups


def is_blank(text: str | None) -> bool:
    """Whether a text holds nothing to read: only spaces, control and invisible format characters (a NUL,
    a zero-width space). A label or an answer for it would be a confident guess, logged as an answer."""
    return not text or all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Zs", "Zl", "Zp") for c in text)


def request_example(fmt: PromptFormat, prompt: str | None = None, messages: list[dict] | None = None) -> Example:
    """A request as an Example: a completion prompt, or a chat whose last user turn is the input
    (the whole conversation kept for chat-tuned models). ValueError (the client's 400) for a chat
    with no user text when the model answers only the last user turn."""
    if messages is not None:
        last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
        if fmt.task_type != "chat" and is_blank(last):
            # The last user turn is the whole input here: without one the model would answer nothing.
            raise ValueError("the messages hold no user message with text; this model answers the last user message")
        return Example(last or "", "", "request", messages=messages if fmt.task_type == "chat" else None)
    if fmt.task_type == "classification" and is_blank(prompt):
        raise ValueError("the prompt is empty; give the text to classify")
    return Example(prompt or "", "", "request")


def _left_padded(prompts: list[list[int]], pad_id: int, device) -> dict:
    from tunesmith.models.tokens import left_pad

    ids, mask = left_pad(prompts, pad_id)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _cut(tok, done: Completion, stops: list[str]) -> Completion:
    """`done` cut at its first stop string (finish "stop"), counting the tokens decoded up to the one that
    completed the stop string, as a stream of the same answer counts them. Re-encoding the cut text
    counted more tokens than were generated (an undecodable byte's U+FFFD encodes as several)."""
    text, found = cut_at_stop(done.text, stops)
    if not found:
        return done
    if not done.ids:  # decoded elsewhere: no tokens to count, and never more than were generated
        return Completion(text, "stop", done.prompt_tokens, min(done.completion_tokens,
                                                                len(tok.encode(text, add_special_tokens=False))))
    # The answer replayed as its stream runs (the same pieces through the same scanner): the tokens counted
    # are those the stream decodes before it stops. Quadratic in the answer's length, as the stream is.
    pieces, scanner, produced = PieceDecoder(tok, []), StopScanner(stops), 0
    for token in done.ids:
        produced += 1
        if scanner.feed(pieces.add(token))[1]:
            break
    return Completion(text, "stop", done.prompt_tokens, produced, done.ids[:produced])


def _completion(tok, row: list[int], n_prompt: int, limit: int) -> Completion:
    # The first end-of-turn token ends the answer (generate pads a row only after it). A pad token sampled
    # before it is part of the answer, as it is in a stream of the same request.
    stops = set(stop_ids(tok))
    end = next((i for i, t in enumerate(row) if t in stops), len(row))
    kept, finish = (row[:end], "stop") if end < limit else (row[:limit], "length")
    # Not stripped: a completion's leading space belongs to it (prompt + text is the whole), and a stream
    # of the same answer sends every piece as decoded.
    return Completion(tok.decode(kept, skip_special_tokens=True), finish, n_prompt, len(kept), tuple(kept))


def load_service(target: Path, variant: str | None = None, max_new_tokens: int = 64) -> Service:
    """The model to serve: for a run directory the variant chosen by `tunesmith optimize` (or
    `variant` by name, `fp32` for the run's own model); otherwise a model name or checkpoint."""
    started = time.perf_counter()
    target = Path(target)
    if (target / "model" / "tunesmith.json").is_file():
        name, path = _variant_path(target, variant)
        predictor = load_variant(path, max_new_tokens)
        from tunesmith.config import load_config

        project = load_config(target / "config.yaml", check_files=False)
        return Service(project.name, predictor, name, time.perf_counter() - started, target)
    if (target / "model").is_dir() and (target / "config.yaml").is_file():  # a run that lost its metadata
        from tunesmith.errors import RunDirError

        raise RunDirError("the run's model folder lacks tunesmith.json", str(target / "model" / "tunesmith.json"),
                          "restore the file, or train the run again")
    return _plain_service(str(target), started, max_new_tokens)


def _variant_path(run_dir: Path, variant: str | None) -> tuple[str, Path]:
    from tunesmith.errors import InputError

    chosen = run_dir / "optimize.json"
    if variant is None:
        selected = fsio.read_json(chosen).get("selected") if chosen.is_file() else None
        variant = selected or "fp32"
    if variant == "fp32":
        return "fp32", run_dir / "model"
    path = run_dir / "variants" / variant
    if not (path / "variant.json").is_file():
        raise InputError(f"the run has no variant '{variant}'", "--variant",
                         "run `tunesmith optimize RUN_DIR`, or serve fp32")
    measured = run_dir / "variants.json"  # the last optimize's variants: a folder an earlier one left is kept
    listed = fsio.read_json(measured, list) if measured.is_file() else []  # (it may have taken a training)
    if not any(isinstance(row, dict) and row.get("name") == variant for row in listed):
        raise InputError(f"the variant '{variant}' is not among those the last optimize measured ({measured})",
                         "--variant", f"run `tunesmith optimize RUN_DIR --variants {variant}` to measure it again, "
                         "or serve one it lists")
    return variant, path


def _plain_service(name: str, started: float, max_new_tokens: int) -> Service:
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.models.resolve import resolve_model
    from tunesmith.optimize.engines import lm_predictor

    path = resolve_model(name)
    model = load_model(path)
    # Prompts are cut to fit (and token prompts refused past) 2,048 tokens or the model's context if shorter.
    limit = min(2048, context_length(model) or 2048)
    fmt = PromptFormat(task_type="chat", instruction="", labels=None, list_labels=False, max_length=limit)
    predictor = lm_predictor(model, load_tokenizer(path), fmt, max_new_tokens)
    return Service(name, predictor, "base", time.perf_counter() - started)
