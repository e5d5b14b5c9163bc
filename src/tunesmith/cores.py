"""torch's intra-op threads, sized to the cores other processes leave free (serving, training, scoring).

torch splits each operation over one thread per core and waits at a barrier for the slowest. When
another process keeps a core busy, the thread sharing that core runs a fraction of the time and every
operation waits for it: measured on a 2-core machine beside one busy-loop process, 32 classifications
took 29.1 s with two threads against 9.2 s with one (and 5.6 s with two, alone). So before each model
call, at most every half second, the CPU time other processes took since the last look (the machine's
busy time, steal included, less this process's own) decides how many threads to run: the cores there
are, less the cores others kept busy, at least one. Linux only; elsewhere, where this process may run
on only some of the machine's CPUs (their load says nothing then), or where OMP_NUM_THREADS or
MKL_NUM_THREADS is set (the count is the user's: a fixed count also keeps a run's arithmetic the same
under any load), the thread count is left alone. In a container limited by a CPU quota rather than by
affinity, /proc/stat shows the whole host: its neighbours count as others there too.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

# Seconds between looks: /proc reads are cheap, and 50 ticks (at 100 a second) judge a core well
# enough; a look before the first call must come soon after start, when a busy neighbour shows.
EVERY_S = 0.5
FIRST_LOOK_S = 0.2  # the span of the first look, taken when the process first needs threads
STALE_S = 5.0  # a span longer than this (an idle server) is looked at anew, over STALE_LOOK_S
STALE_LOOK_S = 0.1
# More threads only once the room has held this long: a neighbour busy in bursts would otherwise flip
# the count every look, and a call on too many threads beside it costs more (29.1 s against 9.2 s for
# 32 classifications) than one on too few alone (9.2 s against 5.6 s). Fewer threads take effect at once.
RISE_S = 1.0


def cpu_ticks() -> tuple[int, int] | None:
    """(busy ticks of the whole machine, ticks this process ran) from /proc; None where unreadable, or
    where this process may use only some of the machine's CPUs."""
    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) != os.cpu_count():
        return None
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()  # cpu user nice system idle iowait irq softirq steal ...
        with open("/proc/self/stat", "rb") as f:  # bytes: the process name may be any bytes
            own = f.read().rsplit(b")", 1)[1].split()  # after "pid (comm)": state is field 3
        if not fields or fields[0] != b"cpu" or len(fields) < 9 or len(own) < 13:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
        return user + nice + system + irq + softirq + steal, int(own[11]) + int(own[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


class CoreShare:
    """`fit()` before a model call sets torch's thread count to the cores others leave free."""

    def __init__(self, read: Callable[[], tuple[int, int] | None] = cpu_ticks,
                 set_threads: Callable[[int], None] | None = None, cores: int | None = None,
                 clock: Callable[[], float] = time.monotonic, every_s: float = EVERY_S,
                 get_threads: Callable[[], int] | None = None, cpus: int | None = None):
        import torch

        self.read, self.clock, self.every_s = read, clock, every_s
        self.set_threads = set_threads or torch.set_num_threads
        # The count is per OS thread (OpenMP's and MKL's settings are): each caller's is checked.
        self.get_threads = get_threads or (torch.get_num_threads if set_threads is None else lambda: self.threads)
        self.cores = self.threads = cores or torch.get_num_threads()
        # Logical CPUs others' busy time is counted against (torch may use fewer threads, e.g. one per
        # physical core): a neighbour on an idle hyperthread leaves torch its threads.
        self.cpus = cpus or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        first = read() if self.cores > 1 else None
        self.enabled = first is not None
        # The first look is now (the server's start), so the first model call already has a span to judge.
        self.last: tuple[float, int, int] | None = (clock(), *first) if first is not None else None
        self.room_since: float | None = None  # when the looks began to show room for more threads
        self.lock = threading.Lock()  # streams call from their own threads too

    def fit(self) -> int:
        """The thread count for the next call (set if it changed)."""
        if not self.enabled:
            return self.threads
        with self.lock:
            if self.last is not None and self.clock() - self.last[0] > STALE_S and self._was_idle():
                self._short_look()  # an idle span says nothing of the load a neighbour began since
            elif self.last is None or self.clock() - self.last[0] >= self.every_s:
                self._look()
            if self.get_threads() != self.threads:  # a thread this share has not set yet
                self.set_threads(self.threads)
            return self.threads

    def _was_idle(self) -> bool:
        """Whether this process ran under half a CPU since the last look (an idle server, not a long
        training step: that span is judged as it is, with no extra look and no wait)."""
        sample = self.read()
        if sample is None or self.last is None:
            return False
        span = self.clock() - self.last[0]
        return span > 0 and (sample[1] - self.last[2]) / (self.tick * span) < 0.5

    def _look(self, fresh: bool = False) -> None:
        """Fold the span since the last look into the thread count (the lock held); a `fresh` look (the
        first, or one after an idle span) is taken as it is, with no wait for room to hold."""
        now, sample = self.clock(), self.read()
        if sample is None:
            return
        if self.last is not None and now > self.last[0]:
            others = max(0, (sample[0] - self.last[1]) - (sample[1] - self.last[2]))  # ticks
            want = self.threads_for(others / (self.tick * (now - self.last[0])))
            if want <= self.threads or fresh:
                self.room_since = None
            elif self.room_since is None:
                self.room_since = self.last[0]  # room from the start of this span
            if self.room_since is not None and now - self.room_since < RISE_S:
                want = self.threads  # the room has not held long enough yet
            if want != self.threads:
                self.set_threads(want)
                self.threads, self.room_since = want, None
        self.last = (now, *sample)

    def settle(self, seconds: float = FIRST_LOOK_S) -> int:
        """A first look over `seconds` from now, before the first call: one call on too many threads
        beside a busy process costs seconds (the first 32.7 s of a quickstart training run went there)."""
        if self.enabled:
            with self.lock:
                self._short_look(seconds)
        return self.threads

    def _short_look(self, seconds: float = STALE_LOOK_S) -> None:
        self.last = None
        self._look()
        time.sleep(seconds)
        self._look(fresh=True)

    def threads_for(self, busy_cores: float) -> int:
        """The CPUs there are less those others kept busy (rounded: half a CPU counts), at most torch's own
        count and at least one."""
        return max(1, min(self.cores, self.cpus - int(busy_cores + 0.5)))


_shared: CoreShare | None = None
_shared_lock = threading.Lock()


def threads_pinned() -> bool:
    """Whether the user fixed the thread count (OMP_NUM_THREADS or MKL_NUM_THREADS): then it is left alone."""
    return any(os.environ.get(name, "").strip() for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"))


def shared() -> CoreShare | None:
    """The process's one CoreShare (the server's model calls, training steps and scoring batches all
    fit the same threads), or None where the thread count is pinned."""
    global _shared
    if threads_pinned():
        return None
    with _shared_lock:
        if _shared is None:
            _shared = CoreShare()
            _shared.settle()
    return _shared


def fit_threads(dev: Any = None) -> int | None:
    """Before a CPU model call (a training step, a batch of predictions): the shared CoreShare, fitted.
    None, and nothing changed, on an accelerator (`dev` not a CPU) or where the thread count is pinned."""
    if dev is not None and getattr(dev, "type", "cpu") != "cpu":
        return None
    share = shared()
    return share.fit() if share is not None else None
