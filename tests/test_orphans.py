"""orphans.die_with_parent: a child armed with it gets the signal when its parent dies, and a child
whose parent is already gone exits at once. No torch import (the vLLM shim runs it before exec)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

ARM = "import os, signal, sys; from tunesmith.orphans import die_with_parent; "


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ARM + code], capture_output=True, text=True, timeout=60)


def test_arms_without_torch_and_exits_when_the_parent_is_gone():
    armed = _run("print(die_with_parent(os.getppid(), signal.SIGTERM), 'torch' in sys.modules)")
    assert armed.returncode == 0 and armed.stdout.split() == ["True", "False"]
    gone = _run("die_with_parent(os.getppid() + 999999, signal.SIGTERM); print('still here')")
    assert gone.returncode == 1 and "still here" not in gone.stdout


def test_the_signal_arrives_when_the_parent_is_killed():
    # A middle process starts the armed grandchild, reports its pid, and is SIGKILLed: the grandchild
    # (a sleeper) must get SIGTERM and end, not sleep on.
    grandchild = ARM + ("die_with_parent(os.getppid(), signal.SIGTERM); print('ok', flush=True); "
                        "import time; time.sleep(60)")
    middle = ("import subprocess, sys; "
              "p = subprocess.Popen([sys.executable, '-c', sys.argv[1]], stdout=subprocess.PIPE, text=True); "
              "print(p.pid, p.stdout.readline().strip(), flush=True); import time; time.sleep(60)")
    import os
    import signal
    import time

    import psutil

    proc = subprocess.Popen([sys.executable, "-c", middle, grandchild], stdout=subprocess.PIPE, text=True)
    pid, status = proc.stdout.readline().split()
    assert status == "ok"
    child = psutil.Process(int(pid))
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while child.is_running() and child.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    finally:
        if child.is_running():
            child.kill()
