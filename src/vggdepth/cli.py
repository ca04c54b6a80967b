"""What every command-line entry point shares: logging to stderr and one clear line per user error."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

import typer

from vggdepth.errors import VggdepthError

F = TypeVar("F", bound=Callable)


def entry_point(fn: F) -> F:
    """Wrap a typer command: set up logging; turn a `VggdepthError` into `error: ...` and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        try:
            return fn(*args, **kwargs)
        except VggdepthError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except OSError as exc:  # a file or folder the code did not expect to fail on: name it, no traceback
            where = f" ({exc.filename})" if exc.filename else ""
            typer.echo(f"error: {exc.strerror or exc}{where}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
