"""Scoring speed: BANKING77's test set (77 labels, 3,080 messages) with SmolLM2-135M-Instruct.

tunesmith scores every label after one prompt forward per example (the prompt's KV cache, and the
system prompt shared by all examples, reused by all 77 candidates). The reference is the naive
loop: one full forward of prompt + label per (example, label) pair, batched over the labels of an
example. Both produce the same summed label log-probabilities; the naive loop runs on a sample
and its time is scaled to the full set. Prints both times, the ratio and the agreement of their
predictions on the sample.

    python benchmarks/eval_speed.py [--examples 3080] [--naive-examples 40]
"""

from __future__ import annotations

import argparse
import csv
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
from tunesmith.tasks.predict import encode_prompts  # noqa: E402
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
    ap.add_argument("--naive-examples", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
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
    with hardware.autocast(bf16, torch.device("cpu")):
        started = time.perf_counter()
        ours = score_labels(model, prompts, answers, tokenizer.pad_token_id, batch_size=args.batch_size,
                            progress="tunesmith")
        t_ours = time.perf_counter() - started
        sample = prompts[: args.naive_examples]
        started = time.perf_counter()
        naive = naive_scores(model, sample, answers, tokenizer.pad_token_id)
        t_naive = (time.perf_counter() - started) * len(prompts) / len(sample)
    agree = (ours[: len(sample)].argmax(-1) == naive.argmax(-1)).float().mean().item()
    accuracy = sum(labels[i] == e.target for i, e in zip(ours.argmax(-1).tolist(), examples)) / len(examples)
    print(f"tunesmith score_labels: {t_ours:.1f} s for {len(prompts)} examples ({len(prompts) / t_ours:.1f} ex/s); "
          f"base-model accuracy {accuracy:.4f}")
    print(f"naive loop: {t_naive:.1f} s scaled from {len(sample)} examples; argmax agreement on them {agree:.3f}, "
          f"max |score diff| {float((ours[: len(sample)] - naive).abs().max()):.3f}")
    print(f"speed-up x{t_naive / t_ours:.1f}")


if __name__ == "__main__":
    main()
