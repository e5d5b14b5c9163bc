"""Try it: a playground against a finished run, side by side with its base model.

The fine-tuned side is the run as `tunesmith serve RUN_DIR` serves it (serve/service.py load_service:
the variant `tunesmith optimize` selected, else the run's own model); the base side is the base
model's weights with the run's tokenizer and the user's own prompt format, as the eval stage
computes its baseline (evaluate/stage.py). Classification answers a label and per-label
probabilities for both; generation and chat stream both answers as server-sent events.

Models are loaded in a worker thread and cached (at most MAX_RUNS runs, least recently used first
out, closed when evicted and when the app stops); each model answers one call at a time, at most
MAX_ACTIVE requests run at once, and every body and text is bounded. User text goes to the models
through the Service API only, which never parses it as control tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunesmith import fsio
from tunesmith.cli.ui.layout import esc, page
from tunesmith.cli.ui.runs_pages import run_dir
from tunesmith.cli.ui.security import csrf, read_capped
from tunesmith.config import ServeConfig
from tunesmith.errors import TunesmithError
from tunesmith.serve.replies import error
from tunesmith.serve.routes import unicode_text
from tunesmith.serve.service import Service, load_service

router = APIRouter()
log = logging.getLogger("tunesmith.ui")

_SERVE = ServeConfig()                # `tunesmith serve`'s default limits
MAX_BODY = _SERVE.max_body_bytes      # bytes of one request body
MAX_TOKENS = _SERVE.max_tokens        # tokens one answer may ask for
MAX_CHARS = 20_000                    # characters of one text or message (the prompt format cuts at task.max_length)
MAX_MESSAGES = 64                     # messages of one chat
MAX_RUNS = 2                          # runs whose models (fine-tuned + base) stay loaded
MAX_ACTIVE = 4                        # playground requests answering at once; more: 503
SIDES = ("tuned", "base")


# -- request bodies ----------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run: str = Field(min_length=1, max_length=1024)


class ClassifyBody(_Body):
    """POST /api/play/classify."""

    text: str = Field(min_length=1, max_length=MAX_CHARS)

    @field_validator("text")
    @classmethod
    def _unicode(cls, v: str) -> str:
        return unicode_text(v)


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_CHARS)

    @field_validator("content")
    @classmethod
    def _unicode(cls, v: str) -> str:
        return unicode_text(v)


class GenerateBody(_Body):
    """POST /api/play/generate: a `prompt`, or chat `messages` (the base side's own history in
    `base_messages`, when given, so each side sees its own earlier answers)."""

    prompt: str | None = Field(None, min_length=1, max_length=MAX_CHARS)
    messages: list[Message] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    base_messages: list[Message] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int = Field(64, ge=1, le=MAX_TOKENS)

    @field_validator("prompt")
    @classmethod
    def _unicode(cls, v: str | None) -> str | None:
        return unicode_text(v)

    @model_validator(mode="after")
    def _one(self) -> GenerateBody:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        if self.base_messages is not None and self.messages is None:
            raise ValueError("`base_messages` goes with `messages`")
        return self

    def side_messages(self, side: str) -> list[dict] | None:
        chosen = self.base_messages if side == "base" and self.base_messages is not None else self.messages
        return None if chosen is None else [m.model_dump() for m in chosen]


async def read_body(request: Request, model: type[BaseModel]):
    """`model` from the JSON body, read at most MAX_BODY bytes (413 beyond it, 400 when invalid)."""
    body = await read_capped(request, MAX_BODY)
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise HTTPException(400, f"{where}: {first.get('msg', 'invalid value')}") from None


# -- the loaded models ---------------------------------------------------------------------------------
@dataclass
class Loaded:
    """One run's two services; each answers one call at a time (its lock)."""

    run: Path
    tuned: Service
    base: Service | None
    base_error: str | None
    locks: dict = field(default_factory=lambda: {side: threading.Lock() for side in SIDES})

    def service(self, side: str) -> Service | None:
        return self.tuned if side == "tuned" else self.base

    def close(self) -> None:
        """Close both services once their calls in progress are done."""
        for side in SIDES:
            service = self.service(side)
            if service is not None:
                with self.locks[side]:
                    service.close()


def base_service(run: Path, max_new_tokens: int = 64) -> Service:
    """The run's base model as a Service: the base weights, the run's tokenizer and the prompt format
    the user's task gives (the eval stage's baseline: evaluate/stage.py)."""
    from tunesmith.config import load_config
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.optimize.engines import lm_predictor
    from tunesmith.tasks.prompts import build_format, read_prompt_format
    from tunesmith.train.finetuned import read_meta, run_base_path

    started = time.perf_counter()
    model_dir = run / "model"
    meta = read_meta(model_dir)
    base_path = run_base_path(model_dir, meta)  # where load_finetuned finds the base weights
    project = load_config(run / "config.yaml", check_files=False)
    tokenizer = load_tokenizer(model_dir)
    labels = read_prompt_format(model_dir / "prompt.json").labels
    fmt = build_format(project.task, labels, tokenizer)
    predictor = lm_predictor(load_model(base_path), tokenizer, fmt, max_new_tokens)
    return Service(f"{project.name} (base)", predictor, "base", time.perf_counter() - started)


