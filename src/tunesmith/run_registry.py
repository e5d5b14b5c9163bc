"""The run registry: every completed run recorded in one SQLite file (TUNESMITH_REGISTRY, default in the
user data folder), so `tunesmith runs list|show|diff` can find runs wherever their folders live.
champions.py keeps its promotion events in the same file."""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from tunesmith.runs import check_evaluated, read_summary

REGISTRY_SCHEMA = """CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_dir TEXT UNIQUE NOT NULL, name TEXT, created TEXT, model TEXT,
    method TEXT, metric TEXT, value REAL, baseline REAL, met INTEGER, summary TEXT)"""


def registry_path() -> Path:
    env = os.environ.get("TUNESMITH_REGISTRY")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("tunesmith")) / "runs.sqlite"


@contextmanager
def _registry(create: bool = True):
    """The registry's connection, closed on leaving. With `create` False (a command that only reads it)
    the file is opened read-only, and None is yielded where it does not exist: no folder, no file, no
    table is made. A registry that is not one tunesmith wrote (another file, a folder, no runs table) is
    an InputError naming it, never an internal error."""
    import sqlite3

    from tunesmith.errors import InputError

    path = registry_path()
    if not create and not path.is_file():
        if path.exists():
            raise InputError("is not a file: the run registry cannot be read", str(path),
                             "point TUNESMITH_REGISTRY at a file, or move the folder aside")
        yield None
        return
    db = None
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(path))
            check_registry(db, path)  # another program's database gets no table of ours
            db.execute(REGISTRY_SCHEMA)
        else:
            db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
        db.row_factory = sqlite3.Row
        if not create and not _has_runs(db, path):  # promote wrote it before any run was recorded
            yield None
            return
        yield db
    except sqlite3.OperationalError as e:
        if "locked" in str(e) or "busy" in str(e):
            raise InputError(f"the run registry is busy ({e})", str(path), "try again in a moment") from e
        raise _unreadable(path, e) from e
    except (sqlite3.Error, OSError) as e:
        raise _unreadable(path, e) from e
    finally:
        if db is not None:
            db.close()


def _has_runs(db, path: Path) -> bool:
    """Whether the registry has its runs table yet; False for one holding only champions.py's promotions
    (`promote` before any run was recorded), an InputError for a database of some other program."""
    tables = check_registry(db, path)
    if "runs" in tables:
        return True
    if tables and "promotions" not in tables:
        raise _foreign(path, tables)
    # Only promotions, or no table at all: an empty file is an empty SQLite database, the state a registry
    # is in while `promote` or a run creates it (refusing it raced with them).
    return False


# The registry's tables: runs (here), promotions (champions.py) and SQLite's own for AUTOINCREMENT.
REGISTRY_TABLES = frozenset({"runs", "promotions", "sqlite_sequence"})
RUN_COLUMNS = frozenset({"id", "run_dir", "name", "created", "model", "method", "metric", "value", "baseline",
                         "met", "summary"})


