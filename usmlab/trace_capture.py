"""The one trace_pipe reader of a run.

trace_pipe is consumed by reading and admits a single reader (field notes §2), so a run opens it
exactly once: before any workload starts, closed after the last one stopped. tracefs settings the
run changes (buffer size, clock) are put back afterwards, even after Ctrl-C.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

from usmlab.errors import UsmlabError
from usmlab.targets.base import BackgroundProcess, Target

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
        """Prepare tracefs (emptying its buffer) and start the reader of trace_pipe.

        Whatever is written after the buffer was emptied is kept, so a tracer may start while
        the reader is still opening; wait_ready() says when it holds trace_pipe.
        """
        tracefs = self.target.join(self.kit_dir, "tracefs.py")
        result = self.target.run(
            ["python3", tracefs, "prepare", "--state", self.state_file,
             "--buffer-kb", str(BUFFER_KB), "--clock", "mono"],
            sudo=True,
            check=False,
        )  # fmt: skip
        if not result.ok:
            message = result.stderr.strip().splitlines()[-1:] or [f"exit {result.exit_code}"]
            raise UsmlabError(message[0].removeprefix("error: "))
        self.state = json.loads(result.stdout)
        reader = self.target.join(self.kit_dir, "trace_reader.py")
        argv = [
            "env", *(f"{k}={v}" for k, v in env.items()),
            "python3", reader, self.state["trace_pipe"], "--out", self.log,
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
        while "reading" not in self.target.read_text(self.proc.stdout_path):
            code = self.target.poll(self.proc)
            if code is not None or time.monotonic() > deadline:
                lines = self.target.read_text(self.proc.stdout_path).strip().splitlines()
                reason = lines[-1].removeprefix("error: ") if lines else f"exit status {code}"
                raise UsmlabError(f"cannot read trace_pipe: {reason}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the reader, then restore tracefs; each half runs even if the other fails."""
        try:
            if self.proc is not None:
                # SIGTERM makes the reader drain what is still buffered, then exit.
                self.target.stop(self.proc, ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)))
        finally:
            if self.state:
                tracefs = self.target.join(self.kit_dir, "tracefs.py")
                self.target.run(
                    ["python3", tracefs, "restore", "--state", self.state_file],
                    sudo=True,
                    check=False,
                )

    @property
    def clock(self) -> str | None:
        return self.state.get("clock_in_use")