def load_run(run: Path) -> Loaded:
    """Both services of `run` (the base side None, with the reason, when its weights cannot be loaded)."""
    tuned = load_service(run)
    base, reason = None, None
    try:
        base = base_service(run)
    except (TunesmithError, OSError, ValueError) as e:  # the base model moved or is not in the offline cache
        reason = f"the base model could not be loaded: {e}"
    return Loaded(run, tuned, base, reason)


class Services:
    """The loaded runs, least recently used first out: at most `size` runs' models in memory."""

    def __init__(self, size: int = MAX_RUNS, loader=load_run):
        self.size, self.loader = size, loader
        self.entries: OrderedDict[tuple, Loaded] = OrderedDict()
        self.guard = threading.Lock()     # the dict
        self.loading = threading.Lock()   # one load at a time: two runs never load at once
        self.slots = threading.BoundedSemaphore(MAX_ACTIVE)

    def get(self, run: Path) -> Loaded:
        """The run's services, loaded on first use (call in a worker thread: loading takes seconds)."""
        key = _stamp(run)
        with self.loading:
            with self.guard:
                if key in self.entries:
                    self.entries.move_to_end(key)
                    return self.entries[key]
            loaded = self.loader(run)
            evicted = []
            with self.guard:
                self.entries[key] = loaded
                while len(self.entries) > self.size:
                    evicted.append(self.entries.popitem(last=False)[1])
        for old in evicted:
            old.close()
        return loaded

    def close(self) -> None:
        """Close every loaded service (the app stops)."""
        with self.guard:
            entries, self.entries = list(self.entries.values()), OrderedDict()
        for loaded in entries:
            loaded.close()


def _stamp(run: Path) -> tuple:
    """The cache key: the run, and when its model and its optimize choice last changed (a run
    trained again or optimized again is loaded again)."""
    times = tuple(p.stat().st_mtime_ns if p.exists() else 0
                  for p in (run / "model" / "tunesmith.json", run / "optimize.json"))
    return (str(run), *times)


def services(request: Request) -> Services:
    """The app's cache, made on first use; the app closes it when it stops (its shutdown hooks)."""
    state = request.app.state
    with _MAKE:
        cache = getattr(state, "play_services", None)
        if cache is None:
            cache = state.play_services = Services()
            hooks = getattr(state, "shutdown_hooks", None)
            if hooks is None:
                hooks = state.shutdown_hooks = []
            hooks.append(cache.close)
    return cache


_MAKE = threading.Lock()


def finished_run(request: Request, rel: str) -> Path:
    """The run `rel` under the root; 404 unless it has a trained model."""
    run = run_dir(request, rel)
    if not (run / "model" / "tunesmith.json").is_file():
        raise HTTPException(404, f"the run '{rel}' has no trained model yet")
    return run


async def _loaded(request: Request, rel: str) -> Loaded:
    run = finished_run(request, rel)
    try:
        return await asyncio.to_thread(services(request).get, run)
    except TunesmithError as e:
        raise HTTPException(400, e.line().removeprefix("error: ")) from None


class _Slot:
    """One of MAX_ACTIVE request slots, or a 503 when all are taken."""

    def __init__(self, cache: Services):
        if not cache.slots.acquire(blocking=False):
            raise HTTPException(503, "the playground is busy: try again in a moment")
        self.cache, self.held = cache, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.cache.slots.release()


# -- routes ----------------------------------------------------------------------------------------------
@router.post("/api/play/classify", dependencies=[Depends(csrf)])
async def classify(request: Request) -> JSONResponse:
    """{tuned: {label, probabilities}, base: {label, probabilities} or {error}} for one text."""
    body = await read_body(request, ClassifyBody)
    slot = _Slot(services(request))
    try:
        loaded = await _loaded(request, body.run)
        if not loaded.tuned.labels:
            return error(400, "this run is not a classifier: use /api/play/generate", "invalid_request_error")
        answers = await asyncio.gather(*(asyncio.to_thread(_classify_one, loaded, side, body.text) for side in SIDES))
    finally:
        slot.release()
    return JSONResponse(dict(zip(SIDES, answers)))


def _classify_one(loaded: Loaded, side: str, text: str) -> dict:
    service = loaded.service(side)
    if service is None:
        return {"error": loaded.base_error}
    with loaded.locks[side]:
        label, probabilities = service.classify([text])[0]
    return {"label": label, "probabilities": probabilities}