def check_registry(db, path: Path) -> set[str]:
    """The tables of the registry file at `path` (none for a new file); an InputError, before anything is
    written, for a database of some other program: a table tunesmith does not make, or a runs table with
    other columns. Such a file is left as it is."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    columns = {r[1] for r in db.execute("PRAGMA table_info(runs)")} if "runs" in tables else RUN_COLUMNS
    if tables - REGISTRY_TABLES or not RUN_COLUMNS <= columns:
        raise _foreign(path, tables)
    return tables


def _foreign(path: Path, tables: set[str]) -> Exception:
    from tunesmith.errors import InputError

    listed = f"tables: {', '.join(sorted(tables))[:200]}" if tables else "an empty database"
    return InputError(f"not a run registry ({listed})", str(path),
                      "point TUNESMITH_REGISTRY at tunesmith's registry file, or move this one aside")


def _unreadable(path: Path, e: Exception) -> Exception:
    from tunesmith.errors import InputError

    return InputError(f"the run registry cannot be read ({type(e).__name__}: {e})", str(path),
                      "move it aside (runs are recorded anew as they are evaluated), or set TUNESMITH_REGISTRY "
                      "to another file")


def record_run(run_dir: Path) -> int | None:
    """Add or update an evaluated run in the registry; returns its id (None if it has no verdict yet)."""
    import json

    run_dir = Path(run_dir).resolve()
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    s = read_summary(run_dir)
    if "objective" not in s:  # a run whose eval failed (see summary["failed"]): nothing to rank yet, and a
        # row for this folder describes the run it replaced (`run --overwrite`), gone now
        if registry_path().is_file():  # (no registry file is made for it)
            with _registry() as db, db:
                db.execute("DELETE FROM runs WHERE run_dir = ?", (str(run_dir),))
        return None
    metric = s["objective_metric"]
    row = (str(run_dir), s["name"],
           datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds"),
           s["model"], s["method"], metric, s["metrics"]["finetuned"].get(metric), s["metrics"]["baseline"].get(metric),
           int(bool(s["objective"]["met"])), json.dumps(s))
    with _registry() as db, db:
        db.execute("INSERT INTO runs (run_dir, name, created, model, method, metric, value, baseline, "
                   "met, summary) "
                   "VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(run_dir) DO UPDATE SET name=excluded.name, "
                   "created=excluded.created, model=excluded.model, "
                   "method=excluded.method, metric=excluded.metric, "
                   "value=excluded.value, baseline=excluded.baseline, met=excluded.met, "
                   "summary=excluded.summary", row)
        return db.execute("SELECT id FROM runs WHERE run_dir = ?", (str(run_dir),)).fetchone()["id"]


def list_runs(name: str | None = None) -> list[dict]:
    """Registered runs, newest first (optionally of one project name); folders that are gone are marked."""
    with _registry(create=False) as db:
        if db is None:
            return []
        query = "SELECT id, run_dir, name, created, model, method, metric, value, baseline, met FROM runs"
        rows = db.execute(query + (" WHERE name = ?" if name else "") + " ORDER BY created DESC, id DESC",
                          (name,) if name else ()).fetchall()
    return [_listed(dict(r)) for r in rows]


def _listed(row: dict) -> dict:
    """A registry row with the types the listing prints (SQLite keeps whatever a hand edit put in a
    column): figures as numbers or None, the rest as text."""
    def number(v):
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    text = {k: "" if row[k] is None else str(row[k]) for k in ("id", "run_dir", "name", "created", "model",
                                                                 "method", "metric")}
    return {**text, "value": number(row["value"]), "baseline": number(row["baseline"]), "met": row["met"] == 1,
            "exists": Path(text["run_dir"]).is_dir()}


def find_run(ref: str, evaluated: bool = True) -> Path:
    """A run directory from a registry id or a path; with `evaluated`, one whose eval stage finished.

    Raises:
        RunDirError: unknown id, a folder that is gone, or (with `evaluated`) a run not yet evaluated.
    """
    from tunesmith.errors import RunDirError

    if ref.isascii() and ref.isdigit():  # "²" is a digit to str.isdigit, not to int()
        with _registry(create=False) as db:  # an id past SQLite's 64-bit integers names no run
            row = None if db is None or int(ref) >= 2**63 else db.execute(
                "SELECT run_dir FROM runs WHERE id = ?", (int(ref),)).fetchone()
        if row is None:
            raise RunDirError(f"no run with id {ref} in the registry", str(registry_path()),
                              "see `tunesmith runs list`")
        path = Path(str(row["run_dir"]))
        if not (path / "summary.json").is_file():
            raise RunDirError(f"run {ref} is in the registry but its folder is gone (no summary.json)", str(path),
                              "`tunesmith runs list` marks such runs (gone)")
    else:
        path = Path(ref)
        if not (path / "summary.json").is_file():
            raise RunDirError("not an evaluated run directory (no summary.json)", ref, "give a run id or run folder")
    if evaluated:
        check_evaluated(path)
    return path
