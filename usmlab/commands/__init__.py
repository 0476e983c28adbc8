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

from usmlab.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_READER_GONE, UsmlabError
from usmlab.progress import SILENCE, Phase, Progress, Reporter
from usmlab.run.signals import interrupt

F = TypeVar("F", bound=Callable[..., Any])


def say(message: str) -> None:
    """Progress goes to stderr so stdout stays the result (run folder, verdict)."""
    print(message, file=sys.stderr, flush=True)


def _reader_gone(stream: Any) -> bool:
    """Whether `stream` is a pipe whose reading end is closed (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def friendly(func: F) -> F:
    """Turn the library's errors into one line and an exit status, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # Inside the command Ctrl-C is a KeyboardInterrupt the command may handle (a run stops
        # its processes); around it, whatever the entry point installed (usmlab/__main__.py).
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, interrupt) if main else None
        try:
            return func(*args, **kwargs)
        except UsmlabError as exc:
            say(f"usmlab: error: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            say("usmlab: interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except (typer.Exit, typer.Abort):
            raise
        except BrokenPipeError:
            if not _reader_gone(sys.stdout):
                raise
            # `usmlab runs | head`: the reader has what it wanted; end quietly, as a shell
            # pipeline's writer does (128 + SIGPIPE), with nothing more written to the pipe.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(EXIT_READER_GONE) from None
        except Exception as exc:
            if os.environ.get("USMLAB_DEBUG"):
                raise
            say(f"usmlab: internal error: {type(exc).__name__}: {exc} (USMLAB_DEBUG=1 shows more)")
            raise typer.Exit(EXIT_FAILED) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    return wrapper  # type: ignore[return-value]


class TerminalReporter(Reporter):
    """Progress as the tools around it show theirs: on a terminal, rich progress bars (client
    requests with rate and ETA; box build, VM boot, provisioning and collect with their steps)
    and a spinner while the tracer attaches; elsewhere (CI logs, pipes) the plain lines of
    usmlab/progress.py, never an escape sequence."""

    def __init__(self) -> None:
        super().__init__(say)
        self.tty = sys.stderr.isatty()
        self._live: Any = None  # the rich Progress on screen, which lines must print above
        self._task: Any = None
        self._t0 = 0.0

    def say(self, message: str) -> None:
        if self._live is not None:
            self._live.console.print(message, markup=False, highlight=False)
        else:
            say(message)

    def requests(self, done: int, total: int | None) -> None:
        if not self.tty:
            super().requests(done, total)
            return
        if self._live is None:
            from rich.progress import MofNCompleteColumn, TimeRemainingColumn

            self._live = _bar(MofNCompleteColumn(), _text("{task.fields[rate]}"),
                              TimeRemainingColumn(), transient=True)  # fmt: skip
            self._live.start()
            self._task = self._live.add_task("client", total=total, rate="")
            self._t0 = time.monotonic()
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        self._live.update(self._task, completed=done, rate=f"{done / elapsed:.0f} req/s")

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        if not self.tty:
            with super().waiting(what):
                yield
            return
        from rich.console import Console

        with Console(stderr=True).status(what, spinner="dots"):
            yield

    @contextlib.contextmanager
    def phase(self, what: str, total: int | None = None, every: float = SILENCE) -> Iterator[Phase]:
        if not self.tty:
            with super().phase(what, total, every) as phase:
                yield phase
            return
        self.close()  # a requests bar still drawn: its requests are over when a phase begins
        from rich.progress import MofNCompleteColumn, TimeElapsedColumn

        live = _bar(MofNCompleteColumn(), TimeElapsedColumn(), _text("{task.fields[note]}"))
        task = live.add_task(what, total=total, note="")
        self._live = live
        try:
            with live:
                yield _BarPhase(self.say, what, total, live, task)
        finally:
            self._live = None

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


class _BarPhase(Phase):
    """A phase drawn as a rich bar: steps done of the total, the step under way, its latest
    output."""

    def __init__(self, say: Progress, what: str, total: int | None, live: Any, task: Any) -> None:
        super().__init__(say, what, total)
        self.live, self.task = live, task

    def step(self, number: int, note: str, total: int | None = None) -> None:
        self._begin(number, total, note)  # the bar says it; no line

    def shown(self) -> None:
        note = f"{self.note}: {self.latest}" if self.latest else self.note
        width = max(self.live.console.width - 60, 20)
        self.live.update(self.task, total=self.total, completed=self.done, note=note[:width])


def _bar(*columns: Any, transient: bool = False) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, Progress

    return Progress(_text("{task.description}"), BarColumn(), *columns,
                    console=Console(stderr=True), transient=transient)  # fmt: skip


def _text(template: str) -> Any:
    """A rich text column (rich is imported only when a bar is drawn: the CLI starts faster)."""
    from rich.progress import TextColumn

    return TextColumn(template)


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
