"""LLM-as-judge (optional, off by default): rubric grading of single answers and of answer pairs.

The judge is any OpenAI-compatible chat endpoint (`eval.judge.endpoint`, key from the environment
variable named by `api_key_env`) or a local model (`eval.judge.model`, loaded like the project's
model). Pairwise verdicts are asked twice with the answers' positions swapped; a model wins a pair
only when both orders prefer it, so a judge that favours the first (or second) position cancels out
into ties instead of biasing the result.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Callable

from tunesmith.config import JudgeConfig
from tunesmith.errors import InputError

SINGLE = """{rubric}

Question:
{question}

Reference answer:
{reference}

Answer to grade:
{answer}

Reply with one line "Score: N" where N is an integer from 1 (worst) to 10 (best)."""

PAIR = """{rubric}

Question:
{question}

Reference answer:
{reference}

Answer A:
{a}

Answer B:
{b}

Which answer is better? Reply with one line: "Verdict: A", "Verdict: B" or "Verdict: tie"."""

Ask = Callable[[str], str]


@dataclass
class JudgeResult:
    single: dict
    pairwise: dict


def make_asker(cfg: JudgeConfig) -> Ask:
    """A function prompt -> reply text, for the configured endpoint or local model."""
    if cfg.endpoint:
        return _endpoint_asker(cfg)
    return _local_asker(cfg)


def _endpoint_asker(cfg: JudgeConfig) -> Ask:
    import httpx

    key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    client = httpx.Client(base_url=cfg.endpoint.rstrip("/"), headers=headers, timeout=cfg.timeout_s)

    def ask(prompt: str) -> str | None:
        body = {"model": cfg.model or "judge", "temperature": 0, "messages": [{"role": "user", "content": prompt}]}
        with client.stream("POST", "/chat/completions", json=body) as reply:
            raw = _bounded_body(reply)
        if reply.status_code != 200:
            text = raw[:200].decode("utf-8", "replace")
            raise InputError(f"judge endpoint answered HTTP {reply.status_code}: {text}",
                             "eval.judge.endpoint", "check the URL, model name and API key")
        return _reply_text(raw)
    return ask


MAX_REPLY_BYTES = 1_000_000  # a judge's one-line verdict in a chat completion is a few hundred bytes


def _bounded_body(reply) -> bytes:
    """The reply's body, read up to MAX_REPLY_BYTES (an endpoint that streams without end is cut off)."""
    raw = b""
    for chunk in reply.iter_bytes():
        raw += chunk
        if len(raw) > MAX_REPLY_BYTES:
            raise InputError(f"judge endpoint answered more than {MAX_REPLY_BYTES:,} bytes", "eval.judge.endpoint",
                             "point it at an OpenAI-compatible chat completions server")
    return raw


def _reply_text(raw: bytes) -> str | None:
    """choices[0].message.content of an OpenAI chat completion (None when the content is null);
    InputError for a body of another shape: the endpoint's answer is untrusted input."""
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):
        raise InputError("judge endpoint's reply is not an OpenAI chat completion (no choices[0].message.content)",
                         "eval.judge.endpoint", "point it at an OpenAI-compatible chat completions server") from None
    return content if isinstance(content, str) or content is None else None


def _local_asker(cfg: JudgeConfig) -> Ask:
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.models.resolve import resolve_model
    from tunesmith.models.tokens import encode_chat, text_ids
    from tunesmith.tasks.generation import generate

    path = resolve_model(cfg.model)
    tokenizer, model = load_tokenizer(path), load_model(path).eval()

    def ask(prompt: str) -> str:
        # The prompt quotes model answers and references: literal text, never control tokens.
        if tokenizer.chat_template:
            ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}])
        else:
            ids = text_ids(tokenizer, prompt + "\n")
        return generate(model, tokenizer, [ids], max_new_tokens=16)[0]
    return ask


# Judge replies are untrusted text of any length: only this much of the start is read (the prompts ask
# for one line), and the patterns' quantifiers are bounded, so parsing is linear-time. Two adjacent
# unbounded \s* would make "score" + N spaces cost O(N^2).
REPLY_PREFIX = 2000
_SCORE = re.compile(r"score\s{0,8}[:=]?\s{0,8}(\d+)", re.I)
_ANY_SCORE = re.compile(r"\b(10|[1-9])\b")
_VERDICT = re.compile(r"verdict\s{0,8}[:=]?\s{0,8}(A|B|tie)\b", re.I)
_LEADING_VERDICT = re.compile(r"\s*(A|B|tie)\b", re.I)  # anchored (match): one scan


def parse_score(reply: str) -> int | None:
    """The 1-10 score in a judge's reply ("Score: N", else the first number 1-10); None if there is none."""
    if not isinstance(reply, str):  # a malformed endpoint answer (e.g. null content) grades nothing
        return None
    reply = reply[:REPLY_PREFIX]
    m = _SCORE.search(reply) or _ANY_SCORE.search(reply)
    return min(10, max(1, int(m.group(1)))) if m else None


def parse_verdict(reply: str) -> str | None:
    """The verdict A, B or tie in a judge's reply ("Verdict: X", or a reply that starts with X); else None."""
    if not isinstance(reply, str):
        return None
    reply = reply[:REPLY_PREFIX]
    m = _VERDICT.search(reply) or _LEADING_VERDICT.match(reply)
    if not m:
        return None
    v = m.group(1)
    return "tie" if v.lower() == "tie" else v.upper()


def judge_answers(ask: Ask, rubric: str, questions: list[str], references: list[str], baseline: list[str],
                  finetuned: list[str], mode: str = "both") -> JudgeResult:
    """Mean 1-10 scores per model (single) and win/tie/loss of the fine-tuned model (pairwise, swapped)."""
    single, pairwise = {}, {}
    if mode in ("single", "both"):
        for name, answers in (("baseline", baseline), ("finetuned", finetuned)):
            scores = [parse_score(ask(SINGLE.format(rubric=rubric, question=q, reference=r, answer=a)))
                      for q, r, a in zip(questions, references, answers)]
            valid = [s for s in scores if s is not None]
            single[name] = {"mean_score": round(sum(valid) / len(valid), 4) if valid else None,
                            "graded": len(valid), "unparsed": len(scores) - len(valid)}
    if mode in ("pairwise", "both"):
        pairwise = _pairwise(ask, rubric, questions, references, baseline, finetuned)
    return JudgeResult(single, pairwise)


def _pairwise(ask: Ask, rubric: str, questions, references, baseline, finetuned) -> dict:
    outcomes, consistent = [], 0
    for q, r, b, t in zip(questions, references, baseline, finetuned):
        first = parse_verdict(ask(PAIR.format(rubric=rubric, question=q, reference=r, a=t, b=b)))   # tuned is A
        second = parse_verdict(ask(PAIR.format(rubric=rubric, question=q, reference=r, a=b, b=t)))  # tuned is B
        tuned_first = {"A": "win", "B": "loss", "tie": "tie"}.get(first)
        tuned_second = {"B": "win", "A": "loss", "tie": "tie"}.get(second)
        consistent += tuned_first == tuned_second and tuned_first is not None
        # Only a preference that survives the swap counts; anything else is a tie.
        outcomes.append(tuned_first if tuned_first == tuned_second and tuned_first else "tie")
    n = max(len(outcomes), 1)
    return {"pairs": len(outcomes), **{o: round(outcomes.count(o) / n, 4) for o in ("win", "tie", "loss")},
            "position_consistency": round(consistent / n, 4)}
