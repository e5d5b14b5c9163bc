"""Scoring speed: BANKING77's test set (77 labels, 3,080 messages) with SmolLM2-135M-Instruct.

Four ways to score the 77 labels of each message, run side by side:
- constrained_pruned (task.label_scoring: constrained_pruned): constrained scoring that runs a group
  of labels sharing a first token only while the group's probability exceeds the best label's; the
  same argmax and winner's probability; timed on the full set (median of --repeats);
- constrained (task.label_scoring: constrained): the probability that decoding restricted to the
  label set produces each label; only the 47 token positions where labels branch are run, the LM
  head only over the allowed tokens; timed on the full set (once);
- sequence (the default): the log-probability of every label token after one prompt forward whose
  KV cache all labels share; timed on a sample, scaled;
- naive: one full forward of prompt + label per (example, label) pair, batched over an example's
  labels; timed on a smaller sample, scaled. It gives the same scores as sequence scoring.

    python benchmarks/eval_speed.py [--examples 3080] [--sequence-examples 64] [--naive-examples 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tunesmith import hardware  # noqa: E402
from tunesmith.config import TaskConfig  # noqa: E402
from tunesmith.data.examples import Example  # noqa: E402
from tunesmith.models.load import load_model, load_tokenizer  # noqa: E402
from tunesmith.models.resolve import resolve_model  # noqa: E402
from tunesmith.tasks.classification import right_pad, score_labels  # noqa: E402
from tunesmith.tasks.label_trie import LabelTrie  # noqa: E402
from tunesmith.tasks.predict import encode_prompts, predict  # noqa: E402
from tunesmith.tasks.prompts import build_format, encode_answer  # noqa: E402


def load(n: int) -> tuple[list[Example], list[str]]:
    with open(ROOT / "tests" / "data" / "banking77" / "test.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:n]
    labels = sorted({r["category"] for r in rows})
    return [Example(r["text"], r["category"], f"test.csv:{i + 2}") for i, r in enumerate(rows)], labels


@torch.inference_mode()
def naive_scores(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> torch.Tensor:
    """One forward of prompt + label for every label of every example (labels of one example batched)."""
    out = torch.zeros(len(prompts), len(answers))
    for i, prompt in enumerate(prompts):
        seqs = [prompt + a for a in answers]
        ids, mask = right_pad(seqs, pad_id)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)  # (L, T, V)
        for j, a in enumerate(answers):
            pos = torch.arange(len(prompt) - 1, len(prompt) + len(a) - 1)
            out[i, j] = logp[j, pos, torch.tensor(a)].sum()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=3080)
    ap.add_argument("--naive-examples", type=int, default=16)
    ap.add_argument("--sequence-examples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timings of pruned constrained scoring (median printed)")
    args = ap.parse_args()
    path = resolve_model("smollm2-135m-instruct")
    tokenizer, model = load_tokenizer(path), load_model(path).eval()
    examples, labels = load(args.examples)
    task = TaskConfig(type="classification", instruction="Classify the customer message into one banking intent.")
    fmt = build_format(task, labels, tokenizer)
    prompts = encode_prompts(tokenizer, fmt, examples)
    answers = [encode_answer(tokenizer, fmt, lab) for lab in labels]
    bf16 = hardware.use_bf16("auto", torch.device("cpu"))
    print(f"{len(examples)} examples, {len(labels)} labels, prompt tokens median "
          f"{sorted(map(len, prompts))[len(prompts) // 2]}, label tokens max {max(map(len, answers))}, "
          f"bf16 {bf16}, threads {torch.get_num_threads()}", flush=True)
    def timed(mode: str) -> tuple[float, list[str], list[dict]]:
        started = time.perf_counter()  # through predict(), as the eval stage scores: batches of similar lengths
        out = predict(model, tokenizer, dataclasses.replace(fmt, label_scoring=mode), examples,
                      batch_size=args.batch_size, autocast=bf16, progress=mode)
        return time.perf_counter() - started, out.texts, out.probabilities

    times = []
    for _ in range(args.repeats):
        seconds, pruned, pruned_probs = timed("constrained_pruned")
        times.append(seconds)
    t_pruned = statistics.median(times)
    t_constrained, constrained, probs = timed("constrained")
    winner_diff = max(abs(p[w] - q[w]) for p, q, w in zip(probs, pruned_probs, constrained))
    with hardware.autocast(bf16, torch.device("cpu")):
        sample = prompts[: args.sequence_examples]
        started = time.perf_counter()
        sequence = score_labels(model, sample, answers, tokenizer.pad_token_id, batch_size=args.batch_size)
        t_sequence = (time.perf_counter() - started) * len(prompts) / len(sample)
        few = prompts[: args.naive_examples]
        started = time.perf_counter()
        naive = naive_scores(model, few, answers, tokenizer.pad_token_id)
        t_naive = (time.perf_counter() - started) * len(prompts) / len(few)
    n = len(prompts)
    acc = sum(p == e.target for p, e in zip(constrained, examples)) / n
    agree_seq = sum(p == labels[i] for p, i in zip(constrained, sequence.argmax(-1).tolist())) / len(sample)
    agree_naive = (sequence[: len(few)].argmax(-1) == naive.argmax(-1)).float().mean().item()
    print(f"pruned constrained label scoring (tunesmith, task.label_scoring: constrained_pruned): {t_pruned:.1f} s "
          f"for {n} examples, median of {len(times)} ({', '.join(f'{t:.1f}' for t in times)}) "
          f"({n / t_pruned:.1f} ex/s); same argmax as constrained on "
          f"{sum(p == c for p, c in zip(pruned, constrained)) / n:.4f}, winner's probability within {winner_diff:.4f}")
    print(f"constrained label scoring (tunesmith, task.label_scoring: constrained): {t_constrained:.1f} s for {n} "
          f"examples ({n / t_constrained:.1f} ex/s); base-model accuracy {acc:.4f}; "
          f"{LabelTrie.build(answers).positions()} label positions per example")
    print(f"sequence label scoring (tunesmith default, shared prompt KV cache): {t_sequence:.1f} s, scaled from "
          f"{len(sample)} examples; same argmax as constrained on {agree_seq:.3f} of them")
    print(f"naive loop (one forward per example x label): {t_naive:.1f} s, scaled from {len(few)} examples; "
          f"same scores as sequence scoring (max |diff| {float((sequence[: len(few)] - naive).abs().max()):.3f}, "
          f"argmax agreement {agree_naive:.3f})")
    print(f"speed-up vs naive: constrained_pruned x{t_naive / t_pruned:.1f}, "
          f"constrained x{t_naive / t_constrained:.1f}, "
          f"sequence x{t_naive / t_sequence:.1f}")


if __name__ == "__main__":
    main()
