"""What every subcommand shares: one-line errors with a non-zero exit, and the rich consoles.

The consoles print plain text (`markup=False`): paths, sample ids and policy names come from users,
and rich would read `[old]` in a path as a style tag and drop it, or fail on `[/x]`. Styling is
given explicitly, as `Text` spans (see `reports_errors`), never parsed out of a message.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from kvsim.errors import KvsimError

# Tables stay readable when output goes to a file or CI log (rich assumes 80 columns there).
_PIPED_WIDTH = 140
console = Console(markup=False, width=None if Console().is_terminal else _PIPED_WIDTH)
err_console = Console(stderr=True, markup=False, width=None if Console(stderr=True).is_terminal else _PIPED_WIDTH)

EXIT_BAD_INPUT = 2
# An error line quotes the user's value; a 10 MB value is cut in the middle, keeping the fix at the end.
MAX_MESSAGE_CHARS = 600

Command = TypeVar("Command", bound=Callable)


def reports_errors(command: Command) -> Command:
    """Turn a `KvsimError` into `error: <message>` on stderr and exit status 2, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KvsimError as err:
            print_labelled(err_console, "error:", shorten(str(err)))
            raise typer.Exit(EXIT_BAD_INPUT) from None

    return wrapper  # type: ignore[return-value]


def print_labelled(target: Console, label: str, message: str) -> None:
    """`label message` on one line, the label in bold red, the message as plain text."""
    target.print(Text.assemble((label, "bold red"), " ", message), soft_wrap=True, highlight=False)


def shorten(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message` on one line and at most about `limit` characters, its middle cut out if longer."""
    message = " ".join(message.splitlines())
    if len(message) <= limit:
        return message
    keep = limit // 2
    return f"{message[:keep]} … ({len(message) - 2 * keep} characters cut) … {message[-keep:]}"


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def progress_bars() -> Progress:
    """The progress display every long-running subcommand uses."""
    columns = (SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console)
