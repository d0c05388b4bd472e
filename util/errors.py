"""Errors that end a program with one line: the user's mistakes, and runs that cannot go on.

Everything else (a broken contract between our own modules, a bug) is an ordinary exception and
keeps its traceback. Ctrl-C and SIGTERM end a program with one line too (exit codes 130 and 143).
"""
import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

SIGINT_EXIT, SIGTERM_EXIT = 130, 143  # the shells' convention: 128 + the signal's number


class DraemStop(Exception):
    """A run ends here with a one-line message that says what happened and what to do; not a bug."""

    exit_code = 1


class DraemInputError(DraemStop):
    """Something the user gave (a flag, a path, a category, a file, a checkpoint) is wrong; the message says
    how to fix it."""


class TrainingDiverged(DraemStop):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class ParityCheckFailed(DraemStop):
    """An exported model computes something other than the PyTorch model it came from."""


class WriteFailed(DraemStop):
    """A file could not be written (disk full, read-only, no permission); the message names it. Nothing
    half-written stays."""


class Terminated(BaseException):
    """Raised in the main process on SIGTERM, so that cleanup runs as for Ctrl-C (a BaseException, like
    KeyboardInterrupt)."""


class Interrupted(DraemStop):
    """The user stopped the run (Ctrl-C or SIGTERM); the message says what was saved. Exits 130 or 143."""

    def __init__(self, message: str, signal_exit: int = SIGINT_EXIT):
        super().__init__(message)
        self.exit_code = signal_exit


def interrupted(stop: BaseException, message: str) -> Interrupted:
    """The Interrupted error for a KeyboardInterrupt or Terminated `stop`, with its exit code."""
    return Interrupted(message, SIGTERM_EXIT if isinstance(stop, Terminated) else SIGINT_EXIT)


def one_line(exc: BaseException) -> str:
    """The message of `exc`, also when a DataLoader worker raised it.

    torch re-raises a worker's exception as the same type with the worker's whole traceback as its text
    ("Caught DraemInputError in DataLoader worker process 0. Original Traceback ..."); the original message
    is its last line, after the exception's name.
    """
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        _, found, message = text.rstrip().splitlines()[-1].partition(f"{type(exc).__name__}: ")
        if found:
            return message
    return text


def _sigterm_raises(owner: int) -> Callable:
    def handler(signum, frame):
        if os.getpid() == owner:  # forked DataLoader workers inherit the handler; their parent ends them
            raise Terminated
    return handler


def one_line_errors(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a program's main: a DraemStop prints `error: <message>` on stderr and exits with its code (1),
    Ctrl-C and SIGTERM print `error: interrupted` and exit 130 and 143, all without a traceback; temporary
    files are cleaned up."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        installed = True
        try:
            previous = signal.signal(signal.SIGTERM, _sigterm_raises(os.getpid()))
        except ValueError:  # not the main thread: leave signals alone
            installed = False
        try:
            return main(*args, **kwargs)
        except DraemStop as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except (KeyboardInterrupt, Terminated) as stop:
            print("error: interrupted; nothing half-written is left", file=sys.stderr)
            sys.exit(interrupted(stop, "").exit_code)
        finally:
            if installed:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    return wrapper
