"""User-facing errors: bad input is reported as one line and a non-zero exit, never a traceback."""
import argparse
import functools
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class DraemInputError(Exception):
    """Something the user gave (a path, a category, a file, a checkpoint) is wrong; the message says how to fix it."""


def exit_on_input_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a script's main so a DraemInputError prints `error: <message>` on stderr and exits 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except DraemInputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)

    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 1, like every other input error."""

    def error(self, message: str) -> None:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(1)
