"""Child processes that end with the tunesmith process that started them.

Linux's PR_SET_PDEATHSIG sends a signal to a process when its parent dies, even by SIGKILL or the OOM
killer, when no `finally` block runs, and it survives exec. This module imports no torch: the vLLM
shim (`serve/orphan_guard.py`) arms it just before it execs the engine.
"""

from __future__ import annotations

import os
import sys

PR_SET_PDEATHSIG = 1  # <sys/prctl.h>


def die_with_parent(parent: int, signal: int) -> bool:
    """Have this process receive `signal` when its parent dies; exit now if `parent` is gone already.

    Returns False where the system has no prctl (nothing armed). Raises OSError if prctl refuses.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    if not hasattr(libc, "prctl"):
        return False
    if libc.prctl(PR_SET_PDEATHSIG, signal) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    return True
