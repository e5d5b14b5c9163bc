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
             "data/removed.jsonl", "data/suspects.jsonl", "data/changes.jsonl",
             "model/tunesmith.json", "model/prompt.json", "metrics.json", "predictions/test.jsonl",
             "train_log.jsonl", "report.html", "model_card.md", "summary.json")


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + f"{os.getpid() % 10000:04d}"


def final_dir(base_dir: Path, name: str, out: Path | None) -> Path:
    """`out` itself when given, else runs/<name>/<run-id>/ beside the config."""
    return Path(out).resolve() if out else (base_dir / "runs" / name / new_run_id())


def staging_dir(final: Path) -> Path:
    """The hidden folder a run is built in before it is renamed to `final`."""
    return final.with_name(f".{final.name}.partial")


@contextmanager
def staged(final: Path, keep_failed: bool = False, resume: bool = False):
    """Yield a staging folder; on success it replaces `final`, on failure it is removed.

    An interrupted run (Ctrl-C, or a kill that gives no chance to clean up) that has written
    training checkpoints keeps its staging folder so `tunesmith train --resume` can continue it.
    With `resume` the existing staging folder is reused as it is.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(final)
    if not resume:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    try:
        yield staging
    except BaseException as e:
        resumable = isinstance(e, KeyboardInterrupt) and (staging / "checkpoints").is_dir()
        if not keep_failed and not resumable:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    fsio.replace_dir(staging, final)
    _point_latest(final)


def interrupted_run(run_dir: Path) -> tuple[Path, Path]:
    """(final, staging) of an interrupted run named by its final path or its staging folder.

    Raises:
        RunDirError: when there is nothing to resume.
    """
    from tunesmith.errors import RunDirError

    run_dir = Path(run_dir).resolve()
    if run_dir.name.startswith(".") and run_dir.name.endswith(".partial"):
        final, staging = run_dir.with_name(run_dir.name[1:-len(".partial")]), run_dir
    else:
        final, staging = run_dir, staging_dir(run_dir)
    if not (staging / "config.yaml").is_file():
        done = (final / "model" / "tunesmith.json").is_file()
        raise RunDirError("training already finished" if done else "no interrupted run to resume", str(run_dir),
                          "evaluate it with `tunesmith eval`" if done else
                          "give the run directory printed when training started")
    return final, staging


def _point_latest(final: Path) -> None:
    """runs/<name>/latest -> the newest run (only for runs under a runs/<name>/ folder)."""
    if final.parent.parent.name != "runs":
        return
    link = final.parent / "latest"
    tmp = final.parent / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(final.name, tmp)
    os.replace(tmp, link)
