"""Nothing asks a model hub for anything tunesmith did not ask for: bitsandbytes' CPU backend requests an
optional kernel from the Hugging Face hub while it is imported (on CPUs with AVX-512 BF16), and peft
imports bitsandbytes whenever it is installed, so every LoRA run made that request."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import socket, sys
asked = []
real = socket.getaddrinfo
def lookup(host, *args, **kwargs):
    asked.append(host)
    return real(host, *args, **kwargs)
socket.getaddrinfo = lookup
if sys.argv[1] == "cli":
    from tunesmith.logs import quiet_libraries
    quiet_libraries()  # what every command and worker process does first
    import importlib.util
    assert importlib.util.find_spec("bitsandbytes")  # an availability probe (transformers, peft) comes first
import peft  # noqa: F401  (imports bitsandbytes)
import bitsandbytes
print(sorted(set(asked)), type(bitsandbytes.__spec__.loader).__name__)
"""


def _lookups(mode: str) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_importing_peft_in_a_command_makes_no_hub_request():
    pytest.importorskip("bitsandbytes")
    assert _lookups("cli") == "[] _OfflineLoader"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and " avx512_bf16" in cpuinfo.read_text():  # where bitsandbytes asks: unguarded, it does
        assert "huggingface.co" in _lookups("plain")
