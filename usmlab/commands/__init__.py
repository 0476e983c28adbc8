"""The verbs of the command line, one module each (in the manner of Molecule's commands).

A verb parses its options, calls the lab library and prints; nothing else. What every verb
shares is here: progress to stderr, errors as one line with their exit status, and the option
types several verbs declare.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from collections.abc import Callable
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


# Options several verbs take, declared once.
TargetOption = Annotated[str, typer.Option(help="local or ssh://USER@HOST[:PORT].")]
IdentityOption = Annotated[Path | None, typer.Option(help="SSH private key.")]
WorkDirOption = Annotated[str | None, typer.Option(help="usmlab's folder on the target.")]
JsonOption = Annotated[
    bool, typer.Option("--json", help="JSON instead of text (shapes: docs/report-schema.md).")
]
