"""The one place that turns errors into what a person reads, and into exit codes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import ParamSpec, TypeVar

import typer
from pydantic import ValidationError

from shoal.errors import ShoalError

P = ParamSpec("P")
R = TypeVar("R")

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

_HINTS = {
    401: "check the token: SHOAL_TOKEN, or the client file `shoal dev` writes",
    403: "this needs another role or the job's owner",
    404: "list what exists with `shoal jobs` or `shoal nodes`",
}  # a 503's own message says what to do: a node away, an election, an outcome to check


def fail(message: str, hint: str = "", code: int = 1, details: list[str] = ()) -> typer.Exit:
    # Rich is imported only to say what went wrong: a daemon starts without it.
    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    err.print(f"[bold red]error:[/] {message}")
    for line in details:
        err.print(f"  {line}")
    if hint:
        err.print(f"[dim]hint: {hint}[/]")
    return typer.Exit(code)


def friendly(fn: Callable[P, R]) -> Callable[P, R]:
    """Run a command, turning shoal's errors into a message and an exit code."""

    @wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except ValidationError as e:
            details = [f"[yellow]{'.'.join(map(str, p['loc']))}[/]: {p['msg']}" for p in e.errors()]
            raise fail("invalid settings or spec", code=EXIT_USAGE, details=details) from None
        except ShoalError as e:
            raise _failure(e) from None
        except OSError as e:
            raise fail(str(e)) from None
        except KeyboardInterrupt:
            sys.exit(130)

    return run


def _failure(e: ShoalError) -> typer.Exit:
    # The client is imported only now: commands that never use it (`shoal agent`) start
    # without httpx, and a client error can only come from a command that imported it.
    from shoal.client import ApiError, Unreachable

    if isinstance(e, ApiError):
        details = [f"[yellow]{f.field}[/]: {f.reason}" for f in e.fields if f.reason not in e.message]
        code = EXIT_USAGE if e.status < 500 else 1
        return fail(e.message, _HINTS.get(e.status, ""), code, details)
    if isinstance(e, Unreachable):
        return fail(str(e), code=EXIT_UNAVAILABLE)
    return fail(str(e))
