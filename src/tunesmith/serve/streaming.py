"""Streamed completions (`"stream": true`): server-sent events in OpenAI's chunk format, decoded on
the model thread beside the micro-batcher, bounded on their own. Every chunk carries the answer's
`request_id`, as does the X-Tunesmith-Request-ID header; its request-log row is written when the
stream finishes (a stream the client abandons is not logged)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse

from tunesmith.errors import EngineError
from tunesmith.serve.batcher import Overloaded
from tunesmith.serve.replies import ANSWER_ID, error_body, new_answer_id, request_id
from tunesmith.serve.state import ServerState

log = logging.getLogger("tunesmith.serve")


async def open_stream(state: ServerState, example, limit: int, kind: str, request: Request,
                      on_done, sampling=None, answer_id: str | None = None, usage: bool = False) -> StreamingResponse:
    """Server-sent events, one chunk per decoded piece, then [DONE]; stops if the client goes.
    At most `serve.max_queue` streams wait or run at once. The headers go out with the first piece, so
    until then the answer is an ordinary one: 503 when it misses the request's deadline, 502 when the
    engine fails (EngineError), 500 for any other failure. After it only an error event can say so.
    `await on_done(pieces, finish_reason)` runs when the stream ends and returns its Completion, whose
    token counts a last chunk carries when `usage` (OpenAI's stream_options.include_usage). `sampling`
    (GenerationSettings, None for plain greedy) goes to the engine's stream. `answer_id` is the request_id
    of the answer (a new one when not given), in every chunk and the X-Tunesmith-Request-ID header."""
    if not state.streams.acquire(blocking=False):
        raise Overloaded("queue_full", "the server is at capacity (too many streams)", 1)
    cancelled = threading.Event()
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    loop.run_in_executor(state.executor, _producer(state, example, limit, cancelled, loop, queue, sampling))
    try:
        first = await asyncio.wait_for(queue.get(), max(0.0, request.state.deadline - time.monotonic()))
    except (asyncio.TimeoutError, asyncio.CancelledError) as e:
        cancelled.set()
        if isinstance(e, asyncio.CancelledError):
            raise
        raise Overloaded("deadline", "the request was not answered within serve.request_timeout_s", 1) from None
    if first[0] == "error":  # nothing sent yet: a 502 (EngineError's handler) or the guard's 500
        cancelled.set()
        raise first[1]
    answer_id = answer_id or new_answer_id()
    events = _events(_Chunks(state.service.name, kind, answer_id, usage), first, queue, cancelled, on_done,
                     request_id(request))
    return StreamingResponse(events, media_type="text/event-stream", headers={ANSWER_ID: answer_id})


def _producer(state: ServerState, example, limit: int, cancelled: threading.Event, loop, queue, sampling=None):
    """The decoding loop for the model thread: ("piece", text)... then ("end", finish) or ("error", exc)."""
    # Plain greedy requests call stream() as engines have always been called; settings only when given.
    extra = () if sampling is None else (sampling,)

    def produce():
        n = 0
        try:
            if state.cores is not None:
                state.cores.fit()
            pieces = iter([] if cancelled.is_set() else state.service.stream(example, limit, cancelled, *extra))
            while True:
                try:
                    piece = next(pieces)
                except StopIteration as end:  # the engine's finish reason, counted in tokens, when it returns one
                    finish = end.value
                    break
                n += 1
                loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece))
            # Engines that return none (a relayed upstream stream): one piece a token is the best guess.
            loop.call_soon_threadsafe(queue.put_nowait, ("end", finish or ("length" if n >= limit else "stop")))
        except Exception as e:  # raised or logged by the reader: before the first piece, or after it
            loop.call_soon_threadsafe(queue.put_nowait, ("error", e))
        finally:
            # The producer always ends (a cancelled one at its next token), so a slot never leaks.
            state.streams.release()
    return produce


async def _events(chunks: _Chunks, first, queue, cancelled, on_done, rid: str):
    """The stream's events; `rid` is the trace id for log lines."""
    pieces: list[str] = []
    what, value = first
    try:
        if chunks.kind != "text_completion":  # OpenAI's first chat chunk names the role, its content empty
            yield chunks.piece("", role=True)
        while True:
            if what == "piece":
                pieces.append(value)
                yield chunks.piece(value)
            elif what == "end":
                done = await on_done(pieces, value)
                yield chunks.piece(None, finish=value)
                if chunks.usage:
                    yield chunks.usage_chunk(done)
                yield "data: [DONE]\n\n"
                return
            else:  # the status (200) is sent: an error event is all server-sent events allow
                yield _error_event(value, rid)
                return
            what, value = await queue.get()
    finally:
        cancelled.set()  # the client went away or the stream ended: the decoder stops at its next token


class _Chunks:
    """The chunks of one stream, in OpenAI's format: each with the same id, model and answer id."""

    def __init__(self, model: str, kind: str, answer_id: str, usage: bool):
        self.model, self.kind, self.answer_id, self.usage = model, kind, answer_id, usage
        self.ident, self.created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def piece(self, text: str | None, finish: str | None = None, role: bool = False) -> str:
        if self.kind == "text_completion":
            choice = {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}
        else:
            delta = {"role": "assistant", "content": text} if role else {"content": text} if text else {}
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        # With include_usage every chunk but the last carries a null usage, as OpenAI's do.
        return self._event([choice], {"usage": None} if self.usage else {})

    def usage_chunk(self, done) -> str:
        """The last chunk asked for by include_usage: no choices, the stream's token counts."""
        return self._event([], {"usage": {"prompt_tokens": done.prompt_tokens,
                                          "completion_tokens": done.completion_tokens,
                                          "total_tokens": done.prompt_tokens + done.completion_tokens}})

    def _event(self, choices: list, extra: dict) -> str:
        return "data: " + json.dumps({"id": self.ident, "object": self.kind, "created": self.created,
                                      "model": self.model, "choices": choices, **extra,
                                      "request_id": self.answer_id}) + "\n\n"


def _error_event(exc: BaseException, rid: str) -> str:
    log.error("request %s: stream failed after its first piece: %s (error event sent)", rid, type(exc).__name__)
    code = 502 if isinstance(exc, EngineError) else 500
    message = "the model engine failed" if code == 502 else "internal error"
    return "data: " + json.dumps(error_body(code, message, "server_error")) + "\n\n"
