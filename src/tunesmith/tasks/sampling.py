"""Decoding settings applied the same way in eval and serve: Hugging Face `generate` keywords, a
seed scoped to one call, one sampled token for the server's streaming loop, and stop strings.

Stop strings are searched with `str.find` over a bounded number of bounded strings (see
config.GenerationSettings): linear in the text, and no pattern is ever built from user text.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.generation import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tunesmith.config import GenerationSettings

GREEDY = GenerationSettings()


def generate_kwargs(settings: GenerationSettings | None) -> dict:
    """Keywords for `model.generate`. None or the defaults give exactly `do_sample=False` (greedy, as
    before these settings existed), so a model's own generation_config is not overridden by defaults."""
    s = settings or GREEDY
    kw: dict = {"do_sample": not s.greedy}
    if not s.greedy:
        # top_k 0 is passed explicitly: HF's default generation_config samples from the top 50 otherwise.
        kw.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
    if s.repetition_penalty != 1.0:
        kw["repetition_penalty"] = s.repetition_penalty
    return kw


@contextmanager
def seeded(settings: GenerationSettings | None, device: torch.device) -> Iterator[None]:
    """Run the block with the RNG seeded from `settings.seed` and restore the caller's RNG state after,
    so a seeded call repeats exactly and leaves other random streams (training, dropout) untouched.
    Greedy or unseeded settings change nothing."""
    if settings is None or settings.greedy or settings.seed is None:
        yield
        return
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(settings.seed)
        yield


def logits_processors(settings: GenerationSettings) -> LogitsProcessorList:
    """The processors `generate` builds for these settings, in its order (penalty, then warpers)."""
    out = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if not settings.greedy:
        if settings.temperature != 1.0:
            out.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            out.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            out.append(TopPLogitsWarper(settings.top_p))
    return out


def step_generator(settings: GenerationSettings, device: torch.device) -> torch.Generator | None:
    """A generator of its own for a token-by-token loop (a stream), seeded as `seeded` seeds the global
    one, so the loop draws what `generate` draws without touching the RNG other calls share."""
    if settings.greedy:
        return None
    gen = torch.Generator(device=device)
    if settings.seed is None:
        gen.seed()
    else:
        gen.manual_seed(settings.seed)
    return gen


def next_token(logits: torch.Tensor, seen: torch.Tensor, settings: GenerationSettings,
               processors: LogitsProcessorList, generator: torch.Generator | None = None) -> int:
    """One decoding step as `generate` takes it: logits (1, V) of the last position, `seen` (1, T) the
    prompt and tokens so far (for the repetition penalty); argmax when greedy, else a sample."""
    scores = processors(seen, logits.float())  # (1, V)
    if settings.greedy:
        return int(scores[0].argmax())
    return int(torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator)[0, 0])


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class StopScanner:
    """Stop strings over a text that arrives in pieces (a stream): `feed` returns what may be sent now,
    holding back a tail that could be the start of a stop string, and whether a stop string was met.
    Each piece is searched from just before the end of what was already searched: linear overall."""

    def __init__(self, stops: list[str]):
        self.stops, self.hold = list(stops), max((len(s) for s in stops), default=1) - 1
        self.text, self.sent, self.searched = "", 0, 0

    def feed(self, piece: str) -> tuple[str, bool]:
        self.text += piece
        start = max(0, self.searched - self.hold)
        hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            return self._send(min(hits)), True
        self.searched = len(self.text)
        return self._send(max(self.sent, len(self.text) - self.hold)), False

    def rest(self) -> str:
        """What was held back, once the text has ended without a stop string."""
        return self._send(len(self.text))

    def _send(self, upto: int) -> str:
        out, self.sent = self.text[self.sent:upto], upto
        return out
