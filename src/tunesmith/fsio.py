"""Atomic file writes: a reader never sees a half-written file."""

from __future__ import annotations

import base64
import datetime
import decimal
import errno
import json
import math
import os
import secrets
import shutil
import signal
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tunesmith.errors import InputError


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file in the same folder and a rename."""
    write_lines(path, [text])


def write_lines(path: Path, pieces: Iterable[str]) -> None:
    """Write the pieces in order, streamed, through a temp file in the same folder and a rename.

    The file is fsynced before the rename and its folder after it, so after a crash the path holds
    either the old or the new content, never an empty or partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # os.open with mode 0o666 lets the process umask decide the final mode, as open() would.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(pieces)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except IsADirectoryError:  # said of the path asked for, not of the temp file beside it
            raise IsADirectoryError(errno.EISDIR, "a folder holds the name of the file to write", str(path)) \
                from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make renames and creations inside `folder` durable."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a platform that cannot open folders (Windows) has nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename itself still happened
        pass
    finally:
        os.close(fd)


def dumps(obj: Any, indent: int | None = None) -> str:
    """Standard JSON text of `obj`: a NaN or infinity (which Python would write as a bare `NaN`, refused
    by every other JSON reader, a browser's included) is written as null, i.e. "no figure"."""
    return json.dumps(_finite(obj), indent=indent, ensure_ascii=False, allow_nan=False, default=_jsonable)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, dumps(obj, indent=2) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """One JSON object per line, streamed (no whole-file string in memory)."""
    write_lines(path, (dumps(r) + "\n" for r in rows))


