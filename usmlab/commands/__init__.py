"""The verbs of the command line, one module each (in the manner of Molecule's commands).

A verb parses its options, calls the lab library and prints; nothing else. What every verb
shares is here: progress to stderr, errors as one line with their exit status, and the option
types several verbs declare.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from usmlab.errors import EXIT_FAILED, UsmlabError

F = TypeVar("F", bound=Callable[..., Any])


def say(message: str) -> None:
    """Progress goes to stderr so stdout stays the result (run folder, verdict)."""
    print(message, file=sys.stderr, flush=True)


def friendly(func: F) -> F:
    """Turn the library's errors into one line and an exit status, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # Inside the command Ctrl-C is a KeyboardInterrupt the command may handle (a run stops
        # its processes); around it, whatever the entry point installed (usmlab/__main__.py).
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.default_int_handler) if main else None
        try:
            return func(*args, **kwargs)
        except UsmlabError as exc:
            say(f"usmlab: error: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            say("usmlab: interrupted")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if os.environ.get("USMLAB_DEBUG"):
                raise
            say(f"usmlab: internal error: {type(exc).__name__}: {exc} (USMLAB_DEBUG=1 shows more)")
            raise typer.Exit(EXIT_FAILED) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    return wrapper  # type: ignore[return-value]


class TerminalReporter:
    """A run's progress as the tools around it show theirs: on a terminal, a rich progress bar
    for the client's requests (rate, ETA) and a spinner while the tracer attaches; elsewhere (CI
    logs, pipes) the same as plain lines, never an escape sequence."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self._bar: Any = None
        self._task: Any = None
        self._t0 = 0.0

    def say(self, message: str) -> None:
        if self._bar is not None:
            self._bar.console.print(message, markup=False, highlight=False)
        else:
            say(message)

    def requests(self, done: int, total: int | None) -> None:
        if not self.tty:
            say(f"client: {done}/{total if total else '∞'} requests")
            return
        if self._bar is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )  # fmt: skip

            self._bar = Progress(
                TextColumn("client"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=True,
            )  # fmt: skip
            self._bar.start()
            self._task = self._bar.add_task("requests", total=total, rate="")
            self._t0 = time.monotonic()
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        self._bar.update(self._task, completed=done, rate=f"{done / elapsed:.0f} req/s")

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        if not self.tty:
            say(what)
            yield
            return
        from rich.console import Console

        with Console(stderr=True).status(what, spinner="dots"):
            yield

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# Options several verbs take, declared once.
TargetOption = Annotated[
    str | None,
    typer.Option(
        help="local, vagrant or ssh://USER@HOST[:PORT]; default: the lab VM when it exists "
        "in this folder, else local."
    ),
]
IdentityOption = Annotated[Path | None, typer.Option(help="SSH private key.")]
WorkDirOption = Annotated[str | None, typer.Option(help="usmlab's folder on the target.")]
JsonOption = Annotated[
    bool, typer.Option("--json", help="JSON instead of text (shapes: docs/report-schema.md).")
]
