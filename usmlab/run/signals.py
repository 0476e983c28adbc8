"""How a run answers SIGINT and SIGTERM, at every moment (docs/architecture.md, "signals").

- While it runs, both become KeyboardInterrupt: the run stops cleanly and is kept as
  `interrupted`.
- While a process is being started and recorded, both are held back and delivered right after:
  a process is in the registry (so teardown stops it) before a signal can end the run.
- While it tears down, both are noted, answered with one line, and not obeyed: teardown must
  finish, or processes and tracefs changes would be left behind.

Signals reach the main thread only; elsewhere (a fleet's worker threads) these do nothing.

A KeyboardInterrupt is never raised inside an import (commands and stages import lazily): there
CPython prints and ignores it (importlib's lock callbacks), turns it into a RuntimeError (a
descriptor's __set_name__), or marks it unhandled for good (a dataclass's generated __init__), so
`interrupt` sends the signal again a moment later instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RETRY_S = 0.05  # how soon a signal that arrived inside an import is sent again


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _importing(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def interrupt(signum: int, frame: FrameType | None) -> None:
    """The handler that makes SIGINT/SIGTERM a KeyboardInterrupt, outside imports only."""
    if _importing(frame):
        retry = threading.Timer(RETRY_S, os.kill, (os.getpid(), signum))
        retry.daemon = True
        retry.start()
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """SIGTERM ends a run the way Ctrl-C does."""
    if not _main_thread():
        yield
        return

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back for the duration; raise KeyboardInterrupt after it if one came."""
    if not _main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in _SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt


@contextlib.contextmanager
def signals_noted(say: Callable[[str], None], notice: str) -> Iterator[list[int]]:
    """Note SIGINT/SIGTERM without obeying them; the first one is answered with `notice`."""
    if not _main_thread():
        yield []
        return
    caught: list[int] = []

    def _note(signum: int, frame: object) -> None:
        if not caught:
            say(notice)
        caught.append(signum)

    previous = {s: signal.signal(s, _note) for s in _SIGNALS}
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
