"""Run directory layout: built in a hidden staging folder, renamed into place when complete."""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import sys
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


# Written into a staging folder when it is made (removed before it becomes the run directory), so that
# only folders tunesmith made are ever removed as stale staging.
STAGING_MARKER = ".tunesmith-staging"


def staging_dir(final: Path) -> Path:
    """The hidden folder a run is built in before it is renamed to `final`."""
    return final.with_name(f".{final.name}.partial")


def published(run_dir: Path) -> Path:
    """The final folder of a run being written in its staging folder (`staging_dir`'s inverse); any other
    folder is its own answer. For paths a run records of itself."""
    run_dir = Path(run_dir)
    name = run_dir.name
    if name.startswith(".") and name.endswith(".partial") and len(name) > len("..partial"):
        return run_dir.with_name(name[1:-len(".partial")])
    return run_dir


def is_run_dir(path: Path) -> bool:
    """Whether `path` is a tunesmith run directory (it holds a trained model's model/tunesmith.json); False
    for a folder that cannot be looked into."""
    try:
        return (Path(path) / "model" / "tunesmith.json").is_file()
    except OSError:  # no permission to look (e.g. under /proc): not one we can use
        return False


def check_out(final: Path, overwrite: bool = False, given: bool = True) -> None:
    """Refuse a run directory that would replace anything but an earlier run, and that only with `overwrite`.

    A missing or empty folder is fine (nothing is lost); the current folder and those above it never are.
    `given`: the user named it with --out (else it is the default folder beside the config).

    Raises:
        RunDirError: naming --out (or the default folder); nothing has been touched.
    """
    from tunesmith.errors import RunDirError

    final, cwd = Path(final).absolute(), Path.cwd().resolve()
    where = f"--out {final}" if given else f"the default run folder {final} (beside the config)"
    real = final.resolve()
    if real == real.parent or real == cwd or real in cwd.parents:
        raise RunDirError("the run directory would replace the current folder or one above it", where,
                          "give a new folder, e.g. --out runs/my-run")
    if final.is_symlink():
        raise RunDirError("is a symbolic link", where, "give the folder itself, or a new folder")
    inside = next((p for p in real.parents if is_run_dir(p)), None)
    if inside is not None:  # its model/ or predictions/ would hold a stranger, and --overwrite of it delete one
        raise RunDirError(f"is inside the run directory {inside}; a run's folders hold only what it wrote", where,
                          "give --out a folder outside any run (a run's own config.yaml needs one)")
    if not final.exists():
        why = fsio.uncreatable(final)
        if why:
            raise RunDirError(f"cannot be created: {why}", where, "give a folder path you can write to")
        return
    if not final.is_dir():
        raise RunDirError(fsio.not_a_folder(final), where, "give a new folder for the run")
    if is_run_dir(final):
        if not overwrite:
            raise RunDirError("already holds a tunesmith run", where,
                              "pass --overwrite to replace it, or give a new folder")
        return
    if any(final.iterdir()):
        raise RunDirError("exists and is not a tunesmith run directory (no model/tunesmith.json); left untouched",
                          where, "give a new or empty folder")


def check_runs_folder(out: Path, runs: list[str], files: tuple[str, ...], overwrite: bool = False) -> None:
    """For commands that put several runs in one --out (compare, tune): `out` may be new, empty, or an
    earlier output (only `files`, run directories and hidden entries in it); each of `runs` inside it
    must pass `check_out`.

    Raises:
        RunDirError: naming --out; nothing has been touched.
    """
    from tunesmith.errors import RunDirError

    out = Path(out).absolute()
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise RunDirError(fsio.not_a_folder(out), f"--out {out}", "give a new folder")
    inside = next((p for p in out.resolve().parents if is_run_dir(p)), None)
    if inside is not None:  # said of --out as given (check_out below would name a run folder inside it)
        raise RunDirError(f"is inside the run directory {inside}; a run's folders hold only what it wrote",
                          f"--out {out}", "give --out a folder outside any run")
    if out.is_dir():  # before the write probe below, so a refused folder is left untouched (its mtime too)
        ours = set(files) | set(runs)
        foreign = sorted(p.name for p in out.iterdir()
                         if p.name not in ours and not p.name.startswith(".") and not is_run_dir(p))
        if foreign:
            raise RunDirError(f"holds files this command did not write ({', '.join(foreign[:3])}); left untouched",
                              f"--out {out}", "give a new or empty folder")
    why = fsio.unwritable_file(out / files[0]) if out.is_dir() else fsio.uncreatable(out)
    if why:
        raise RunDirError(f"cannot be written: {why}", f"--out {out}", "give a folder path you can write to")
    for name in runs:
        check_out(out / name, overwrite)


