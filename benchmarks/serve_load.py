"""Load test of `tunesmith serve` on loopback, next to a one-request-at-a-time loop over a plain
transformers text-generation pipeline on the same model and texts.

    python benchmarks/serve_load.py RUN_DIR [--clients 32] [--seconds 60] [--variant NAME] [--baseline-seconds 30]
                                    [--cpu-hog]

The server runs in its own process (`tunesmith serve`, the variant `optimize` selected unless
--variant says otherwise); N client tasks post /v1/classify requests back to back for the given time.
With --cpu-hog a busy-loop process runs beside the server the whole time (another CPU-heavy job on
the machine), stopped at the end. Each answer is counted by HTTP status; a request with no answer is a
timeout (the client waits the server's serve.request_timeout_s plus 30 s) or a connection reset.
Then, with the server stopped, the baseline loads the run's fine-tuned model with transformers + peft
and answers the same texts one at a time with `pipeline("text-generation")` (greedy, as many new
tokens as the longest label), which is how the model would be served without tunesmith
(--baseline-seconds 0 skips it).
Prints requests/s, p50/p95 latency of the 200s, the slowest answer, counts per status, timeouts and
resets for the server, requests/s for the baseline, and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def texts_of(run: Path) -> list[str]:
    return [json.loads(line)["input"] for line in (run / "data" / "test.jsonl").read_text().splitlines()
            if line.strip()]


async def drive(url: str, texts: list[str], clients: int, seconds: float, client_timeout: float = 60) -> dict:
    """N clients posting back to back for `seconds`: latencies of the 200s, every answer by status,
    the slowest answer, and requests that got no answer (timeouts, connection resets, other)."""
    latencies, statuses, slowest, failures = [], {}, 0.0, {"timeouts": 0, "resets": 0, "other": 0}
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=client_timeout, limits=limits) as client:
        async def one_client(seed: int) -> None:
            nonlocal slowest
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    r = await client.post("/v1/classify", json={"text": rng.choice(texts)})
                except httpx.TimeoutException:
                    failures["timeouts"] += 1
                    continue
                except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.ConnectError):
                    failures["resets"] += 1
                    continue
                except httpx.HTTPError:
                    failures["other"] += 1
                    continue
                took = (time.perf_counter() - started) * 1000
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                slowest = max(slowest, took)
                if r.status_code == 200:
                    latencies.append(took)
                else:
                    await asyncio.sleep(min(float(r.headers.get("Retry-After", 1)), 1))  # a polite client backs off
        started = time.monotonic()
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        elapsed = time.monotonic() - started
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    errors = sum(n for code, n in statuses.items() if code != 200) + sum(failures.values())
    return {"requests": len(latencies), "errors": errors, "statuses": statuses, "seconds": round(elapsed, 1),
            "per_second": round(len(latencies) / elapsed, 2), "p50_ms": round(q[49], 1), "p95_ms": round(q[94], 1),
            "max_ms": round(slowest, 1), **failures}


def _busy_loop() -> None:
    while True:
        pass


def start_cpu_hog() -> multiprocessing.Process:
    """Another CPU-heavy process on the machine: one busy loop (a full core), until terminated."""
    hog = multiprocessing.Process(target=_busy_loop, daemon=True)
    hog.start()
    return hog


def request_timeout(run: Path) -> float:
    """The server's per-request deadline, serve.request_timeout_s of the run's config."""
    from tunesmith.serve.server import serve_settings

    return serve_settings(run)[0].request_timeout_s


def serve(run: Path, port: int, variant: str | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tunesmith", "serve", str(run), "--port", str(port)]
    if variant:
        cmd += ["--variant", variant]
    # The server's stderr goes to a file: a pipe nobody reads would block it once full.
    log = tempfile.NamedTemporaryFile("w+", prefix="serve_load-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stderr=log, text=True)
    proc.log_path = log.name
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise SystemExit(Path(log.name).read_text())
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
    ap.add_argument("--baseline-seconds", type=float, default=30, help="0 skips the baseline")
    ap.add_argument("--cpu-hog", action="store_true", help="run a busy-loop process beside the server")
    args = ap.parse_args()
    texts = texts_of(args.run_dir)
    port = free_port()
    limit = request_timeout(args.run_dir)
    proc = serve(args.run_dir, port, args.variant)
    hog = start_cpu_hog() if args.cpu_hog else None
    try:
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz").json()
        print(f"server: {ready['model']} variant {ready['variant']}, {args.clients} clients for {args.seconds:g} s"
              f"{', CPU hog running' if hog else ''}; deadline {limit:g} s, client timeout {limit + 30:g} s")
        server = asyncio.run(drive(f"http://127.0.0.1:{port}", texts, args.clients, args.seconds, limit + 30))
        alive = httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    finally:
        if hog is not None:
            hog.terminate()
            hog.join(10)
        proc.terminate()
        proc.wait(30)
    lines = Path(proc.log_path).read_text(errors="replace").splitlines()
    print(f"server log ({proc.log_path}): {len(lines)} lines" + "".join(f"\n  {line}" for line in lines[-5:]))
    answered = sum(server["statuses"].values())
    print(f"tunesmith serve: {server['requests']} requests answered 200 in {server['seconds']} s = "
          f"{server['per_second']} req/s, p50 {server['p50_ms']} ms, p95 {server['p95_ms']} ms; "
          f"{answered} answers by status {dict(sorted(server['statuses'].items()))}, slowest {server['max_ms']} ms "
          f"(deadline {limit:g} s; answered by deadline + 1 s: {server['max_ms'] <= limit * 1000 + 1000}); "
          f"timeouts {server['timeouts']}, "
          f"connection resets {server['resets']}, other failures {server['other']}; alive after: {alive}")
    if args.baseline_seconds <= 0:
        return
    base = baseline(args.run_dir, texts, args.baseline_seconds)
    print(f"plain transformers pipeline, one request at a time: {base['requests']} requests = {base['per_second']} "
          f"req/s, p50 {base['p50_ms']} ms")
    print(f"throughput ratio: {server['per_second'] / base['per_second']:.2f}x")


if __name__ == "__main__":
    main()
