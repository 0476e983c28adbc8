"""`usmlab` and `python -m usmlab`: Ctrl-C and SIGTERM are answered from the first line on.

Loading the CLI (typer, and pydantic under it) takes a few hundred milliseconds; a signal then
ends usmlab with one line and status 130, not a traceback. Inside a command, the command's own
handling takes over (commands/__init__.py `friendly`; a run stops cleanly, run/signals.py).
"""

import signal
import sys


def _interrupted(signum: int, frame: object) -> None:
    print("usmlab: interrupted", file=sys.stderr, flush=True)
    sys.exit(130)


def main() -> None:
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    from usmlab.cli import app

    app(prog_name="usmlab")


if __name__ == "__main__":
    main()