@router.post("/api/play/generate", dependencies=[Depends(csrf)])
async def generate(request: Request) -> StreamingResponse:
    """Both answers streamed as server-sent events: `{"side", "text"}` per piece, `{"side", "finish"}`
    (or `{"side", "error"}`) when a side ends, then `[DONE]`."""
    body = await read_body(request, GenerateBody)
    slot = _Slot(services(request))
    try:
        loaded = await _loaded(request, body.run)
        examples = {side: (loaded.service(side) or loaded.tuned).example(prompt=body.prompt,
                                                                            messages=body.side_messages(side))
                    for side in SIDES}
    except ValueError as e:  # a chat with no user text for a model that answers the last user turn
        slot.release()
        raise HTTPException(400, str(e)) from None
    except BaseException:
        slot.release()
        raise
    cancelled, queue = threading.Event(), asyncio.Queue()
    loop, left = asyncio.get_running_loop(), [len(SIDES)]
    ended = threading.Lock()

    def side_done() -> None:  # the slot is free once both decoders stopped
        with ended:
            left[0] -= 1
            if left[0] == 0:
                slot.release()
    for side in SIDES:
        produce = _producer(loaded, side, (examples[side], body.max_tokens), cancelled, (loop, queue), side_done)
        loop.run_in_executor(None, produce)
    return StreamingResponse(_events(queue, cancelled), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _producer(loaded: Loaded, side: str, job: tuple, cancelled: threading.Event, channel: tuple, done):
    """The decoding loop of one side, for a worker thread: ("piece", side, text)... then
    ("end", side, finish) or ("error", side, message)."""
    (example, limit), (loop, queue) = job, channel

    def put(*item) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def produce() -> None:
        try:
            service = loaded.service(side)
            if service is None:
                return put("error", side, loaded.base_error)
            with loaded.locks[side]:
                pieces = service.stream(example, limit, cancelled)
                while True:
                    try:
                        put("piece", side, next(pieces))
                    except StopIteration as end:
                        return put("end", side, end.value or "stop")
        except Exception as e:  # the page shows it on that side; the log has the details
            log.exception("playground: the %s model failed", side)
            put("error", side, f"the model failed ({type(e).__name__})")
        finally:
            done()
    return produce


async def _events(queue: asyncio.Queue, cancelled: threading.Event):
    ended = 0
    try:
        while ended < len(SIDES):
            kind, side, value = await queue.get()
            if kind == "piece":
                yield _sse({"side": side, "text": value})
            else:
                ended += 1
                yield _sse({"side": side, "finish" if kind == "end" else "error": value})
        yield "data: [DONE]\n\n"
    finally:
        cancelled.set()  # the page went away or both ended: the decoders stop at their next token


def _sse(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


@router.get("/play", response_class=HTMLResponse)
async def play_page(request: Request, run: str = "") -> HTMLResponse:
    """The playground of one run: a form for its task and the two answers side by side."""
    if not run:
        return page(request, "Try it", "<h1>Try it</h1><p class='error'>Open a run from the <a href='/'>Runs</a> "
                                       "page and press <em>Try it</em>.</p>", status_code=400)
    path = finished_run(request, run)
    rel = path.relative_to(request.app.state.ui.root).as_posix()
    task = _task_type(path)
    link = esc(quote(rel, safe="/"))
    body = (f"<p class='crumbs'><a href='/'>Runs</a> / <a href='/runs/{link}'>{esc(rel)}</a> / try it</p>"
            f"<h1>Try it</h1><p class='muted'>The fine-tuned model as <code>tunesmith serve</code> serves it, beside "
            "its base model with the same prompt. The first answer loads both models (a few seconds).</p>"
            f"<section id='play' data-run='{esc(rel)}' data-task='{esc(task)}' data-max-chars='{MAX_CHARS}'>"
            f"{_form(task)}<p id='play-message' role='status'></p>"
            "<table class='play'><thead><tr><th>fine-tuned</th><th>base model</th></tr></thead>"
            "<tbody><tr><td id='play-tuned'></td><td id='play-base'></td></tr></tbody></table></section>")
    return page(request, "Try it", body, scripts=["play.js"])


def _task_type(run: Path) -> str:
    try:
        fmt = fsio.read_json(run / "model" / "prompt.json")
    except (OSError, ValueError):
        return "generation"
    return fmt.get("task_type", "generation") if isinstance(fmt, dict) else "generation"


def _form(task: str) -> str:
    if task == "classification":
        field_html = "<label>Text <textarea id='play-input' rows='4' cols='80' required></textarea></label>"
        button = "Classify"
    elif task == "chat":
        field_html = ("<label>Your message <textarea id='play-input' rows='3' cols='80' required></textarea></label>"
                      "<button id='play-clear' type='button' class='secondary'>New conversation</button>")
        button = "Send"
    else:
        field_html = "<label>Prompt <textarea id='play-input' rows='4' cols='80' required></textarea></label>"
        button = "Generate"
    tokens = ("" if task == "classification" else
              f"<label>Max new tokens <input id='play-max-tokens' type='number' min='1' max='{MAX_TOKENS}' "
              "value='64'></label>")
    return (f"<form id='play-form'>{field_html}{tokens}<div class='actions'>"
            f"<button id='play-go' type='submit'>{button}</button></div></form>")