def lock_path(final: Path) -> Path:
    """The lock file of a run directory, beside it."""
    return final.with_name(f".{final.name}.lock")


@contextmanager
def run_lock(final: Path):
    """Hold `.<run>.lock` (the holder's pid inside) while this process writes the run directory.

    The lock is an flock on that file, which the kernel drops when its holder dies, so the lock file
    of a killed run (a dead pid) is simply taken over.

    Raises:
        RunDirError: another live process holds the lock.
    """
    path = lock_path(Path(final))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, Path(final))
    try:
        yield
    finally:
        if _same_file(path, fd):  # the file this process locked and wrote its pid into, nothing else
            path.unlink(missing_ok=True)  # while still locked: a waiter then sees a new inode and retries
        os.close(fd)


def _same_file(path: Path, fd: int) -> bool:
    try:
        st, fst = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


# All a lock file tunesmith wrote can hold: nothing yet, or a pid and a newline.
_PID_FILE = re.compile(rb"\d{0,20}\n?")


def _acquire(path: Path, final: Path) -> int:
    import fcntl

    from tunesmith.errors import RunDirError

    while True:
        fd = _open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(f"another tunesmith process (pid {holder}) is writing this run directory",
                              str(final),
                              f"wait for it to finish, or give another folder (lock: {path})") from None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:  # else the previous holder removed the file between our open and flock
            if not _PID_FILE.fullmatch(os.pread(fd, 64, 0)):
                os.close(fd)
                raise RunDirError("a file with the lock file's name exists and is not a tunesmith lock (it holds "
                                  "more than a pid); left untouched", str(path),
                                  f"move it away if it is yours, or give another folder than {final}")
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _open_lock(path: Path) -> int:
    """An fd on the lock file, created if missing; never through a symlink, never anything but a plain file."""
    import stat

    from tunesmith.errors import RunDirError

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except PermissionError:
        raise RunDirError("cannot create the run directory's lock file (permission denied)", str(path),
                          "make the folder that holds the run directory writable") from None
    except OSError as e:  # a symlink (ELOOP), a folder (EISDIR), ...
        raise RunDirError(f"the lock file's name is taken by something that is not a tunesmith lock ({e.strerror}); "
                          "left untouched", str(path), "move it away if it is yours, or give another folder") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunDirError("the lock file's name is taken by something that is not a plain file; left untouched",
                          str(path), "move it away if it is yours, or give another folder")
    return fd


@contextmanager
def staged(final: Path, keep_failed: bool = False, resume: bool = False, overwrite: bool = False):
    """Yield a staging folder; on success it replaces `final`, on failure it is removed.

    The run directory is locked for the whole time (a second run into it is refused), and `final`
    must pass `check_out` (an existing run is replaced only with `overwrite`).
    A run that stops after writing training checkpoints (Ctrl-C, a kill that gives no chance to clean
    up, or any error: a damaged checkpoint on resume, a full disk, divergence) keeps its staging folder
    so `tunesmith train --resume` can continue it; hours of training are never deleted by a failure.
    With `resume` the existing staging folder is reused as it is.
    """
    # A resumed run replaces an earlier run at `final` only with `overwrite`, as a new one does.
    check_out(final, overwrite)  # before the lock, so a refused --out leaves no trace at all
    made = missing_folders(final.parent)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(final)
    try:
        with run_lock(final):
            check_out(final, overwrite)
            if not resume:
                _check_staging(staging, final, overwrite)
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir()
                (staging / STAGING_MARKER).touch()
            try:
                yield staging
            except BaseException as e:
                _keep_checkpoints(staging, final, e, keep_failed)
                raise
            (staging / STAGING_MARKER).unlink(missing_ok=True)  # config.yaml still says the folder is ours
            fsio.share_like_umask(staging)
            fsio.replace_dir(staging, final)
            _point_latest(final)
    except BaseException:
        remove_if_empty(made)  # runs/<name>/ made for a run that failed before it held anything
        raise


