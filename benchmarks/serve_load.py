"""Load test of `tunesmith serve` on loopback, next to a one-request-at-a-time loop over a plain
transformers text-generation pipeline on the same model and texts.

    python benchmarks/serve_load.py RUN_DIR [--clients 32] [--seconds 60] [--variant NAME] [--baseline-seconds 30]

The server runs in its own process (`tunesmith serve`, the variant `optimize` selected unless
--variant says otherwise); N client tasks post /v1/classify requests back to back for the given time.
Then, with the server stopped, the baseline loads the run's fine-tuned model with transformers + peft
and answers the same texts one at a time with `pipeline("text-generation")` (greedy, as many new
tokens as the longest label), which is how the model would be served without tunesmith.
Prints requests/s, p50/p95 latency and errors for the server, requests/s for the baseline, and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def texts_of(run: Path) -> list[str]:
    return [json.loads(line)["input"] for line in (run / "data" / "test.jsonl").read_text().splitlines() if line.strip()]


async def drive(url: str, texts: list[str], clients: int, seconds: float) -> dict:
    latencies, errors, statuses = [], 0, {}
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def one_client(seed: int) -> None:
            nonlocal errors
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    r = await client.post("/v1/classify", json={"text": rng.choice(texts)})
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if r.status_code != 200:
                        errors += 1
                        continue
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append((time.perf_counter() - started) * 1000)
        started = time.monotonic()
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        elapsed = time.monotonic() - started
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {"requests": len(latencies), "errors": errors, "statuses": statuses, "seconds": round(elapsed, 1),
            "per_second": round(len(latencies) / elapsed, 2), "p50_ms": round(q[49], 1), "p95_ms": round(q[94], 1)}


def serve(run: Path, port: int, variant: str | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tunesmith", "serve", str(run), "--port", str(port)]
    if variant:
        cmd += ["--variant", variant]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise SystemExit(proc.stderr.read())
    raise SystemExit("server did not start")


def baseline(run: Path, texts: list[str], seconds: float) -> dict:
    """One request at a time through transformers' text-generation pipeline (plain model + adapter)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    meta = json.loads((run / "model" / "tunesmith.json").read_text())
    prompt = json.loads((run / "model" / "prompt.json").read_text())
    tok = AutoTokenizer.from_pretrained(run / "model")
    base = AutoModelForCausalLM.from_pretrained(meta["base_model_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run / "model") if meta["kind"] == "adapter" else base
    gen = pipeline("text-generation", model=model, tokenizer=tok)
    system = prompt["instruction"] + "\nAnswer with one of: " + ", ".join(prompt["labels"]) + "."
    new_tokens = max(len(tok(label)["input_ids"]) for label in prompt["labels"]) + 1
    rng, done, latencies = random.Random(0), 0, []
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        messages = [{"role": "system", "content": system}, {"role": "user", "content": rng.choice(texts)}]
        gen(messages, max_new_tokens=new_tokens, do_sample=False)
        latencies.append((time.perf_counter() - t0) * 1000)
        done += 1
    elapsed = time.monotonic() - started
    return {"requests": done, "per_second": round(done / elapsed, 2), "p50_ms": round(statistics.median(latencies), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--variant", default=None, help="variant to serve (default: the one optimize selected)")
    ap.add_argument("--baseline-seconds", type=float, default=30)
    args = ap.parse_args()
    texts = texts_of(args.run_dir)
    port = free_port()
    proc = serve(args.run_dir, port, args.variant)
    try:
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz").json()
        print(f"server: {ready['model']} variant {ready['variant']}, {args.clients} clients for {args.seconds:g} s")
        server = asyncio.run(drive(f"http://127.0.0.1:{port}", texts, args.clients, args.seconds))
        alive = httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"tunesmith serve: {server['requests']} requests in {server['seconds']} s = {server['per_second']} req/s, "
          f"p50 {server['p50_ms']} ms, p95 {server['p95_ms']} ms, errors {server['errors']} "
          f"(statuses {server['statuses']}), alive after: {alive}")
    base = baseline(args.run_dir, texts, args.baseline_seconds)
    print(f"plain transformers pipeline, one request at a time: {base['requests']} requests = {base['per_second']} "
          f"req/s, p50 {base['p50_ms']} ms")
    print(f"throughput ratio: {server['per_second'] / base['per_second']:.2f}x")


if __name__ == "__main__":
    main()
