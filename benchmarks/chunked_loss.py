"""Memory of one training step's loss on long answers over a large vocabulary: tunesmith's chunked head +
cross-entropy (train/loss.py) against transformers' own `model(..., labels=...)` loss, which builds the
(B, T, V) logits, and against tunesmith with chunking off.

A random 2-layer Llama-shaped model (hidden 576, Qwen2.5's 151,936-token vocabulary) so the head
dominates, 4 rows of 1,024 tokens, every token supervised (generation). Each measurement is a fresh
process (peak RSS cannot be reset reliably); forward + backward once, after one warm-up step on a
short batch. Prints the median peak RSS and seconds of each mode and the ratios.

    python benchmarks/chunked_loss.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

MODES = ("transformers", "tunesmith_unchunked", "tunesmith")


def worker(mode: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.train import loss as loss_module

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=151_936, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg)
    if mode == "tunesmith_unchunked":
        loss_module.CE_CHUNK = 10**9
    ids = torch.randint(0, cfg.vocab_size, (4, 1024))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def step(b):
        model.zero_grad(set_to_none=True)
        if mode == "transformers":
            loss = model(**b).loss
        else:
            loss = loss_module.supervised_loss(model, b)[0]
        loss.backward()
        return float(loss)

    step({k: v[:, :16] for k, v in batch.items()})  # warm-up: allocator and kernels
    started = time.perf_counter()
    value = step(batch)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "loss": value, "seconds": seconds, "peak_rss_mb": peak_mb}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", choices=MODES)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--worker", mode], capture_output=True, text=True,
                                 check=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("peak_rss_mb", "seconds", "loss")}
           for m, rs in runs.items()}
    print(f"{'mode':<22}{'peak RSS MB':>12}{'seconds':>9}{'loss':>9}   (median of {args.repeats})")
    for m in MODES:
        print(f"{m:<22}{med[m]['peak_rss_mb']:>12.0f}{med[m]['seconds']:>9.2f}{med[m]['loss']:>9.4f}")
    ref = med["transformers"]
    for m in MODES[1:]:
        print(f"{m} / transformers: peak RSS {med[m]['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x, "
              f"time {med[m]['seconds'] / ref['seconds']:.2f}x")


if __name__ == "__main__":
    main()
