"""A model served by another process that speaks the OpenAI completions API (vLLM's server for
traffic beyond one process), with tunesmith in front as a sidecar: the same app, routes, API keys,
limits, request log, metrics and drift as the built-in engine, only the forward passes happen
upstream.

The sidecar renders each request with the run's own prompt format (instruction, label list, chat
template: what the model was fine-tuned on) and sends the rendered text to the upstream's
`/v1/completions`, greedy, so vLLM and the built-in engine see the same prompt.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tunesmith import fsio
from tunesmith.data.examples import Example
from tunesmith.errors import EngineError
from tunesmith.serve.service import Completion, request_example
from tunesmith.tasks.prompts import PromptFormat, render_prompt

TIMEOUT = httpx.Timeout(300.0, connect=5.0)
HEALTH_PATH = "/v1/models"  # answered by vLLM, llama.cpp, TGI and tunesmith's own server once loaded


class RemoteService:
    """Duck-types `Service` for the app: name, variant, labels, run_dir, example, complete, stream.

    It does not score labels (`scores_labels` is False): per-label probabilities need one scored
    continuation per label, which the OpenAI API does not offer; /v1/classify says so.
    """

    scores_labels = False
    threads = 8  # streams relayed at once; batches of requests go upstream together (see complete)

    def __init__(self, name: str, run_dir: Path | None, model_dir: Path, upstream: str, parallel: int = 16):
        from tunesmith.models.load import load_tokenizer

        started = time.perf_counter()
        self.name, self.run_dir, self.upstream = name, run_dir, upstream.rstrip("/")
        self.variant = f"upstream {self.upstream}"
        self.tokenizer = load_tokenizer(model_dir)  # the chat template only: no weights in this process
        self.fmt = PromptFormat.from_json(fsio.read_json(model_dir / "prompt.json"))
        self.client = httpx.Client(base_url=self.upstream, timeout=TIMEOUT)
        self.served_name = upstream_model(self.client)
        self.pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="upstream")
        self.load_seconds = time.perf_counter() - started

    @property
    def labels(self) -> list[str] | None:
        return self.fmt.labels

    def example(self, prompt: str | None = None, messages: list[dict] | None = None) -> Example:
        return request_example(self.fmt, prompt, messages)

    def request_body(self, example: Example, max_tokens: int, stream: bool = False) -> dict:
        return {"model": self.served_name, "prompt": render_prompt(self.tokenizer, self.fmt, example),
                "max_tokens": max_tokens, "temperature": 0, "stream": stream}

    def complete(self, examples: list[Example], max_tokens: list[int]) -> list[Completion]:
        """One upstream request per example, sent together: the upstream batches them itself."""
        return list(self.pool.map(self._complete_one, examples, max_tokens))

    def _complete_one(self, example: Example, max_tokens: int) -> Completion:
        try:
            r = self.client.post("/v1/completions", json=self.request_body(example, max_tokens))
        except httpx.HTTPError as e:
            raise EngineError(f"upstream unreachable: {type(e).__name__}") from e
        if r.status_code != 200:
            raise EngineError(f"upstream answered {r.status_code}")
        answer = r.json()
        choice, usage = answer["choices"][0], answer.get("usage") or {}
        return Completion(choice["text"].strip(), choice.get("finish_reason") or "stop",
                          usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))

    def stream(self, example: Example, max_tokens: int, cancelled: threading.Event) -> Iterator[str]:
        """Text pieces relayed from the upstream's event stream; closes it when `cancelled` is set."""
        with self.client.stream("POST", "/v1/completions", json=self.request_body(example, max_tokens, True)) as r:
            if r.status_code != 200:
                raise EngineError(f"upstream answered {r.status_code}")
            for line in r.iter_lines():
                if cancelled.is_set():
                    return
                piece = _event_text(line)
                if piece is None:
                    return
                if piece:
                    yield piece

    def classify(self, texts: list[str]):
        raise EngineError("per-label scoring needs the built-in engine")

    def ready(self) -> bool:
        try:
            return self.client.get(HEALTH_PATH, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def _event_text(line: str) -> str | None:
    """The text of one server-sent event line ('' for keep-alives and other lines; None at [DONE])."""
    if not line.startswith("data:"):
        return ""
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    event = json.loads(data)
    if "error" in event:
        raise EngineError("upstream stream failed")
    return event["choices"][0].get("text") or ""


def upstream_model(client: httpx.Client) -> str:
    """The name the upstream serves its model under (the first of /v1/models)."""
    try:
        models = client.get(HEALTH_PATH).json()["data"]
        return models[0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
        raise EngineError(f"the upstream at {client.base_url} lists no model on {HEALTH_PATH}") from e


def wait_ready(url: str, timeout: float = 900.0,
               process: subprocess.Popen | None = None, poll: float = 1.0) -> None:
    """Block until the upstream lists its model; fail early if the upstream process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise EngineError(f"the upstream engine exited with status {process.returncode} before it was ready")
        try:
            if httpx.get(url.rstrip("/") + HEALTH_PATH, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(poll)
    raise EngineError(f"the upstream engine at {url} was not ready after {timeout:.0f} s")


def vllm_command(model: Path, port: int, served_name: str) -> list[str]:
    """vLLM's OpenAI-compatible server on loopback: only the sidecar talks to it."""
    return ["vllm", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", served_name, "--generation-config", "vllm"]
