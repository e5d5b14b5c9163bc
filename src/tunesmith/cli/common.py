"""What every command shares: how it runs (`guarded`: one `error:` line and an exit code, never a
traceback unless --debug) and the options that mean the same everywhere."""

from __future__ import annotations

import sys
import traceback
from typing import Callable

import typer

from tunesmith import fsio
from tunesmith.errors import TunesmithError
from tunesmith.logs import quiet_libraries

DEBUG = typer.Option(False, "--debug", help="Show the Python traceback on errors.")
OUT = typer.Option(None, "--out", help="Run directory to create (default: runs/<name>/<run-id>/ beside the config).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")
OVERWRITE = typer.Option(False, "--overwrite",
                         help="Replace an earlier run in --out (never a folder that is not a run).")


def guarded(debug: bool, fn: Callable[[], int], details: bool = False) -> None:
    """Run a command: input errors -> one `error:` line and exit 2; internal errors -> exit 1.

    With `details`, the error's extra lines (e.g. every bad row) follow, indented.
    """
    quiet_libraries()
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
    except KeyboardInterrupt:
        print("error: interrupted; training checkpoints, if any were written, are kept for "
              "`tunesmith train --resume RUN_DIR`", file=sys.stderr)
        raise typer.Exit(130) from None
    except Exception as e:  # an internal bug: say so in one line unless --debug
        if debug:
            traceback.print_exc()
        print(f"error: internal error: {type(e).__name__}: {e}, rerun with --debug for the traceback",
              file=sys.stderr)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


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
            sys.exit(getattr(e, "exit_code", 2))
        message = " ".join(text.split()).rstrip(".")
        if message:
            ctx = getattr(e, "ctx", None)
            where = ctx.command_path if ctx is not None else "tunesmith"
            print(f"error: {message}, {where}, see `{where} --help`", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)