def missing_folders(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first (what a mkdir makes)."""
    missing, path = [], Path(path).absolute()
    while not (path.exists() or path.is_symlink()) and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_if_empty(folders: list[Path]) -> None:
    """Remove folders this process made, deepest first, while they are empty (a folder something else has
    written into since, a kept checkpoint or another run, stays)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


# A training checkpoint's folder under checkpoints/ (train/checkpoint.py writes them): step-0000012.
CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def enclosing_run(path: Path) -> Path | None:
    """The run directory `path` is, or lies in (links resolved), or None."""
    real = Path(path).resolve()
    return next((p for p in (real, *real.parents) if is_run_dir(p)), None)


def has_checkpoints(staging: Path) -> bool:
    """Whether a staging folder holds a training checkpoint; the record of the training's inputs
    beside them is not one."""
    folder = staging / "checkpoints"
    return folder.is_dir() and any(CHECKPOINT_NAME.match(p.name) and p.is_dir() for p in folder.iterdir())


def _keep_checkpoints(staging: Path, final: Path, error: BaseException, keep_failed: bool) -> None:
    """Remove a failed run's staging folder unless it holds training checkpoints (or `keep_failed`);
    when they are kept, the error says how to resume (KeyboardInterrupt carries the folder for the CLI)."""
    from tunesmith.errors import TunesmithError

    kept = has_checkpoints(staging)
    if not kept:
        if not keep_failed:
            shutil.rmtree(staging, ignore_errors=True)
        return
    error.resume_command = resume_command(final)  # the CLI says how, whatever the error (an internal one, a full disk)
    if isinstance(error, TunesmithError):
        error.hint = ((error.hint + "; ") if error.hint else "") + (
            f"the training checkpoints are kept in {staging}: `{resume_command(final)}` continues "
            "from the newest (delete a damaged one first); training the project again with `--out "
            f"{final} --overwrite` starts afresh")


def resume_command(final: Path) -> str:
    """The command that continues an interrupted run into `final`: with --overwrite where `final` still
    holds the finished run it is replacing (without it, --resume refuses to replace that run)."""
    return f"tunesmith train --resume {final}" + (" --overwrite" if is_run_dir(final) else "")


def _check_staging(staging: Path, final: Path, overwrite: bool) -> None:
    """An interrupted run's checkpoints are work: starting afresh over them needs `overwrite`; a folder
    of that name that tunesmith did not make is never removed."""
    from tunesmith.errors import RunDirError

    if (staging.exists() or staging.is_symlink()) and not _is_staging(staging):
        raise RunDirError(f"{staging} exists and is not a tunesmith staging folder (no {STAGING_MARKER} or "
                          "config.yaml in it); left untouched", f"--out {final}",
                          "move it away if it is yours, or give another --out")
    if has_checkpoints(staging) and not overwrite:
        raise RunDirError("an interrupted run of this folder can be resumed", f"--out {final}",
                          f"continue it with `{resume_command(final)}` (then `tunesmith eval {final}`), "
                          "or pass --overwrite to start again")


def _is_staging(path: Path) -> bool:
    """A real folder that tunesmith made: empty, or holding the marker written at creation or a run's config.yaml."""
    if path.is_symlink() or not path.is_dir():
        return False
    return (path / STAGING_MARKER).is_file() or (path / "config.yaml").is_file() or not any(path.iterdir())


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
    if link.exists() and not link.is_symlink():  # the user's own file or folder: never replace it
        print(f"warning: {link} is not a symbolic link, so it was left alone and does not point to the new run",
              file=sys.stderr)
        return
    tmp = final.parent / f".latest-{secrets.token_hex(8)}"  # a fresh name: nothing of the user's is removed
    os.symlink(final.name, tmp)
    os.replace(tmp, link)


# What every page or comparison of an evaluated run reads.
EVALUATED_FILES = ("summary.json", "metrics.json", "config.yaml")


def read_summary(run_dir: Path) -> dict:
    """A run's summary.json, its verdict (when it has one) checked to be as eval writes it: `objective.met`
    a boolean and each criterion an object whose `met` is a boolean, `value` a number or null and
    `target` a number. An edited verdict ("met": "false", a truthy string) must never read as met.

    Raises:
        DamagedFile: naming summary.json.
    """
    path = Path(run_dir) / "summary.json"
    summary = fsio.read_json(path, dict)
    if "objective" in summary and (problem := _verdict_problem(summary["objective"])):
        raise fsio.DamagedFile(path, f"its objective verdict: {problem}",
                               what="not what tunesmith wrote")
    if "metrics" in summary and (problem := figures_problem(summary["metrics"], "metrics.")):
        raise fsio.DamagedFile(path, problem, what="not what tunesmith wrote")
    return summary


def figures_problem(metrics, prefix: str = "") -> str | None:
    """What makes `metrics` ({baseline, finetuned} as eval writes them) other than objects of numbers or
    null, or None: an edited figure is named here, not met later as a TypeError inside a reader."""
    if not isinstance(metrics, dict):
        return f"{prefix.rstrip('.') or 'the figures'} must be an object, found {type(metrics).__name__}"
    for side in ("baseline", "finetuned"):
        figures = metrics.get(side)
        if side in metrics and not isinstance(figures, dict):
            return f"{prefix}{side} must be an object of figures, found {type(figures).__name__}"
        for name, value in (figures or {}).items():
            # bool is an int to Python (true would read as 1); 1e999 parses as infinity (tunesmith writes null)
            if isinstance(value, (str, bool)) or (isinstance(value, float) and not math.isfinite(value)):
                return f"{prefix}{side}.{name[:60]} must be a finite number or null, found {json.dumps(value)[:40]}"
    return None


def criterion_met(value: float | None, op: str, target: float) -> bool:
    """An objective criterion's rule (evaluate/objective.py judges with it, every reader of summary.json
    checks with it): a figure not measured, NaN or infinite (written as null) is not met."""
    return value is not None and math.isfinite(value) and (value >= target if op == ">=" else value <= target)


def _verdict_problem(verdict) -> str | None:
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)
    if not isinstance(verdict, dict) or not isinstance(verdict.get("met"), bool):
        return "objective.met must be true or false"
    criteria = verdict.get("criteria")
    if not isinstance(criteria, list):
        return "objective.criteria must be a list"
    for i, c in enumerate(criteria):
        if not (isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("met"), bool)
                and (c.get("value") is None or number(c.get("value"))) and number(c.get("target"))
                and c.get("op") in (">=", "<=")):
            return f"objective.criteria[{i}] must hold name, op, a numeric target and value, and met true or false"
        value, target = c["value"], c["target"]
        # the rule eval judged with, on the very numbers it wrote: an edited value or met shows here
        if c["met"] != criterion_met(value, c["op"], target):
            return (f"objective.criteria[{i}] ({c['name'][:40]}) says met {str(c['met']).lower()} for "
                    f"{value} {c['op']} {target}")
    if verdict["met"] != all(c["met"] for c in criteria):
        return "objective.met disagrees with its criteria"
    return None


