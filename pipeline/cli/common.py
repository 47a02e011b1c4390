"""What the commands share: option choices (typer shows them as ``[a|b|c]``), the one-line error exit,
and the wrapper that turns every :class:`~schemas.errors.UserError` into it."""
from __future__ import annotations

import functools
import logging
import sys
from enum import Enum
from typing import Callable, NoReturn

import typer

from schemas.errors import UserError


class EncoderChoice(str, Enum):
    dinov2 = "dinov2"
    siglip2 = "siglip2"
    mae = "mae"
    siglip = "siglip"  # alias of siglip2


class WeightsChoice(str, Enum):
    """Which weights of a checkpoint: the EMA's or the trained model's."""

    ema = "ema"
    model = "model"


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def fail(message: str, code: int = 1) -> NoReturn:
    """End the command: ``Error: <message>`` on stderr, exit ``code``."""
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


def error_line(e: BaseException) -> str:
    """The user's message of ``e``. An error raised in a DataLoader worker arrives re-raised with
    "Caught X in DataLoader worker process N" and the worker's traceback: keep its last line's message."""
    text = str(e)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        name = type(e).__name__
        return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return text


# Besides UserError: a path that does not exist, raised by the libraries underneath (fsspec, PIL, torch).
_ONE_LINE = (UserError, FileNotFoundError)


def user_command(fn: Callable) -> Callable:
    """Wrap a command so that the errors a user causes end it with one line and exit code 1; any
    other exception is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def command(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _ONE_LINE as e:
            fail(error_line(e))

    return command


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time of the message (test runners swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except (OSError, ValueError):
            self.handleError(record)


def log_to_stderr(name: str = "pipeline") -> None:
    """Our INFO messages on stderr, once (the CLI owns the process; library code does not)."""
    logger = logging.getLogger(name)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
        logger.setLevel(logging.INFO)
