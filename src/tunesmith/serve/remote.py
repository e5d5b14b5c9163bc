"""A model served by another process that speaks the OpenAI completions API (vLLM's server for
traffic beyond one process), with tunesmith in front as a sidecar: the same app, routes, API keys,
limits, request log, metrics and drift as the built-in engine, only the forward passes happen
upstream.

The sidecar renders each request with the run's own prompt format (instruction, label list, chat
template: what the model was fine-tuned on) and sends its token ids to the upstream's
`/v1/completions`, greedy, so vLLM and the built-in engine see the same tokens (user text as literal
characters: see models/tokens.py). Whatever the
upstream answers is checked: an answer that is not the OpenAI shape is an EngineError (HTTP 502),
never an internal error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tunesmith import fsio
from tunesmith.config import GenerationSettings
from tunesmith.data.examples import Example
from tunesmith.errors import EngineError, RunDirError
from tunesmith.serve.service import Completion, TokenPrompt, prompt_ids, request_example
from tunesmith.tasks.prompts import read_prompt_format

TIMEOUT = httpx.Timeout(300.0, connect=5.0)
HEALTH_PATH = "/v1/models"  # answered by vLLM, llama.cpp, TGI and tunesmith's own server once loaded
STOP_GRACE_S = 30.0  # how long a started engine may take to shut down before it is killed
# The values vLLM's `--max-lora-rank` accepts (vllm/config/lora.py MaxLoRARanks, v0.14: also 1; releases
# before it stop at 256), smallest first: the command asks for the smallest one that holds the adapter.
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# adapter_config.json fields vLLM's loader refuses or ignores (PEFTHelper reads one r and one alpha).
LORA_UNSUPPORTED = (("use_dora", "DoRA (use_dora)"), ("modules_to_save", "modules trained whole (modules_to_save)"),
                    ("bias", "trained biases (bias)"), ("rank_pattern", "per-module ranks (rank_pattern)"),
                    ("alpha_pattern", "per-module alphas (alpha_pattern)"),
                    ("trainable_token_indices", "trained token embeddings (trainable_token_indices)"),
                    ("layer_replication", "replicated layers (layer_replication)"))
EMBEDDING_MODULES = frozenset({"embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out"})
MERGED = "serve whole weights instead: `tunesmith optimize RUN_DIR --variants merged`"


class RemoteService:
    """Duck-types `Service` for the app: name, variant, labels, run_dir, example, complete, stream.

    It does not score labels (`scores_labels` is False): per-label probabilities need one scored
    continuation per label, which the OpenAI API does not offer; /v1/classify says so.
    """

    scores_labels = False
    samples = True  # sampling settings go upstream as request fields (vLLM takes all of them)
    threads = 8  # streams relayed at once; batches of requests go upstream together (see complete)

    def __init__(self, name: str, run_dir: Path | None, model_dir: Path, upstream: str, parallel: int = 16,
                 api_key: str | None = None, model: str | None = None):
        """`model`: the name to request upstream (a LoRA module's name on a vLLM serving several); it must
        be listed on the upstream's /v1/models (ModelNotListed otherwise). None: the first one listed."""
        from tunesmith.models.load import load_tokenizer

        started = time.perf_counter()
        self.name, self.run_dir, self.upstream = name, run_dir, upstream.rstrip("/")
        self.variant = f"upstream {self.upstream}"
        self.tokenizer = load_tokenizer(model_dir)  # the chat template only: no weights in this process
        self.fmt = read_prompt_format(model_dir / "prompt.json")
        self.client = httpx.Client(base_url=self.upstream, timeout=TIMEOUT, headers=_auth(api_key))
        self.served_name = upstream_model(self.client, model)
        self.pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="upstream")
        self.load_seconds = time.perf_counter() - started

    @property
    def labels(self) -> list[str] | None:
        return self.fmt.labels

    def example(self, prompt: str | list[int] | None = None,
                messages: list[dict] | None = None) -> Example | TokenPrompt:
        if isinstance(prompt, list):
            return TokenPrompt.checked(prompt, self.tokenizer, self.fmt.max_length)
        return request_example(self.fmt, prompt, messages)

    def request_body(self, example: Example | TokenPrompt, max_tokens: int, stream: bool = False,
                     sampling: GenerationSettings | None = None) -> dict:
        # Token ids, not text: the upstream would parse control tokens out of a text prompt, user text
        # included; these ids hold the template's control tokens and the user's text as literal characters.
        body = {"model": self.served_name, "prompt": prompt_ids(self.tokenizer, self.fmt, [example])[0],
                "max_tokens": max_tokens, "temperature": 0, "stream": stream}
        if sampling is not None:  # validated by the route; only what differs from greedy goes, and a given seed
            plain = GenerationSettings(seed=None).model_dump()
            body.update({k: v for k, v in sampling.model_dump().items() if v != plain[k]})
        return body

    def complete(self, examples: list[Example], max_tokens: list[int],
                 sampling: list[GenerationSettings | None] | None = None) -> list[Completion]:
        """One upstream request per example, sent together: the upstream batches them itself."""
        return list(self.pool.map(self._complete_one, examples, max_tokens, sampling or [None] * len(examples)))

    def _complete_one(self, example: Example, max_tokens: int, sampling: GenerationSettings | None) -> Completion:
        try:
            r = self.client.post("/v1/completions", json=self.request_body(example, max_tokens, sampling=sampling))
        except httpx.HTTPError as e:
            raise EngineError(f"upstream unreachable: {type(e).__name__}") from e
        if r.status_code != 200:
            raise EngineError(_status_message(r.status_code))
        return parse_completion(r.content)

    def stream(self, example: Example, max_tokens: int, cancelled: threading.Event,
               sampling: GenerationSettings | None = None) -> Iterator[str]:
        """Text pieces relayed from the upstream's event stream; closes it when `cancelled` is set."""
        body = self.request_body(example, max_tokens, True, sampling)
        with self.client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise EngineError(_status_message(r.status_code))
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


