"""Dynamic micro-batching: concurrent requests of one kind share a model call.

The model runs on one worker thread (a model is not safe to call from two threads at once, and on a
2-core CPU two calls would only fight over the cores). While it runs, new requests queue; the next
call takes up to `max_batch` of them, waiting at most `max_wait_ms` for more when few are queued.

Overload has an answer: the queue holds at most `max_queue` requests (a request beyond it fails at
once with `Overloaded`), a request whose deadline falls before the requests already queued ahead of
it can be answered (at their measured average) fails at once too, and a request not answered by its deadline
fails with `Overloaded` (the app turns each into 503 with Retry-After). When a batch fails, each of
its requests is run again on its own, so one bad request fails only itself.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

MAX_RETRY_AFTER_S = 60


class Overloaded(Exception):
    """The request was not answered: `kind` "queue_full" (no room to wait) or "deadline" (not
    answered in time); `reason` says so in words."""

    def __init__(self, kind: str, reason: str, retry_after: int):
        super().__init__(reason)
        self.kind, self.reason, self.retry_after = kind, reason, retry_after


class MicroBatcher:
    """`await submit(kind, item, deadline)` -> that item's result, from
    `run_batch(kind, items, deliver, alive)` on the model thread (see `_call`)."""

    def __init__(self, run_batch: Callable[..., None], max_batch: int, max_wait_ms: float,
                 executor: ThreadPoolExecutor, on_batch: Callable[[str, int], None] | None = None,
                 max_queue: int = 64, rows: Callable[[str, Any], int] = lambda kind, item: 1):
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait_ms / 1000
        self.executor, self.on_batch, self.max_queue = executor, on_batch, max_queue
        self.rows = rows  # the model rows an item takes (a classify request of 50 texts: 50), for pricing
        self.waiting: deque = deque()  # (kind, item, future), at most max_queue
        self.wake: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        # Moving average of one model call per kind, for Retry-After: a generation call of 200 tokens takes
        # far longer than a classification call, so one average over both misjudged either queue.
        self.batch_seconds: dict[str, float] = {}
        self.row_seconds: dict[str, float] = {}  # moving average per answered row, for admission
        self.request_rows: dict[str, float] = {}  # moving average of rows per answered request

    async def submit(self, kind: str, item, deadline: float | None = None):
        """Queue `item` and wait for its result until `deadline` (time.monotonic()); raises
        Overloaded when the queue is full or the deadline passes, or the batch's own error."""
        if self.task is None or self.task.done():
            self.waiting, self.wake = deque(), asyncio.Event()
            self.task = asyncio.get_running_loop().create_task(self._loop())
        if len(self.waiting) >= self.max_queue:  # requests past their deadline or gone hold no place
            self.waiting = deque(e for e in self.waiting if not e[2].done())
        if len(self.waiting) >= self.max_queue:
            raise Overloaded("queue_full", "the server is at capacity (request queue full)", self.retry_after())
        self._refuse_hopeless(deadline)
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((kind, item, future))
        self.wake.set()
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return await asyncio.wait_for(future, left)  # cancels the future: the loop skips it
        except asyncio.TimeoutError:
            raise Overloaded("deadline", "the request was not answered within serve.request_timeout_s",
                             self.retry_after()) from None

    def _refuse_hopeless(self, deadline: float | None) -> None:
        """Overloaded("deadline") now, rather than at the deadline, when the requests queued ahead take
        longer than this one's time left, at each kind's average seconds per answered row (a request of
        50 texts is 50 rows). Without it a burst of slow requests queued whole: each waited out its
        timeout for a 503. This request's own share and the call running now are not counted, a queue
        holding a kind not yet measured is not priced, and a request with nothing queued ahead is always
        admitted (so the averages keep being measured, however slow one call was)."""
        if deadline is None:
            return
        requests, rows = self._queued()
        if not requests or any(k not in self.row_seconds for k in requests):
            return
        # Each kind at the cheaper of its two prices: per answered row, or per call of max_batch requests
        # (a price measured on calls of one row would overcharge a queue that will batch).
        wait = sum(min(rows[k] * self.row_seconds[k], self._batched_seconds(k, n, rows[k]))
                   for k, n in requests.items())
        if time.monotonic() + wait > deadline:
            raise Overloaded("deadline", f"the request would not be answered within serve.request_timeout_s "
                             f"({sum(requests.values())} queued ahead, about {wait:.1f} s of model work)",
                             self.retry_after())

    def _queued(self) -> tuple[Counter, Counter]:
        """(requests, rows) waiting per kind; requests past their deadline or gone hold no place."""
        requests: Counter = Counter()
        rows: Counter = Counter()
        for kind, item, fut in self.waiting:
            if not fut.done():
                requests[kind] += 1
                rows[kind] += self.rows(kind, item)
        return requests, rows

    def _batched_seconds(self, kind: str, requests: int, rows: int, default: float = 0.0) -> float:
        """`requests` of `kind` in calls of max_batch at the kind's average call time, scaled by how many
        rows they hold against the requests that call time was measured on (a call of 8 requests of 50
        texts takes about 50 times one of 8 single texts)."""
        per_request = self.request_rows.get(kind, 1.0)
        scale = (rows / requests) / per_request if requests and per_request > 0 else 1.0
        return math.ceil(requests / self.max_batch) * self.batch_seconds.get(kind, default) * scale

    def retry_after(self) -> int:
        """Seconds until the queue now waiting (and the call running) has likely been worked off (1 to 60):
        each kind's queued requests in calls of max_batch, at that kind's average call time (scaled by
        their rows, see _batched_seconds)."""
        requests, rows = self._queued()
        slowest = max(self.batch_seconds.values(), default=0.0)  # the call running now, of whatever kind
        wait = slowest + sum(self._batched_seconds(kind, n, rows[kind], slowest) for kind, n in requests.items())
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(wait)))

    async def _loop(self) -> None:
        while True:
            while not self.waiting:
                self.wake.clear()
                await self.wake.wait()
            batch = [self.waiting.popleft()]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                if self.waiting:
                    batch.append(self.waiting.popleft())
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            for kind in dict.fromkeys(k for k, _, _ in batch):
                await self._run(kind, [(item, fut) for k, item, fut in batch if k == kind])

    async def _run(self, kind: str, entries: list) -> None:
        live = [(item, fut) for item, fut in entries if not fut.done()]  # gone, or past its deadline
        if not live:
            return
        try:
            await self._call(kind, live)
        except Exception as e:
            left = [(item, fut) for item, fut in live if not fut.done()]
            if len(left) == 1:
                _settle(left[0][1], error=e)
                return
            for item, fut in left:  # which request failed it? each alone: only that one fails
                if not fut.done():
                    await self._run_alone(kind, item, fut)
            return
        if self.on_batch:
            self.on_batch(kind, len(live))

    async def _run_alone(self, kind: str, item, fut: asyncio.Future) -> None:
        try:
            await self._call(kind, [(item, fut)])
        except Exception as e:
            _settle(fut, error=e)
            return
        if self.on_batch:
            self.on_batch(kind, 1)

    async def _call(self, kind: str, entries: list) -> None:
        """`run_batch(kind, items, deliver, alive)` on the model thread: it calls `deliver(i, result)`
        as soon as item i is done (its request is answered then, not when the whole batch is) and
        skips items for which `alive(i)` is False (the client went, or the deadline passed)."""
        loop, futures = asyncio.get_running_loop(), [fut for _, fut in entries]

        delivered = [0, 0]  # rows, requests

        def deliver(i: int, result) -> None:
            delivered[0] += self.rows(kind, entries[i][0])
            delivered[1] += 1
            loop.call_soon_threadsafe(_settle, futures[i], result)

        def alive(i: int) -> bool:
            return not futures[i].done()  # a read of a flag set on the loop: at worst one call late
        started = time.monotonic()
        try:
            await loop.run_in_executor(self.executor, self.run_batch, kind, [item for item, _ in entries],
                                       deliver, alive)
        finally:
            took = time.monotonic() - started
            self.batch_seconds[kind] = 0.8 * self.batch_seconds.get(kind, took) + 0.2 * took
            if delivered[0]:  # requests skipped (gone, past their deadline) took no model time
                each, size = took / delivered[0], delivered[0] / delivered[1]
                self.row_seconds[kind] = 0.8 * self.row_seconds.get(kind, each) + 0.2 * each
                self.request_rows[kind] = 0.8 * self.request_rows.get(kind, size) + 0.2 * size
        for fut in futures:  # deliveries ran before this line (queued first): what is left got no result
            _settle(fut, error=RuntimeError("the model call gave no result"))


def _settle(fut: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
