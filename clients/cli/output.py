"""Exit codes and printing, shared by every command.

Output is often a pipe (``mqchat listen | grep``): each line is flushed at once, and a
reader that goes away ends the command quietly instead of with a traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Final, NoReturn

import typer

import mqchat
from core.supervisor import EXIT_FORCED as EXIT_FORCED
from core.supervisor import say as say

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNAVAILABLE: Final = 69  # EX_UNAVAILABLE
EXIT_TEMPFAIL: Final = 75  # EX_TEMPFAIL: try again, it may work
EXIT_NOPERM: Final = 77  # EX_NOPERM
EXIT_CONFIG: Final = 78  # EX_CONFIG


def fail(code: int, message: str) -> NoReturn:
    typer.echo(f"mqchat: {message}", err=True)
    raise typer.Exit(code)


def refused(code: str, detail: str) -> NoReturn:
    typer.echo(f"error {code}: {detail}", err=True)
    raise typer.Exit(EXIT_REFUSED)


@contextlib.contextmanager
def answered(no_answer: Callable[[mqchat.SendTimeout], str]) -> Iterator[None]:
    """The CLI's ends for a change the server did not take: refused, it exits 1 with the
    server's code; unanswered in time, 75 with ``no_answer(exc)``, what to do next."""
    try:
        yield
    except mqchat.SendTimeout as exc:
        typer.echo(f"error {exc.code}: {no_answer(exc)}", err=True)
        raise typer.Exit(EXIT_TEMPFAIL) from None
    except mqchat.MessageRefused as exc:
        refused(exc.code, exc.detail)


def emit(line: str) -> None:
    """Print one line at once (output is often a pipe); a closed pipe ends quietly."""
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush does not complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(EXIT_OK) from None
