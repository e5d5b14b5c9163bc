"""Process-wide quieting of the libraries tunesmith drives, for the CLI and its worker processes."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """Keep third-party warnings, telemetry and progress bars out of tunesmith's own output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    # bitsandbytes (imported by peft when installed) logs a failed optional kernel download at import.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
