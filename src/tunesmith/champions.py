"""The champion registry: which run is served under a registry name, as a log of promotion events
in the run registry's SQLite file (`tunesmith.run_registry.registry_path()`).

What is current follows a stack, replayed from the events of one name in order: a promotion pushes
its run, a rollback pops the current one, so the champion before it is served again. Two rollbacks
go back two promotions; a promotion after a rollback pushes on what is left (the run rolled away
from is not restored by a later rollback). Promoting the current champion again changes nothing.
Every change is one `BEGIN IMMEDIATE` transaction: two processes promoting at once are serialised,
and each event's `previous` is the champion it really replaced.
"""

from __future__ import annotations

import json
import re
import sqlite3
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from tunesmith.errors import InputError, RunDirError
from tunesmith.run_registry import check_registry, registry_path
from tunesmith.runs import is_run_dir

SCHEMA = ("""CREATE TABLE IF NOT EXISTS promotions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('promote', 'rollback')),
    run_dir TEXT NOT NULL, previous TEXT, parent TEXT, ts TEXT NOT NULL, reason TEXT NOT NULL, record TEXT)""",
          "CREATE INDEX IF NOT EXISTS promotions_name ON promotions (name, id)")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # a project name (config: name)
BUSY_TIMEOUT_S = 30  # how long a writer waits for another one before giving up


class ChampionChanged(InputError):
    """Another run became the champion than the one a challenger was compared with (nothing recorded)."""


def promote(name: str, run_dir: Path, *, parent: Path | None = None, reason: str = "manual",
            record: dict | None = None, replacing: Path | None = None) -> int:
    """Make `run_dir` the champion served under `name`; returns the event's id (that of the event
    that made it current when it already is: nothing is recorded then).

    Args:
        parent: the run it was built from (lineage), if any.
        reason: why, in a few words ("manual", "retrain: challenger better").
        record: figures behind the decision (JSON), kept with the event.
        replacing: the champion `run_dir` was judged against; when another run is served under `name`
            (promoted or rolled back to meanwhile), nothing is recorded: the judgement was not about it.

    Raises:
        InputError: a bad registry name. RunDirError: `run_dir` is not a trained run. ChampionChanged:
        `replacing` is not what is served under `name` (when something is).
    """
    check_name(name)
    run = Path(run_dir).resolve()
    if not is_run_dir(run):
        raise RunDirError("not a trained run directory (no model/tunesmith.json)", str(run_dir),
                          "give a folder made by `tunesmith run` or `tunesmith retrain`")
    with _writing() as db:
        stack = _stack(db, name)
        if stack and stack[-1][0] == str(run):
            return stack[-1][1]
        if replacing is not None and stack and stack[-1][0] != str(Path(replacing).resolve()):
            raise ChampionChanged(f"'{name}' serves {stack[-1][0]} now, not {Path(replacing).resolve()}, the champion "
                                  "the challenger was compared with", "NAME",
                                  f"retrain the run served now: `tunesmith retrain --registry {name}`")
        return _insert(db, name, "promote", str(run), stack[-1][0] if stack else None,
                       str(Path(parent).resolve()) if parent else None, reason, record)


def rollback(name: str, *, reason: str = "manual",
             check: Callable[[Path], None] | None = None) -> tuple[Path, Path]:
    """Serve the champion before the current one again under `name` (recorded as an event); returns
    (the run served now, the one it replaced), as the transaction saw them (two rollbacks at once each
    name their own step). `check(run_dir)`, when given, raises for a run that can no longer be served.

    Raises:
        InputError: nothing is promoted under `name`, or only one run was (nothing to roll back to).
        RunDirError: the run to roll back to is no longer a trained run directory (nothing recorded).
    """
    check_name(name)
    with _writing() as db:
        stack = _stack(db, name)
        if not stack:
            raise InputError(f"nothing is promoted under '{name}'", "NAME",
                             f"promote a run first: `tunesmith promote RUN_DIR --name {name}`")
        if len(stack) < 2:
            raise InputError(f"nothing to roll back to: {stack[-1][0]} is the only champion left under '{name}'",
                             "NAME", f"promote another run instead: `tunesmith promote RUN_DIR --name {name}`")
        target = stack[-2][0]
        if not is_run_dir(Path(target)):
            raise RunDirError(f"the run to roll back to is gone (no model/tunesmith.json); '{name}' still serves "
                              f"{stack[-1][0]}", target,
                              f"promote a run that exists: `tunesmith promote RUN_DIR --name {name}`")
        if check is not None:
            check(Path(target))
        _insert(db, name, "rollback", target, stack[-1][0], None, reason, None)
    return Path(target), Path(stack[-1][0])


