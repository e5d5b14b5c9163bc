"""How a micro-batch of requests becomes model calls: rows in arrival order, each call within the
token budget and the pacer's row count, each request answered as soon as its last row is done."""

from __future__ import annotations

import time

from tunesmith.cores import CoreShare
from tunesmith.serve.service import Service, first_batch

FIRST_ROWS = 4  # rows of the first model call, before any was timed


class Pacer:
    """Seconds per row of recent model calls, so that one call is cut to what fits in `cap_s`
    (a quarter of the request deadline): on a slow or busy CPU a call of many rows would outlast
    the deadline of every request in it, and none would be answered."""

    def __init__(self, cap_s: float):
        self.cap_s, self.per_row = cap_s, 0.0

    def max_rows(self) -> int:
        """Rows that fit in `cap_s` at the recent pace; FIRST_ROWS before any call was timed, so that
        the pace is measured on a small call (on a busy CPU an unmeasured call of 32 rows outlasted
        every deadline in it, and kept the model from the requests queued behind it)."""
        return max(1, int(self.cap_s / self.per_row)) if self.per_row > 0 else FIRST_ROWS

    def observe(self, rows: int, seconds: float) -> None:
        """Fold one call of `rows` rows that took `seconds` into the pace."""
        now = seconds / max(rows, 1)
        self.per_row = now if self.per_row == 0 else 0.7 * self.per_row + 0.3 * now


def run_batch(service: Service, kind: str, items: list, deliver, alive, budget: int, pacer: Pacer,
              cores: CoreShare | None = None) -> None:
    """The model calls for a batch of requests (on the model thread): rows in arrival order, each
    call within `budget` tokens (rows x (longest prompt + largest answer or max_tokens), see
    service.call_tokens) and the pacer's row count, each on the threads `cores` leaves it; a request is
    answered (`deliver`) as soon as its last row is done, and rows of requests that are no longer
    waiting (`alive` False: gone, or past the deadline) are never computed."""
    rows, owner, call = _rows(service, kind, items)
    if not hasattr(service, "row_tokens"):  # an upstream engine batches and bounds memory itself
        out = call(rows, None)
        for i, result in enumerate(_regroup(out, owner, len(items)) if kind == "classify" else out):
            deliver(i, result)
        return
    costs, results = service.row_tokens(kind, rows), [None] * len(rows)
    left = [sum(1 for o in owner if o == i) for i in range(len(items))]
    pending = list(range(len(rows)))
    while pending := [r for r in pending if alive(owner[r])]:
        part = pending[:first_batch([costs[r] for r in pending], budget, pacer.max_rows())]
        if cores is not None:
            cores.fit()
        started = time.monotonic()
        # A completion stops decoding once no request of its call is waiting any more (gone, or past its deadline)
        gone = (lambda part=part: not any(alive(owner[r]) for r in part)) if kind == "complete" else None
        for r, result in zip(part, call([rows[r] for r in part], gone)):
            results[r] = result
        if gone is None or not gone():  # a call cut short for nobody's sake would make rows look cheap
            pacer.observe(len(part), time.monotonic() - started)
        pending = pending[len(part):]
        for o in dict.fromkeys(owner[r] for r in part):
            left[o] -= sum(1 for r in part if owner[r] == o)
            if left[o] == 0:
                deliver(o, [results[r] for r in range(len(rows)) if owner[r] == o] if kind == "classify"
                        else results[o])


def _rows(service: Service, kind: str, items: list):
    """The batch's rows, the request each row belongs to, and the model call that takes a list of rows."""
    if kind == "classify":
        rows = [t for texts in items for t in texts]
        owner = [i for i, texts in enumerate(items) for _ in texts]
        return rows, owner, lambda part, _: service.classify(part)
    return items, list(range(len(items))), lambda part, gone: _complete(service, part, gone)


def _complete(service: Service, part: list[tuple], gone=None) -> list:
    """Completions of (example, max_tokens[, sampling]) rows; the sampling list goes to the engine only
    when some row carries settings (routes leave plain greedy requests without), `gone` (stop decoding:
    Service.complete's `abandoned`) only when given."""
    sampling = [it[2] if len(it) > 2 else None for it in part]
    examples, limits = [it[0] for it in part], [it[1] for it in part]
    extra = {"abandoned": gone} if gone is not None else {}
    if all(s is None for s in sampling):
        return service.complete(examples, limits, **extra)
    return service.complete(examples, limits, sampling, **extra)


def _regroup(results: list, owner: list[int], n: int) -> list:
    """Flat per-text results back into one list per classify request."""
    out: list = [[] for _ in range(n)]
    for o, r in zip(owner, results):
        out[o].append(r)
    return out
