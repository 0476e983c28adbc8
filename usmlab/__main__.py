"""`usmlab` and `python -m usmlab`: Ctrl-C and SIGTERM are answered from the first line on.

Loading the CLI (typer, and pydantic under it) takes a few hundred milliseconds; a signal then
ends usmlab with one line and status 130, not a traceback. Inside a command, the command's own
handling takes over (commands/__init__.py `friendly`; a run stops cleanly, run/signals.py).

Outside a command nothing has been started, so the handler ends the process at once rather than
raising: an exception raised from a signal handler lands wherever the interpreter is, and during
imports that is inside importlib's lock callbacks (where it is printed and ignored, and the run
went on) or a class body (where it became a RuntimeError).

An interrupted command ends with os._exit too: CPython 3.11 marks a KeyboardInterrupt that escapes
an exec() of source text (dataclasses build their __init__ that way, so a Ctrl-C while a command
imports its modules can land there) as unhandled for good, and then ends the process by SIGINT
whatever status usmlab exits with. The command has stopped what it started before it returns 130.
"""

import contextlib
import os
import signal
import sys

from usmlab.errors import EXIT_INTERRUPTED  # imports nothing: costs nothing before the handler


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, RuntimeError):  # closed, or mid-write
            stream.flush()


def _interrupted(signum: int, frame: object) -> None:
    _flush()
    os.write(2, b"usmlab: interrupted\n")
    os._exit(EXIT_INTERRUPTED)


def main() -> None:
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    from usmlab.cli import app

    try:
        app(prog_name="usmlab")
    except SystemExit as exc:
        if exc.code == EXIT_INTERRUPTED:
            _flush()
            os._exit(EXIT_INTERRUPTED)
        raise


if __name__ == "__main__":
    main()
