"""hardware.steady_heap / release_free_memory: freed tensor memory goes back to the system (glibc)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A fresh process each time: malloc's thresholds are process state. One 8 MiB tensor is freed first,
# which (left to glibc) raises its mmap threshold to 8 MiB; then 50 tensors of 2 MiB are made and all
# but the last freed. Heap-carved, the last one pins the heap top and the 98 MiB of holes stay resident.
SCRIPT = """
import sys, torch
from tunesmith import hardware
mode = sys.argv[1]
if mode == "steady":
    assert hardware.steady_heap()
big = torch.ones(8 << 20, dtype=torch.uint8)
del big
blocks = [torch.ones(2 << 20, dtype=torch.uint8) for _ in range(50)]
last = blocks[-1]
del blocks
if mode == "release":
    hardware.release_free_memory()
status = open("/proc/self/status").read()
print(int(next(l for l in status.splitlines() if l.startswith("RssAnon:")).split()[1]) // 1024)
"""


def _anon_mb(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and /proc only")
def test_freed_tensors_leave_the_heap():
    plain = _anon_mb("plain")
    assert plain - _anon_mb("steady") > 60  # without steady_heap the holes stay resident
    assert plain - _anon_mb("release") > 60  # malloc_trim hands them back
