"""What every command shares: how it runs (`guarded`: one `error:` line and an exit code, never a
traceback unless --debug) and the options that mean the same everywhere."""

from __future__ import annotations

import errno
import select
import signal
import sys
import threading
import traceback
from typing import Callable, NoReturn

import typer

from tunesmith import fsio
from tunesmith.errors import Terminated, TunesmithError
from tunesmith.logs import quiet_libraries

DEBUG = typer.Option(False, "--debug", help="Show the Python traceback on errors.")
OUT = typer.Option(None, "--out", help="Run directory to create (default: runs/<name>/<run-id>/ beside the config).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")
OVERWRITE = typer.Option(False, "--overwrite",
                         help="Replace an earlier run in --out (never a folder that is not a run).")


def name_list(given: str, option: str) -> list[str]:
    """A comma-separated option of names (--variants, --methods), stripped, empty items dropped. Bytes
    that are not UTF-8 (the shell passes them as lone surrogates) are no name: an InputError naming the
    option, not an encoding error deep inside validation."""
    from tunesmith.errors import InputError

    try:
        given.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("holds bytes that are not UTF-8 text", option, "give names in plain text") from None
    return [item.strip() for item in given.split(",") if item.strip()]


def guarded(debug: bool, fn: Callable[[], int], details: bool = False, resumable: bool = False) -> None:
    """Run a command: input errors -> one `error:` line and exit 2; internal errors -> exit 1; Ctrl-C
    130 and SIGTERM 143.

    With `details`, the error's extra lines (e.g. every bad row) follow, indented. `resumable`: the
    command writes training checkpoints (run, train), which an interruption's message points to.
    """
    quiet_libraries()
    previous = _interrupt_on_sigterm()
    try:
        code = fn()
    except TunesmithError as e:
        if debug:
            traceback.print_exc()
        print(e.line(), file=sys.stderr)
        for detail in e.details if details else []:
            print(f"  {detail}", file=sys.stderr)
        raise typer.Exit(e.exit_code) from None
    except fsio.DamagedFile as e:  # a run's own file, damaged: bad input, not a bug
        if debug:
            traceback.print_exc()
        print(e, file=sys.stderr)
        raise typer.Exit(2) from None
    except BrokenPipeError as e:  # the output's reader gone, or a pipe or socket of the work itself (a bug)
        if not _stdout_broken():
            _internal(e, debug)
        reader_gone()
    except OSError as e:
        _file_system_error(e, debug)
    except RuntimeError as e:
        if not str(e).startswith("Symlink loop from "):
            _internal(e, debug)
        # Path.resolve() before Python 3.13 reports a link loop so, not as OSError(ELOOP): the same answer
        _file_system_error(OSError(errno.ELOOP, "link loop", str(e).removeprefix("Symlink loop from ")
                                   .strip("'")), debug)
    except KeyboardInterrupt as e:
        hint = _kept(e) or ("; training checkpoints, if any were written, are kept for "
                            "`tunesmith train --resume RUN_DIR`")
        print(f"error: {'terminated' if isinstance(e, Terminated) else 'interrupted'}{hint if resumable else ''}",
              file=sys.stderr)
        raise typer.Exit(143 if isinstance(e, Terminated) else 130) from None
    except Exception as e:
        _internal(e, debug)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    raise typer.Exit(code)


# What the file system refused, for a path the error names: the user's files or folders, not a bug.
_REFUSED = {errno.EACCES: ("permission denied", "give this user access to it, or choose another path"),
            errno.EPERM: ("operation not permitted", "give this user access to it, or choose another path"),
            errno.EROFS: ("the file system is read-only", "choose a path on a writable disk"),
            errno.EISDIR: ("a folder where a file is expected", "move the folder away, or choose another path"),
            errno.ENOTDIR: ("a file where a folder is expected", "move the file away, or choose another path"),
            errno.ELOOP: ("too many levels of symbolic links (a link loop?)", "fix the link")}