def parse_completion(body: bytes) -> Completion:
    """One OpenAI completion answer; EngineError (502) for anything else: not JSON, no choices,
    a text that is not a string, token counts that are not integers."""
    try:
        answer = json.loads(body)
        choice, usage = answer["choices"][0], answer.get("usage") or {}
        text, finish = choice["text"], choice.get("finish_reason") or "stop"
        counts = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
        raise EngineError("upstream sent an invalid answer (not an OpenAI completion)") from None
    if not isinstance(text, str) or not isinstance(finish, str) or not all(type(n) is int for n in counts):
        raise EngineError("upstream sent an invalid answer (wrong field types)")
    return Completion(text, finish, *counts)


def _event_text(line: str) -> str | None:
    """The text of one server-sent event line ('' for keep-alives and other lines; None at [DONE])."""
    if not line.startswith("data:"):
        return ""
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    try:
        event = json.loads(data)
        if "error" in event:
            raise EngineError("upstream stream failed")
        text = event["choices"][0].get("text") or ""
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
        raise EngineError("upstream sent an invalid stream event") from None
    if not isinstance(text, str):
        raise EngineError("upstream sent an invalid stream event")
    return text


def _auth(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _status_message(status: int) -> str:
    hint = " (it wants another API key: check --upstream-api-key-env)" if status in (401, 403) else ""
    return f"upstream answered {status}{hint}"


class ModelNotListed(EngineError):
    """The upstream answers /v1/models, but not with the name the sidecar was told to request."""


def upstream_model(client: httpx.Client, want: str | None = None) -> str:
    """The name to send as `model` upstream: `want`, checked against the upstream's /v1/models (a vLLM
    serving LoRA adapters lists its base first, so "the first one" would silently answer without the
    adapter), or the first one listed when `want` is None."""
    try:
        r = client.get(HEALTH_PATH)
    except httpx.HTTPError as e:
        raise EngineError(f"the upstream at {client.base_url} is unreachable: {type(e).__name__}") from None
    if r.status_code != 200:
        raise EngineError(f"the upstream at {client.base_url}: {HEALTH_PATH} {_status_message(r.status_code)}")
    try:
        names = [entry["id"] for entry in r.json()["data"]]
    except (ValueError, KeyError, TypeError):
        names = []
    names = [name for name in names if isinstance(name, str) and name]
    if not names:
        raise EngineError(f"the upstream at {client.base_url} lists no model on {HEALTH_PATH}")
    if want is None:
        return names[0]
    if want not in names:
        shown = ", ".join(repr(name) for name in names[:20]) + (", ..." if len(names) > 20 else "")
        raise ModelNotListed(f"the upstream at {client.base_url} does not serve '{want}' (its {HEALTH_PATH} lists "
                             f"{shown})")
    return want


def wait_ready(url: str, timeout: float = 900.0, process: subprocess.Popen | None = None,
               poll: float = 1.0, api_key: str | None = None) -> None:
    """Block until the upstream lists its model; fail early if the upstream process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise EngineError(f"the upstream engine exited with status {process.returncode} before it was ready")
        try:
            status = httpx.get(url.rstrip("/") + HEALTH_PATH, timeout=5, headers=_auth(api_key)).status_code
            if status == 200:
                return
            if status in (401, 403):  # up, but waiting will not change its mind about the key
                raise EngineError(f"the upstream at {url} {_status_message(status)}")
        except httpx.HTTPError:
            pass
        time.sleep(poll)
    raise EngineError(f"the upstream engine at {url} was not ready after {timeout:.0f} s")


def vllm_command(model: Path, port: int, served_name: str) -> list[str]:
    """vLLM's OpenAI-compatible server on loopback: only the sidecar talks to it."""
    return ["vllm", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", served_name, "--generation-config", "vllm"]


def lora_rank_bound(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds an adapter of rank `rank`."""
    for bound in LORA_RANKS:
        if rank <= bound:
            return bound
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest ({LORA_RANKS[-1]})")


def vllm_lora_command(base: Path, port: int, adapters: dict[str, Path], rank: int,
                      host: str = "127.0.0.1") -> list[str]:
    """vLLM serving `base` with LoRA adapters, each requested by its name (`model` = the name), all of
    them allowed in one batch (`--max-loras`), the slots sized for the largest rank among them."""
    modules = [lora_module_arg(name, path) for name, path in adapters.items()]
    return ["vllm", "serve", str(base), "--host", host, "--port", str(port), "--enable-lora",
            "--max-loras", str(len(adapters)), "--max-lora-rank", str(lora_rank_bound(rank)),
            "--lora-modules", *modules, "--generation-config", "vllm"]


def lora_module_arg(name: str, path: Path) -> str:
    """One `--lora-modules` item, in vLLM's JSON form (the fields of its LoRAModulePath: name, path).
    Never `NAME=PATH`: vLLM splits an item holding '=' and no ',' on every '=', and parses any other
    as JSON, so a path like `runs/lr=1e-4/` or one with a ',' would stop vLLM from starting. The JSON
    object holds a ',' between its two fields, so vLLM always parses it as JSON, whatever the path."""
    return json.dumps({"name": name, "path": str(path)})


def lora_adapter_rank(adapter_dir: Path, merged: str = MERGED) -> int:
    """The rank of the PEFT adapter in `adapter_dir`, after checking vLLM can load it as a LoRA module
    and compute what PEFT computes (vllm/lora/peft_helper.py refuses DoRA, modules_to_save and biases;
    it reads one rank and alpha, so per-module patterns would be silently wrong). `merged`: the hint
    for what vLLM cannot serve as an adapter (how to serve whole weights with the command given).

    Raises:
        RunDirError: naming adapter_config.json (or the weights file) and what vLLM cannot serve.
    """
    where = str(adapter_dir / "adapter_config.json")
    try:
        cfg = fsio.read_json(adapter_dir / "adapter_config.json")
    except (OSError, ValueError):
        raise RunDirError("no readable LoRA adapter config", where,
                          "give a run trained with train.method: lora") from None
    kind = cfg.get("peft_type") if isinstance(cfg, dict) else None
    if kind != "LORA":
        hint = merged if kind == "IA3" else "serve it with the built-in engine (`tunesmith serve RUN_DIR`)"
        raise RunDirError(f"vLLM serves LoRA adapters only, and this one is {kind}", where, hint)
    unsupported = [text for key, text in LORA_UNSUPPORTED if cfg.get(key) not in (None, False, {}, [], "none")]
    if unsupported:
        raise RunDirError(f"vLLM cannot serve this LoRA adapter as trained: it has {', '.join(unsupported)}",
                          where, merged)
    rank = cfg.get("r")
    if type(rank) is not int or not 1 <= rank <= LORA_RANKS[-1]:
        raise RunDirError(f"LoRA rank r={rank!r} is not one vLLM serves (1 to {LORA_RANKS[-1]})", where, merged)
    _check_lora_weights(adapter_dir / "adapter_model.safetensors", merged)
    return rank


def _check_lora_weights(weights: Path, hint: str) -> None:
    """Only LoRA A/B matrices, none on the embeddings or the output head: PEFT also saves resized
    embeddings here, which vLLM does not load (it serves every adapter on the base's vocabulary)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="numpy") as f:
            keys = list(f.keys())
    except (OSError, ValueError, RuntimeError) as e:
        raise RunDirError(f"cannot read the adapter's weights ({type(e).__name__})", str(weights), hint) from None
    for key in keys:
        module, _, tail = key.rpartition(".lora_")
        if tail not in ("A.weight", "B.weight"):
            raise RunDirError(f"the adapter holds weights vLLM does not load as LoRA ('{key}')", str(weights), hint)
        if module.rsplit(".", 1)[-1] in EMBEDDING_MODULES:
            raise RunDirError(f"the adapter trains the embeddings or the output head ('{key}'), which vLLM does "
                              "not serve as a LoRA module", str(weights), hint)


def start_engine(command: list[str], api_key: str) -> subprocess.Popen:
    """Start the engine in its own process group, so `stop_engine` reaches its workers too; the key
    goes in VLLM_API_KEY (vLLM's equivalent of `--api-key`), not argv, which every user can read.
    Through orphan_guard, the engine also gets SIGTERM if this process is killed outright."""
    guarded = [sys.executable, "-m", "tunesmith.serve.orphan_guard", str(os.getpid()), *command]
    return subprocess.Popen(guarded, env={**os.environ, "VLLM_API_KEY": api_key}, start_new_session=True)


def stop_engine(process: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM to the engine's process group, SIGKILL to what is left after `grace` seconds.

    The group is killed even when its leader exited in time: workers it left behind must not
    keep the GPU. Safe for a process that already exited.
    """
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(process, signal.SIGKILL)
    process.wait()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:  # the leader is our child, unreaped or just reaped: its pid still names only its group
        os.killpg(process.pid, sig)
        return
    except PermissionError:
        return
    except ProcessLookupError:
        pass  # no such group: the process, if still alive, does not lead one
    if process.poll() is None:
        process.send_signal(sig)
