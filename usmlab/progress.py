"""How the library tells its progress, one owner for every long step (docs/architecture.md).

A `Progress` is a line sink (`print`, a list's `append`): the library's lowest common
denominator. A `Reporter` adds what long steps need: a count of requests, a wait, and a
`phase` (box build, VM boot, provisioning, collect) with its steps done of a total. This plain
Reporter writes lines, and a line every few seconds while a phase is silent (no silent waits:
uploading a box can keep Vagrant quiet for a minute); the CLI's reporter
(usmlab/commands/__init__.py) draws the same as rich bars and spinners on a terminal.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType

Progress = Callable[[str], None]

SILENCE = 5.0  # seconds of silence in a phase before a "still waiting" line


def discard(message: str) -> None:
    """The default sink: a library call says nothing unless asked to."""


class Phase:
    """One long step made of numbered steps, told as lines (the CLI's subclass draws a bar).

    `line` is the step's own output (it also proves the step is alive), `step` says which step
    begins (the ones before it are done), `finish` that all are done. Steps never go back.
    """

    def __init__(self, say: Progress, what: str, total: int | None) -> None:
        self.say, self.what, self.total = say, what, total
        self.done = 0  # steps finished
        self.current = 0  # the step under way
        self.note = ""
        self.latest = ""  # the step's latest output, when it is too chatty to show every line
        self.started = self.last = time.monotonic()

    def line(self, text: str, step: int | None = None, total: int | None = None) -> None:
        """A line of output; with `step`, that line also begins step `step` (of `total`)."""
        self.last = time.monotonic()
        self._begin(step, total, text)
        self.say(text)

    def step(self, number: int, note: str, total: int | None = None) -> None:
        """Step `number` begins; said as a line since it has no output of its own."""
        self.last = time.monotonic()
        if self._begin(number, total, note):
            self.say(f"[{self.what} {self.elapsed():4.0f}s] {number}/{self.total or '?'} {note}")

    def files(self, number: int, total: int, name: str) -> None:
        """A copy of `total` files: file `number` begins (`Target.fetch_dir`'s `on_file`)."""
        self.step(number, name, total)

    def detail(self, text: str) -> None:
        """Output too chatty to show line by line: the bar (or the next "still waiting" line)
        shows the latest."""
        if text:
            self.latest = text
            self.shown()

    def finish(self, note: str = "done") -> None:
        """Every step is done (a phase that ends early is not finished: its bar says so)."""
        self.total = self.total or self.current
        self.current, self.done, self.note = self.total + 1, self.total, note
        self.shown()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _begin(self, step: int | None, total: int | None, note: str) -> bool:
        if total:
            self.total = total
        if step is None or step <= self.current:
            return False
        self.current, self.done, self.note = step, step - 1, note
        self.shown()
        return True

    def shown(self) -> None:
        """Called when the step changes: the hook a bar redraws from."""


class Reporter:
    """Where the library tells its progress: lines, a count of requests, a wait, a phase."""

    def __init__(self, say: Progress = discard) -> None:
        self._sink = say

    def say(self, message: str) -> None:
        self._sink(message)

    def requests(self, done: int, total: int | None) -> None:
        self.say(f"client: {done}/{total if total else '∞'} requests")

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        self.say(what)
        yield

    @contextlib.contextmanager
    def phase(self, what: str, total: int | None = None, every: float = SILENCE) -> Iterator[Phase]:
        """A long step; while it prints nothing, a line every `every` seconds says it goes on."""
        phase = Phase(self.say, what, total)
        with Ticker(phase, every):
            yield phase


def as_reporter(progress: Progress | Reporter) -> Reporter:
    """Library calls take either; a plain sink becomes a line reporter."""
    return progress if isinstance(progress, Reporter) else Reporter(progress)


class Ticker:
    """The "still waiting" lines of a plain phase, from a thread that wakes once a second."""

    def __init__(self, phase: Phase, every: float) -> None:
        self.phase, self.every = phase, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            now = time.monotonic()
            if now - self.phase.last >= self.every:
                self.phase.last = now
                phase = self.phase
                done = f" ({phase.done}/{phase.total} done)" if phase.total else ""
                latest = f": {phase.latest}" if phase.latest else ""
                phase.say(f"[{phase.elapsed():4.0f}s] still waiting for {phase.what}{done}{latest}")

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
