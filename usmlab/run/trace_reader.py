"""The one trace_pipe reader of a run.

trace_pipe is consumed by reading and admits a single reader (docs/trace_pipe.md), so a run opens it
exactly once: before any workload starts, closed after the last one stopped. tracefs settings the
run changes (buffer size, clock) are put back afterwards, even after Ctrl-C.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from usmlab.errors import UsmlabError
from usmlab.jsonlines import parse_json_lines
from usmlab.targets.base import BackgroundProcess, Target, term_then_kill

BUFFER_KB = 16384  # per CPU: a burst of scenario3 through usm-debugger stays far below this


class TracePipeCapture:
    def __init__(self, target: Target, run_dir: str, kit_dir: str) -> None:
        self.target = target
        self.run_dir = run_dir
        self.kit_dir = kit_dir
        self.state_file = target.join(run_dir, ".tracefs-state.json")
        self.log = target.join(run_dir, "trace_pipe.log")
        self.state: dict[str, Any] = {}
        self.proc: BackgroundProcess | None = None

    def start(self, env: dict[str, str]) -> BackgroundProcess:
        """Start the reader, which prepares tracefs (emptying its buffer) before it opens
        trace_pipe and restores it when it ends; wait_ready() says when it holds trace_pipe."""
        reader = self.target.join(self.kit_dir, "trace_reader.py")
        argv = [
            "env", *(f"{k}={v}" for k, v in env.items()),
            *self.target.python(reader), "--out", self.log, "--prepare", self.state_file,
            "--buffer-kb", str(BUFFER_KB), "--clock", "mono",
        ]  # fmt: skip
        self.proc = self.target.start(
            argv, name="capture", stdout_path=self.target.join(self.run_dir, "capture.log"),
            sudo=True,
        )  # fmt: skip
        return self.proc

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Return once the reader holds trace_pipe; a one-line error if it cannot."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            lines = self._reader_lines()
            if "reading" in lines:
                return
            code = self.target.poll(self.proc)
            if code is not None or time.monotonic() > deadline:
                lines = [line for line in lines if line.strip()]
                reason = lines[-1].removeprefix("error: ") if lines else f"exit status {code}"
                raise UsmlabError(f"cannot read trace_pipe: {reason}")
            time.sleep(0.02)

    def _reader_lines(self) -> list[str]:
        """The reader's output so far; learns the tracefs state (a JSON line) from it."""
        assert self.proc is not None
        lines = self.target.read_text(self.proc.stdout_path).splitlines()
        if not self.state:
            found = parse_json_lines("\n".join(lines))
            if found:
                self.state = found[0]
        return lines

    def stop(self) -> None:
        """Stop the reader (SIGTERM: it drains what is buffered, restores tracefs and exits 0);
        when it could not restore, restore from its state file here."""
        code = None
        try:
            if self.proc is not None:
                code = self.target.stop(self.proc, term_then_kill(5.0))
                if not self.state:  # stopped before wait_ready: still say what was changed
                    with contextlib.suppress(UsmlabError):
                        self._reader_lines()
        finally:
            # Also when it never started (restoring nothing is a no-op), and to unmount a
            # tracefs the run mounted: the reader leaves that to now, after the tracer exited.
            if code != 0 or self.state.get("mounted"):
                tracefs = self.target.join(self.kit_dir, "tracefs.py")
                self.target.run(
                    self.target.python(tracefs, "restore", "--state", self.state_file),
                    sudo=True,
                    check=False,
                )

    @property
    def clock(self) -> str | None:
        return self.state.get("clock_in_use")