def read_json(path: Path, expect: type | None = None) -> Any:
    """A JSON file tunesmith wrote; DamagedFile (exit 2, naming the file) when it does not parse, or
    when it holds something other than an `expect` (dict: a JSON object, list: an array)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _damaged(path, e) from None
    if expect is not None and not isinstance(value, expect):
        names = {dict: "an object", list: "an array"}
        raise DamagedFile(path, f"{names.get(expect, expect.__name__)} expected, found {type(value).__name__}",
                          what="not what tunesmith wrote")
    return value


def _no_constant(name: str) -> None:
    """json's reader for NaN and Infinity, which standard JSON lacks: read as null, "no figure", as `dumps`
    writes them now (before commit c36c4b8 tunesmith wrote them bare, in a diverged run's log for one). Never a
    figure: an edited NaN cannot pass for a measured value (and 1e999, a float infinity, is refused
    where figures are read: runs.figures_problem)."""
    return None


class DamagedFile(ValueError):
    """A file tunesmith wrote (a run's JSON) that no longer parses: damaged or edited by hand. The CLI
    reports it as bad input (one `error:` line naming the file, exit 2); code that skips an unreadable
    record catches it as the ValueError it is."""

    def __init__(self, path: Path, problem: str, line: int | None = None, what: str = "not valid JSON") -> None:
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"error: {what} ({problem[:120]}; damaged or edited by hand?), {where}, restore "
                         "it, or run the command that writes it again")


def _damaged(path: Path, e: ValueError, line: int | None = None) -> DamagedFile:
    return DamagedFile(path, str(e), getattr(e, "lineno", None) if line is None else line)


def read_jsonl(path: Path, missing_ok: bool = False) -> list[dict]:
    """The rows of a JSONL file tunesmith wrote (user data goes through data/io.py, which reports bad rows);
    [] for a missing file when `missing_ok`."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return []
    rows, data = [], path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:  # named at its line, not an internal error
        raise DamagedFile(path, f"not UTF-8: byte 0x{data[e.start]:02x}", data.count(b"\n", 0, e.start) + 1,
                          what="not text tunesmith wrote") from None
    # split on "\n" only: str.splitlines() also breaks at U+2028/U+0085, which JSON strings hold unescaped
    for i, line in enumerate(text.split("\n"), start=1):
        try:
            rows += [json.loads(line, parse_constant=_no_constant)] if line.strip() else []
        except (ValueError, RecursionError) as e:
            raise _damaged(path, e, i) from None
    return rows


def share_like_umask(folder: Path) -> None:
    """Give the files under `folder` that were written owner-only (safetensors saves every file 0600)
    the mode the process umask gives any other file: a run's weights were unreadable to a server or a
    colleague running as another user while its tokenizer and config were not. Only exactly-0600 files
    change; links are not followed."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).rglob("*"):
        if not path.is_symlink() and path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o600:
            path.chmod(0o666 & ~umask)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM held until the block ends, then acted on as they would have been: moves that
    belong together (the two renames of `replace_dir`, files moved into an output folder) are never cut
    in half by a signal. Only the main thread sets handlers; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    wanted = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) not in (signal.SIG_IGN, None)]
    before = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in wanted}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        if held:
            handler = before[held[0]]
            if callable(handler):
                handler(held[0], None)
            else:  # SIG_DFL: the default action (termination), as without the block
                os.kill(os.getpid(), held[0])


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder `src` onto `dst`, replacing what was there.

    The old `dst` is renamed aside first and renamed back if moving `src` in fails, so `dst` is never
    lost: a crash between the two renames leaves it whole in `.<dst>.old-<pid>` beside it, and Ctrl-C or
    SIGTERM wait until both are done (`signals_deferred`).
    """
    with signals_deferred():
        _replace_dir(Path(src), Path(dst))


def _replace_dir(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.replace(src, dst)
        fsync_dir(dst.parent)
        return
    aside = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if aside.exists():  # left by an earlier crash of a process with this pid: never overwrite it
        aside = dst.with_name(f".{dst.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.replace(dst, aside)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(aside, dst)
        raise
    fsync_dir(dst.parent)
    if aside.is_symlink():  # a link put there (never followed): rmtree refuses one and would leave it
        aside.unlink()
    else:
        shutil.rmtree(aside, ignore_errors=True)


def not_a_folder(path: Path) -> str:
    """Why a path that is there cannot be taken as a folder: a file, or a link to nothing."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return f"is a symbolic link to {os.readlink(path)}, which does not exist"
    return "exists and is not a folder"


def uncreatable(folder: Path) -> str | None:
    """Why `folder` can be neither used nor created (its nearest existing ancestor is a file, a dangling
    link, or not writable), or None when it can."""
    if (overlong := _overlong(Path(folder).absolute())) is not None:
        return overlong
    ancestor = Path(folder).absolute()
    while not ancestor.exists() and not ancestor.is_symlink() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} {'is not a folder' if ancestor.exists() else not_a_folder(ancestor)}"
    if ancestor != Path(folder).absolute() and not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable"
    if ancestor != Path(folder).absolute():
        # Permission bits do not tell everything (root may write anywhere by them, yet /proc, a read-only
        # mount or a full disk refuse a new folder): make one and remove it at once.
        try:
            probe = Path(tempfile.mkdtemp(dir=ancestor, prefix=".tunesmith-probe-"))
        except OSError as e:
            return f"{ancestor} does not take new folders ({e.strerror or e})"
        probe.rmdir()
    return None


def check_output_folder(folder: Path, where: str, ours: Callable[[Path], bool], command: str) -> None:
    """Refuse a folder a command would write its files into unless they are its to replace: it must be
    new (and creatable), empty, or an earlier output of the same command (`ours(folder)`), so a user's
    own files are never overwritten.

    Raises:
        InputError: naming `where` (e.g. "--out x"); nothing has been touched.
    """
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        if why := uncreatable(folder):
            raise InputError(f"cannot be created: {why}", where, "give a folder path you can write to")
        return
    if not folder.is_dir():
        raise InputError(not_a_folder(folder), where, "give a new or empty folder")
    if any(folder.iterdir()) and not ours(folder):
        raise InputError(f"holds files that are not an earlier output of `{command}`; left untouched", where,
                         "give a new or empty folder")


def _overlong(path: Path) -> str | None:
    """Why no file system takes `path` (a name over 255 bytes, the whole over 4,095), or None."""
    name = next((part for part in path.parts if len(os.fsencode(part)) > 255), None)
    if name is not None:
        return f"a name in it is {len(os.fsencode(name))} bytes long (at most 255)"
    if len(os.fsencode(str(path))) > 4095:
        return f"it is {len(os.fsencode(str(path)))} bytes long (at most 4,095)"
    return None


def unwritable_file(path: Path) -> str | None:
    """Why a new file cannot be written at `path` (its folder can be neither used nor created, or takes
    no new files), or None when it can. Nothing is left behind by the check."""
    if (overlong := _overlong(Path(path).absolute())) is not None:
        return overlong
    folder = Path(path).absolute().parent
    if not folder.is_dir():
        return uncreatable(folder)
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".tunesmith-probe-")
    except OSError as e:
        return f"{folder} does not take new files ({e.strerror or e})"
    os.close(fd)
    os.unlink(probe)
    return None


def _jsonable(obj: Any) -> Any:
    """Values json cannot write: paths, numpy/torch scalars and arrays, and what Parquet/Arrow columns
    hold besides text and numbers (written into removed.jsonl and the curated splits with the row)."""
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (datetime.date, datetime.time)):  # datetime is a date
        return obj.isoformat()
    if isinstance(obj, datetime.timedelta):
        return obj.total_seconds()
    if isinstance(obj, decimal.Decimal):
        return str(obj)  # every digit kept; a float would round it
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays (a scalar's tolist() is a number)
        return _finite(obj.tolist())
    if hasattr(obj, "item"):
        return _finite(obj.item())
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite(obj: Any) -> Any:
    """`obj` with every non-finite float inside dicts, lists and tuples replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
