"""Error hierarchy. Input errors exit 2 with one line; anything else is internal (exit 1)."""

from __future__ import annotations


class TunesmithError(Exception):
    """Base error: knows how to print itself as one `error:` line.

    Args:
        what: what went wrong.
        where: file:line or config key it concerns.
        hint: how to fix it.
    """

    exit_code = 1

    def __init__(self, what: str, where: str | None = None, hint: str | None = None):
        super().__init__(what)
        self.what, self.where, self.hint = what, where, hint
        self.details: list[str] = []

    def line(self) -> str:
        # A library's reason often ends its sentence: "not a GGUF file., --candidates X" reads as a typo.
        what = self.what[:-1] if self.what.endswith(".") and not self.what.endswith("..") else self.what
        parts = [what] + [p for p in (self.where, self.hint) if p]
        # One line whatever a library's message holds (pyarrow's span several)
        return "error: " + " ".join(", ".join(parts).split("\n"))

    def __reduce__(self):
        # Subclasses take other constructor arguments than `args` holds: rebuild from the attributes,
        # so an error raised in a child process (data/prepare.py) arrives whole.
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls, args: tuple, state: dict) -> TunesmithError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class InputError(TunesmithError):
    """The user's input (config, data, model name, paths) is wrong: exit 2."""

    exit_code = 2


class ConfigError(InputError):
    """A config file problem; `where` is `file:line (key.path)`."""


class DataError(InputError):
    """A data file problem; `where` is `file:line`."""

    def __init__(self, what: str, path: str, line: int | None = None, hint: str | None = None):
        where = f"{path}:{line}" if line else str(path)
        super().__init__(what, where, hint)
        self.path, self.lineno = path, line


class ModelError(InputError):
    """A model name or checkpoint that cannot be resolved or loaded."""


class RunDirError(InputError):
    """A run directory that is missing or incomplete."""


class ParityError(TunesmithError):
    """An optimisation changed what the model computes beyond tolerance (exit 1: a defect, not bad input)."""


class EngineError(TunesmithError):
    """The engine behind the server (an upstream vLLM) failed or does not answer: HTTP 502 to a
    client, exit 1 from the command."""


class StageError(TunesmithError):
    """A stage after training failed; the run directory was kept with what finished. Exit 1 (130 when
    the stage was interrupted)."""

    def __init__(self, what: str, where: str | None = None, hint: str | None = None, exit_code: int = 1):
        super().__init__(what, where, hint)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, the workbench's Stop) while a command runs, taken as Ctrl-C is: cleanup
    runs (an export's staging folder is removed, a run with checkpoints keeps them for --resume) instead
    of the process vanishing with its half-written folders. Exit 143 (128 + SIGTERM)."""
