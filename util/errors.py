"""Errors that end a program with one line: the user's mistakes, and runs that cannot go on.

Everything else (a broken contract between our own modules, a bug) is an ordinary exception and
keeps its traceback.
"""
import functools
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class DraemStop(Exception):
    """A run ends here with a one-line message that says what happened and what to do; not a bug."""


class DraemInputError(DraemStop):
    """Something the user gave (a flag, a path, a category, a file, a checkpoint) is wrong; the message says how to fix it."""


class TrainingDiverged(DraemStop):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class ParityCheckFailed(DraemStop):
    """An exported model computes something other than the PyTorch model it came from."""


def one_line_errors(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a program's main so a DraemStop prints `error: <message>` on stderr and exits 1, without a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except DraemStop as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)

    return wrapper
