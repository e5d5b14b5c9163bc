"""`python -m tunesmith.serve.orphan_guard PARENT_PID CMD...`: run CMD so that it gets SIGTERM when
the tunesmith process that started it dies, even by SIGKILL or the OOM killer, when no `finally`
block runs (Linux: PR_SET_PDEATHSIG, which survives exec). Without it a vLLM server started by
`tunesmith serve --engine vllm` would outlive a killed tunesmith and keep the GPU.

This runs as a shim between fork and the engine (instead of `preexec_fn`, which is unsafe in a
process with threads); elsewhere than Linux it only execs CMD.
"""

from __future__ import annotations

import os
import signal
import sys

from tunesmith.orphans import die_with_parent


def main(argv: list[str]) -> None:
    parent, command = int(argv[0]), argv[1:]
    die_with_parent(parent, signal.SIGTERM)  # SIGTERM: the engine shuts down cleanly and frees the GPU
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
