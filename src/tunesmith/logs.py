"""Process-wide quieting of the libraries tunesmith drives, for the CLI and its worker processes."""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
import warnings


def quiet_libraries() -> None:
    """Keep third-party warnings, telemetry and progress bars out of tunesmith's own output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    # bitsandbytes (imported by peft when installed) logs a failed optional kernel download at import.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("kernels").setLevel(logging.ERROR)  # "skipping publisher trust check" of that kernel
    if "bitsandbytes" not in sys.modules and not any(isinstance(f, _OfflineImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _OfflineImport("bitsandbytes"))
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


class _OfflineImport(importlib.abc.MetaPathFinder):
    """Imports the package `name` with the Hugging Face hub offline, once. bitsandbytes' CPU backend asks
    the hub for an optional kernel while it is imported (on CPUs with AVX-512 BF16), and peft imports
    bitsandbytes whenever it is installed: every LoRA run made a hub request nobody asked for (two DNS
    lookups of huggingface.co here) before falling back to the kernel bitsandbytes ships. Offline, it
    falls back at once. Model downloads (models/resolve.py) are not affected: only this import is."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # the real finders answer, and only this first import is wrapped
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _OfflineLoader(spec.loader)
        return spec


class _OfflineLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        import huggingface_hub.constants as hub

        saved, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
        try:
            self.loader.exec_module(module)
        finally:
            hub.HF_HUB_OFFLINE = saved
