"""Process-wide quieting of the libraries tunesmith drives, for the CLI and its worker processes."""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
import threading
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
    """Imports the package `name` with the Hugging Face hub offline. bitsandbytes' CPU backend asks the
    hub for an optional kernel while it is imported (on CPUs with AVX-512 BF16), and peft imports
    bitsandbytes whenever it is installed: every LoRA run made a hub request nobody asked for (two DNS
    lookups of huggingface.co here) before falling back to the kernel bitsandbytes ships. Offline, it
    falls back at once. Model downloads (models/resolve.py) are not affected: only this import is.
    The finder stays until the package is imported: an availability probe (`find_spec`) before the
    import gets a wrapped spec too, and does not use it up."""

    def __init__(self, name: str):
        self.name = name
        self._finding = threading.local()

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name or getattr(self._finding, "on", False):
            return None
        self._finding.on = True  # the lookup below asks the finders again, this one included
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding.on = False
        if spec is not None and spec.loader is not None and not isinstance(spec.loader, _OfflineLoader):
            spec.loader = _OfflineLoader(spec.loader, self)
        return spec


class _OfflineLoader(importlib.abc.Loader):
    """The package's own loader, its module run with `huggingface_hub.constants.HF_HUB_OFFLINE` set."""

    def __init__(self, loader, finder: _OfflineImport):
        self.loader, self.finder = loader, finder

    def __getattr__(self, name):  # get_source, is_package, resource readers: the real loader's
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        import huggingface_hub.constants as hub

        saved, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
        try:
            self.loader.exec_module(module)
        finally:
            hub.HF_HUB_OFFLINE = saved
            if self.finder in sys.meta_path:
                sys.meta_path.remove(self.finder)
