"""No silent waits: a line every few seconds while a long VM step prints nothing.

Uploading a box or updating a libvirt domain can keep Vagrant quiet for a minute; a user (or a
CI log) must see what is waited for and for how long.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType

EVERY = 5.0  # seconds of silence before a line


class Ticker:
    """`with Ticker(say, "vagrant up") as tick: ... tick.heard()` on each output line."""

    def __init__(self, say: Callable[[str], None], what: str, every: float = EVERY) -> None:
        self.say, self.what, self.every = say, what, every
        self.started = self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def heard(self) -> None:
        self.last = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            now = time.monotonic()
            if now - self.last >= self.every:
                self.last = now
                self.say(f"[vm {now - self.started:4.0f}s] still waiting for {self.what}")

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
