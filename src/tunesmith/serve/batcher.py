"""Dynamic micro-batching: concurrent requests of one kind share a model call.

The model runs on one worker thread (a model is not safe to call from two threads at once, and on a
2-core CPU two calls would only fight over the cores). While it runs, new requests queue; the next
call takes up to `max_batch` of them, waiting at most `max_wait_ms` for more when few are queued.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


class MicroBatcher:
    """`await submit(kind, item)` -> that item's result from `run_batch(kind, items) -> results`."""

    def __init__(self, run_batch: Callable[[str, list], list], max_batch: int, max_wait_ms: float,
                 executor: ThreadPoolExecutor, on_batch: Callable[[str, int], None] | None = None):
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait_ms / 1000
        self.executor, self.on_batch = executor, on_batch
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None

    async def submit(self, kind: str, item):
        if self.task is None or self.task.done():
            self.queue = asyncio.Queue()
            self.task = asyncio.get_running_loop().create_task(self._loop())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((kind, item, future))
        return await future

    async def _loop(self) -> None:
        while True:
            batch = [await self.queue.get()]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            for kind in dict.fromkeys(k for k, _, _ in batch):
                await self._run(kind, [(item, fut) for k, item, fut in batch if k == kind])

    async def _run(self, kind: str, entries: list) -> None:
        live = [(item, fut) for item, fut in entries if not fut.done()]  # the client may have gone
        if not live:
            return
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.run_batch, kind, [item for item, _ in live])
        except Exception as e:  # one failing batch fails its own requests, never the server
            for _, fut in live:
                if not fut.done():
                    fut.set_exception(e)
            return
        if self.on_batch:
            self.on_batch(kind, len(live))
        for (_, fut), result in zip(live, results):
            if not fut.done():
                fut.set_result(result)
