"""What every command-line entry point shares: logging to stderr, one clear line per user error, and signals that
end it cleanly (vggdepth.signals): one `interrupted (...)` line and exit status 128 + the signal."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

import typer

from vggdepth import signals
from vggdepth.errors import VggdepthError

F = TypeVar("F", bound=Callable)


def entry_point(fn: F) -> F:
    """Wrap a typer command: set up logging; turn a `VggdepthError` into `error: ...` and exit status 1; turn
    SIGTERM, SIGHUP, SIGINT, or the end of the process that started this one, into an interruption that the
    command's code cleans up after, then `interrupted (SIGTERM): <what was kept>` and exit status 128 + signal."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        try:
            with signals.handled():
                return fn(*args, **kwargs)
        except KeyboardInterrupt as exc:  # a signal (vggdepth.signals), or Ctrl-C
            typer.echo(signals.interruption_line(exc), err=True)
            raise typer.Exit(signals.exit_status(exc)) from None
        except VggdepthError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except OSError as exc:  # a file or folder the code did not expect to fail on: name it, no traceback
            where = f" ({exc.filename})" if exc.filename else ""
            typer.echo(f"error: {exc.strerror or exc}{where}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
