"""Batch plans for token budgets and packing: which examples share a row, which rows share a batch.

Pure index arithmetic on example lengths (no tensors); `batching` turns a plan into tensors. Both
settings are off by default, and then `batching.length_grouped_batches` plans as before.

- `train.batch_tokens`: a batch takes rows while rows x longest row (the padded size, what
  the forward really costs) stays within the budget, instead of a fixed `train.batch_size`.
- `train.packing`: several examples share a row of at most `task.max_length` tokens (best-fit
  decreasing), so short answers stop paying for padding; attention stays inside each example
  (see `batching.collate_packed`). A batch then holds `train.batch_size` rows, or as many as the
  token budget allows.
"""

from __future__ import annotations

import bisect
import random


def pack_rows(indices: list[int], lengths: list[int], capacity: int,
              weights: list[float] | None = None) -> list[list[int]]:
    """Rows of example indices whose lengths sum to at most `capacity`, filled best-fit decreasing.

    Only examples of equal weight share a row, so every row keeps one weight (the loss weighs rows,
    see `loss.supervised_loss`). An example longer than `capacity` gets a row of its own.
    """
    classes: dict[float, list[int]] = {}
    for i in indices:
        classes.setdefault(weights[i] if weights else 1.0, []).append(i)
    rows: list[list[int]] = []
    for members in classes.values():
        # sorted() is stable: equal lengths keep the shuffled order, so a seed gives one plan.
        rows += _best_fit(sorted(members, key=lambda i: lengths[i], reverse=True), lengths, capacity)
    return rows


def _best_fit(items: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """Each item into the open row with the least room that still holds it (a new row when none does)."""
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (tokens left, row index)
    for i in items:
        k = bisect.bisect_left(room, (lengths[i], -1))
        if k == len(room):
            rows.append([i])
            bisect.insort(room, (capacity - lengths[i], len(rows) - 1))
            continue
        left, r = room.pop(k)
        rows[r].append(i)
        bisect.insort(room, (left - lengths[i], r))
    return rows


def budget_batches(lengths: list[int], seed: int, group: int, batch_size: int, batch_tokens: int | None = None,
                   row_tokens: int | None = None, weights: list[float] | None = None) -> list[list[list[int]]]:
    """One epoch's batches, each a list of rows, each row a list of example indices.

    As in `length_grouped_batches`: indices are shuffled with `seed` and cut into groups of about
    `group` batches; inside a group, rows (packed when `row_tokens` is given, else one example each)
    are sorted by length and cut into batches; the batches are shuffled. Every index appears once.

    Args:
        batch_tokens: most rows x longest row per batch (None: `batch_size` rows per batch). A row
            longer than the budget (impossible once the config is validated) forms a batch alone.
        row_tokens: pack examples into rows of at most this many tokens (None: no packing).
        weights: per-example loss weights; only equal weights share a row.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    size = group * _examples_per_batch(lengths, batch_size, batch_tokens, row_tokens)
    batches = []
    for start in range(0, len(order), size):
        chunk = order[start:start + size]
        rows = pack_rows(chunk, lengths, row_tokens, weights) if row_tokens else [[i] for i in chunk]
        sizes = [sum(lengths[i] for i in row) for row in rows]
        longest_first = sorted(range(len(rows)), key=lambda r: sizes[r], reverse=True)
        batches += [[rows[r] for r in cut] for cut in _cut(longest_first, sizes, batch_size, batch_tokens)]
    rng.shuffle(batches)
    return batches


def _cut(rows: list[int], sizes: list[int], batch_size: int, batch_tokens: int | None) -> list[list[int]]:
    """Consecutive runs of `rows` (longest first, so a run's first row is its longest)."""
    if batch_tokens is None:
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    runs: list[list[int]] = []
    for r in rows:
        if runs and (len(runs[-1]) + 1) * sizes[runs[-1][0]] <= batch_tokens:
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs


def _examples_per_batch(lengths: list[int], batch_size: int, batch_tokens: int | None, row_tokens: int | None) -> int:
    """About how many examples a batch takes, to size the length-sorted groups."""
    mean = max(1, sum(lengths) // max(1, len(lengths)))
    tokens = batch_tokens or batch_size * (row_tokens or mean)
    return max(1, tokens // mean)