def check_evaluated(run_dir: Path) -> None:
    """RunDirError unless `run_dir` holds a finished eval: summary.json with a verdict, metrics.json and
    the run's config.yaml (a missing one is named, not met later as an internal error)."""
    from tunesmith.errors import RunDirError

    run_dir = Path(run_dir)
    missing = next((name for name in EVALUATED_FILES if not (run_dir / name).is_file()), None)
    summary = read_summary(run_dir) if (run_dir / "summary.json").is_file() else {}
    if "objective" not in summary:
        failed = summary.get("failed")
        what = (f"the run's {failed.get('stage')} stage failed, so it has no verdict" if isinstance(failed, dict)
                else "the run has not been evaluated (no verdict in summary.json)")
        raise RunDirError(what, str(run_dir), f"run `tunesmith eval {run_dir}`")
    if missing:
        raise RunDirError(f"the evaluated run lacks {missing}", str(run_dir / missing),
                          f"restore it, or run `tunesmith eval {run_dir}` again")


@contextmanager
def reading_run_files(*run_dirs: Path):
    """Code that builds a page or a listing from finished runs' own JSON runs inside this block: a figure
    missing or of the wrong type there (an edited summary.json, a list where a table was) becomes a
    RunDirError naming the runs instead of an internal error. The block also renders (tables, plots, a
    paired test over the runs' predictions), so a bug there would read the same way: the hint says
    --debug shows the traceback, whose cause names the line."""
    from tunesmith.errors import RunDirError

    try:
        yield
    except fsio.DamagedFile:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        again = run_dirs[0] if len(run_dirs) == 1 else "RUN"
        raise RunDirError(f"a figure in the run's JSON files (summary.json, metrics.json, ...) is missing or of "
                          f"the wrong type ({type(e).__name__}: {str(e)[:120]})", " and ".join(map(str, run_dirs)),
                          f"restore them, or run `tunesmith eval {again}` again to rewrite them (--debug shows "
                          "where it was read)") from e
