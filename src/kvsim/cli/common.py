"""What every subcommand shares: one-line errors with a non-zero exit, and the rich consoles."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from kvsim.errors import KvsimError

# Tables stay readable when output goes to a file or CI log (rich assumes 80 columns there).
_PIPED_WIDTH = 140
console = Console(width=None if Console().is_terminal else _PIPED_WIDTH)
err_console = Console(stderr=True, width=None if Console(stderr=True).is_terminal else _PIPED_WIDTH)

EXIT_BAD_INPUT = 2

Command = TypeVar("Command", bound=Callable)


def reports_errors(command: Command) -> Command:
    """Turn a `KvsimError` into `error: <message>` on stderr and exit status 2, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KvsimError as err:
            err_console.print(f"[bold red]error:[/] {err}", soft_wrap=True, highlight=False)
            raise typer.Exit(EXIT_BAD_INPUT) from None

    return wrapper  # type: ignore[return-value]


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def progress_bars() -> Progress:
    """The progress display every long-running subcommand uses."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console)
