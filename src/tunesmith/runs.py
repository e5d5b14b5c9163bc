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


# -- run registry ---------------------------------------------------------------------------------
# Every completed run is recorded in one SQLite file (TUNESMITH_REGISTRY, default in the user data
# folder), so `tunesmith runs list|show|diff` can find runs wherever their folders live.
REGISTRY_SCHEMA = """CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_dir TEXT UNIQUE NOT NULL, name TEXT, created TEXT, model TEXT,
    method TEXT, metric TEXT, value REAL, baseline REAL, met INTEGER, summary TEXT)"""


def registry_path() -> Path:
    env = os.environ.get("TUNESMITH_REGISTRY")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("tunesmith")) / "runs.sqlite"


def _registry():
    import sqlite3

    path = registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path))
    db.execute(REGISTRY_SCHEMA)
    db.row_factory = sqlite3.Row
    return db


def record_run(run_dir: Path) -> int | None:
    """Add or update a completed run in the registry; returns its id (None if it has no summary)."""
    import json

    run_dir = Path(run_dir).resolve()
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    s = fsio.read_json(path)
    metric = s["objective_metric"]
    row = (str(run_dir), s["name"], datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds"),
           s["model"], s["method"], metric, s["metrics"]["finetuned"].get(metric), s["metrics"]["baseline"].get(metric),
           int(bool(s["objective"]["met"])), json.dumps(s))
    db = _registry()
    try:
        with db:
            db.execute("INSERT INTO runs (run_dir, name, created, model, method, metric, value, baseline, met, summary) "
                       "VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(run_dir) DO UPDATE SET name=excluded.name, "
                       "created=excluded.created, model=excluded.model, method=excluded.method, metric=excluded.metric, "
                       "value=excluded.value, baseline=excluded.baseline, met=excluded.met, summary=excluded.summary", row)
        return db.execute("SELECT id FROM runs WHERE run_dir = ?", (str(run_dir),)).fetchone()["id"]
    finally:
        db.close()


def list_runs(name: str | None = None) -> list[dict]:
    """Registered runs, newest first (optionally of one project name); folders that are gone are marked."""
    db = _registry()
    try:
        query = "SELECT id, run_dir, name, created, model, method, metric, value, baseline, met FROM runs"
        rows = db.execute(query + (" WHERE name = ?" if name else "") + " ORDER BY created DESC, id DESC",
                          (name,) if name else ()).fetchall()
    finally:
        db.close()
    return [{**dict(r), "exists": Path(r["run_dir"]).is_dir()} for r in rows]


def find_run(ref: str) -> Path:
    """A run directory from a registry id or a path."""
    from tunesmith.errors import RunDirError

    if ref.isdigit():
        db = _registry()
        try:
            row = db.execute("SELECT run_dir FROM runs WHERE id = ?", (int(ref),)).fetchone()
        finally:
            db.close()
        if row is None:
            raise RunDirError(f"no run with id {ref} in the registry", str(registry_path()), "see `tunesmith runs list`")
        return Path(row["run_dir"])
    path = Path(ref)
    if not (path / "summary.json").is_file():
        raise RunDirError("not an evaluated run directory (no summary.json)", ref, "give a run id or run folder")
    return path
