"""Run directory layout: built in a hidden staging folder, renamed into place when complete."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from tunesmith import fsio

# Files every completed `tunesmith run` leaves (see DESIGN.md, "Contracts").
RUN_FILES = ("config.yaml", "data/train.jsonl", "data/validation.jsonl", "data/test.jsonl", "data/report.json",
             "model/tunesmith.json", "model/prompt.json", "metrics.json", "predictions/test.jsonl",
             "train_log.jsonl", "report.html", "model_card.md", "summary.json")


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + f"{os.getpid() % 10000:04d}"


def final_dir(base_dir: Path, name: str, out: Path | None) -> Path:
    """`out` itself when given, else runs/<name>/<run-id>/ beside the config."""
    return Path(out).resolve() if out else (base_dir / "runs" / name / new_run_id())


@contextmanager
def staged(final: Path, keep_failed: bool = False):
    """Yield a staging folder; on success it replaces `final`, on failure it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        if not keep_failed:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    fsio.replace_dir(staging, final)
    _point_latest(final)


def _point_latest(final: Path) -> None:
    """runs/<name>/latest -> the newest run (only for runs under a runs/<name>/ folder)."""
    if final.parent.parent.name != "runs":
        return
    link = final.parent / "latest"
    tmp = final.parent / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(final.name, tmp)
    os.replace(tmp, link)