def _file_system_error(e: OSError, debug: bool) -> NoReturn:
    """A path too long, a full disk, or a path the file system refuses (no permission, a folder where a
    file should be): said in one line naming the path, exit 2; any other OSError is a bug."""
    named = e.filename is not None or e.filename2 is not None
    if e.errno not in (errno.ENAMETOOLONG, errno.ENOSPC, errno.EDQUOT) and not (named and e.errno in _REFUSED):
        _internal(e, debug)
    if debug:
        traceback.print_exc()
    name = str(e.filename if e.filename is not None else e.filename2 if e.filename2 is not None else e)
    name = f"{name[:120]}{'...' if len(name) > 120 else ''}"
    if e.errno == errno.ENAMETOOLONG:  # only a path the user gave (--out, a config's name) is too long
        print(f"error: a name in the path is too long for the file system, {name}, give a shorter path (or a "
              "shorter `name` in the config)", file=sys.stderr)
    elif e.errno in _REFUSED:
        what, hint = _REFUSED[e.errno]
        print(f"error: {what}, {name}, {hint}{_kept(e)}", file=sys.stderr)
    else:
        kept = _kept(e) or " (nothing half-written was kept)"
        print(f"error: no space left on the disk ({e.strerror}), {name}, free some space or write to another "
              f"disk{kept}", file=sys.stderr)
    raise typer.Exit(2) from None


def _stdout_broken() -> bool:
    """Whether standard output's reader is gone: a flush fails, or the pipe reports an error."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    except (OSError, ValueError):
        return False
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no fileno (captured output), no poll on this platform
        return False


def reader_gone() -> NoReturn:
    """The output's reader went away (`tunesmith runs list | head`): stop quietly with the shell's status for
    a SIGPIPE death, 141, as the tools the output was piped from do. Anything left buffered goes nowhere,
    so the interpreter's own flush at exit cannot fail a second time."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(141)


def _kept(e: BaseException) -> str:
    """How a failed run's kept training checkpoints continue (runs.staged sets `resume_command`), or ""."""
    command = getattr(e, "resume_command", None)
    return f"; the training checkpoints are kept: `{command}` continues" if command else ""


def _interrupt_on_sigterm():
    """Raise Terminated on SIGTERM while the command runs; returns the previous handler (None where
    handlers cannot be set: off the main thread, as under a test runner's worker)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(signum, frame):
        raise Terminated()
    return signal.signal(signal.SIGTERM, terminate)


def _internal(e: Exception, debug: bool) -> NoReturn:
    """An internal bug: say so in one line unless --debug; exit 1."""
    if debug:
        traceback.print_exc()
    rerun = "" if debug else ", rerun with --debug for the traceback"
    print(f"error: internal error: {type(e).__name__}: {e}{rerun}{_kept(e)}", file=sys.stderr)
    raise typer.Exit(1) from None


def run_app(app: typer.Typer) -> None:
    """Run the CLI and exit with its code. A wrong command line (unknown option, bad value, missing argument) is one
    `error:` line and exit 2 like every other bad input, not click's framed usage box."""
    from typer.exceptions import TyperException

    try:
        code = app(standalone_mode=False)
    except TyperException as e:  # click's UsageError family, as typer ships it
        text = e.format_message() if hasattr(e, "format_message") else str(e)
        if type(e).__name__ == "NoArgsIsHelpError":  # no arguments: the help, which rich may have printed already
            print(text, end="\n" if text else "")
            ctx = getattr(e, "ctx", None)
            where = ctx.command_path if ctx is not None else _command_path(app)
            print(f"error: missing command, {where}, see the commands above", file=sys.stderr)
            sys.exit(getattr(e, "exit_code", 2))
        message = " ".join(text.split()).rstrip(".")
        if message:
            ctx = getattr(e, "ctx", None)
            where = ctx.command_path if ctx is not None else _command_path(app)
            print(f"error: {message}, {where}, see `{where} --help`", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except SystemExit as e:
        # rich, printing the help into a pipe whose reader went (`tunesmith --help | head -1`), sends stdout to
        # /dev/null and exits 1 while handling the BrokenPipeError: the same stop as any other command's, 141
        if isinstance(e.__context__, BrokenPipeError):
            sys.exit(141)
        raise
    try:
        sys.stdout.flush()  # what is still buffered, while a closed pipe can still be told apart
    except BrokenPipeError:
        reader_gone()
    sys.exit(code if isinstance(code, int) else 0)


def _command_path(app: typer.Typer) -> str:
    """`tunesmith report` for an error click raised without its context (an option's arity): the commands
    named at the start of the command line."""
    group, path = typer.main.get_command(app), ["tunesmith"]
    for arg in sys.argv[1:]:
        command = getattr(group, "commands", {}).get(arg)
        if command is None:
            break
        path.append(arg)
        group = command
    return " ".join(path)