def current(name: str, must_exist: bool = False) -> Path | None:
    """The run served under `name` now (its folder may have gone since), None when none was promoted.
    A registry file that is not there is read as empty (and not made), or with `must_exist` (a server
    following it) is an InputError: a registry deleted under a server is not an empty one to wait on."""
    check_name(name)
    if not registry_path().exists():
        if must_exist:
            raise InputError("the run registry file is gone", str(registry_path()),
                             "restore it, or point TUNESMITH_REGISTRY at the registry the server should follow")
        return None
    with _reading() as db:
        stack = _stack(db, name)
    return Path(stack[-1][0]) if stack else None


def history(name: str) -> list[dict]:
    """The events of `name`, oldest first: id, name, action ('promote'|'rollback'), run_dir (current
    after the event), previous (current before it), parent, ts, reason, record (a dict or None)."""
    check_name(name)
    if not registry_path().exists():  # nothing promoted yet: nothing to show, and no file made by a read
        return []
    with _reading() as db:
        rows = db.execute("SELECT * FROM promotions WHERE name = ? ORDER BY id", (name,)).fetchall()
    return [{**dict(r), "record": json.loads(r["record"]) if r["record"] else None} for r in rows]


def check_name(name: str, where: str = "NAME") -> None:
    """InputError naming `where` (the command-line argument or option that gave it) for a bad registry name."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        shown = json.dumps(name[:80]) + ("..." if len(name) > 80 else "") if isinstance(name, str) else repr(name)
        raise InputError(f"bad registry name {shown}", where,
                         "use up to 100 letters, digits, '.', '_' or '-', starting with a letter or digit "
                         "(as a project name)")


def _stack(db: sqlite3.Connection, name: str) -> list[tuple[str, int]]:
    """(run_dir, id of the event that put it there) of each champion under `name`, the current one last."""
    stack: list[tuple[str, int]] = []
    for row in db.execute("SELECT id, action, run_dir FROM promotions WHERE name = ? ORDER BY id", (name,)):
        if row["action"] == "promote":
            stack.append((row["run_dir"], row["id"]))
        elif stack:
            stack.pop()
    return stack


def _insert(db: sqlite3.Connection, name: str, action: str, run_dir: str, previous: str | None,
            parent: str | None, reason: str, record: dict | None) -> int:
    ts = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    body = json.dumps(record, default=str) if record is not None else None
    cursor = db.execute("INSERT INTO promotions (name, action, run_dir, previous, parent, ts, reason, record) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (name, action, run_dir, previous, parent, ts,
                                                            str(reason), body))
    return int(cursor.lastrowid)


def _connect() -> sqlite3.Connection:
    path = registry_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a folder of its path should be, or no permission
        raise InputError(f"the run registry's folder cannot be made ({e.strerror or e})", str(path),
                         "set TUNESMITH_REGISTRY to a file in a folder you can write to") from None
    # isolation_level=None: this module opens its transactions itself (BEGIN IMMEDIATE).
    db = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
    db.row_factory = sqlite3.Row
    return db


@contextmanager
def _writing():
    """A connection inside BEGIN IMMEDIATE (the write lock taken before the first read, so what is read
    is still true when the event is written), committed on success, rolled back on any error."""
    with _opened() as db:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


@contextmanager
def _reading():
    with _opened() as db:
        yield db


@contextmanager
def _opened():
    """A connection with the schema in place; an unreadable registry file is one clear error."""
    path, db = registry_path(), None
    if path.exists() and not path.is_file():  # as run_registry says it (sqlite's own words mislead)
        raise InputError("is not a file: the run registry cannot be read", str(path),
                         "point TUNESMITH_REGISTRY at a file, or move the folder aside")
    try:
        db = _connect()
        check_registry(db, path)  # another program's database gets no table of ours
        for statement in SCHEMA:
            db.execute(statement)
        yield db
    except sqlite3.OperationalError as e:
        if "locked" in str(e) or "busy" in str(e):  # exit 2, as every command reading the registry says it
            raise InputError(f"the run registry is busy ({e})", str(path),
                             "another tunesmith process is writing it: try again") from None
        raise InputError(f"cannot use the run registry ({e})", str(path),
                         "set TUNESMITH_REGISTRY to another file, or fix this one's permissions") from None
    except sqlite3.DatabaseError as e:
        raise InputError(f"the run registry is not a readable SQLite file ({e})", str(path),
                         "set TUNESMITH_REGISTRY to another file, or move this one away") from None

    finally:
        if db is not None:
            db.close()
