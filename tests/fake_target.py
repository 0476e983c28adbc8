"""FakeTarget: an in-process fake of a target, for testing the run pipeline without root.

It is a fake, not a transport: nothing runs. It answers the kit's commands with canned results
(the probe's facts, a free port, a ready server), "starts" processes that exist only as records,
and lets them exit when signalled. Every call is logged in `events`, so a test can assert the
order in which the real stages started and stopped things.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

from usmlab.targets.base import BackgroundProcess, CommandResult, Target
from usmlab.tracers.bpftrace import ATTACHED_MARK

LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"


class FakeTarget(Target):
    kind = "fake"
    spec = "fake"

    def __init__(self, work_dir: Path, *, root: bool = True, client_polls: int = 3) -> None:
        self._work_dir = work_dir
        self.root = root
        self.client_polls = client_polls  # a client "exits" 0 after this many polls
        self.events: list[tuple[str, ...]] = []
        self._next_pid = 1000
        self._polls: dict[int, int] = {}
        self.live: dict[int, BackgroundProcess] = {}
        self.procs: list[BackgroundProcess] = []  # every process ever started

    @property
    def label(self) -> str:
        return "fake"

    @property
    def work_dir(self) -> str:
        return str(self._work_dir)

    def facts(self) -> dict[str, object]:
        return {
            "hostname": "fake", "kernel": "6.1.0", "machine": "x86_64", "python": "3.11.7",
            "openssl": "OpenSSL 3.0", "libssl": [LIBSSL] if self.root else [],
            "libssl_functions": {LIBSSL: ["SSL_write", "SSL_write_ex", "SSL_read", "SSL_read_ex"]},
            "btf": self.root, "bpftrace": "bpftrace v0.17.0" if self.root else None,
            "euid": 0 if self.root else 1000, "port_in_use": None,
        }  # fmt: skip

    def run(
        self,
        argv: Sequence[str],
        *,
        sudo: bool = False,
        check: bool = True,
        timeout: float | None = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult:
        words = list(argv)
        at = next((i for i, w in enumerate(words) if w.endswith(".py")), 0)
        script = Path(words[at]).name
        self.events.append(("run", script, *words[at + 1 : at + 2]))
        if script == "probe.py" and "info" in words:
            return CommandResult(0, json.dumps(self.facts()), "")
        return CommandResult(0, "", "")

    def put(self, local: Path, remote: str, mode: int | None = None) -> None:
        self.events.append(("put", Path(remote).name))

    def get(self, remote: str, local: Path) -> None:
        raise AssertionError("the fake has no files to get")

    def sync(
        self, files: Mapping[str, Path], remote_dir: str, before_upload: object = None
    ) -> list[str]:
        return []

    def fetch_dir(self, remote_dir: str, local_dir: Path) -> list[str]:
        return []

    def read_text(self, remote: str, sudo: bool = False) -> str:
        name = Path(remote).name
        started = [p for p in self.procs if p.stdout_path == remote]
        if name.startswith("server") and started:
            return f"Starting TLS server on :8443 (PID: {started[-1].pid})\n"
        if name == "tracer.log":
            return f"{ATTACHED_MARK} 123000000000\n"
        if name == "capture.log":
            return '{"clock_in_use": "mono"}\nreading\n'
        return ""

    def start(
        self,
        argv: Sequence[str],
        *,
        name: str,
        stdout_path: str,
        stderr_path: str | None = None,
        env: Mapping[str, str] | None = None,
        sudo: bool = False,
    ) -> BackgroundProcess:
        self._next_pid += 1
        proc = BackgroundProcess(
            name=name, pid=self._next_pid, pgid=self._next_pid, argv=list(argv),
            stdout_path=stdout_path, stderr_path=stderr_path or stdout_path, sudo=sudo,
        )  # fmt: skip
        self.live[proc.pid] = proc
        self.procs.append(proc)
        self.events.append(("start", name))
        return proc

    def poll(self, proc: BackgroundProcess) -> int | None:
        if proc.pid in self.live and proc.name.startswith("client"):
            self._polls[proc.pid] = self._polls.get(proc.pid, 0) + 1
            if self._polls[proc.pid] >= self.client_polls:
                self._exit(proc, 0)
        return proc.exit_code if proc.pid not in self.live else None

    def signal_group(self, proc: BackgroundProcess, sig: signal.Signals) -> None:
        self.events.append(("signal", proc.name, sig.name))
        if proc.pid in self.live:
            self._exit(proc, 0 if sig in (signal.SIGINT, signal.SIGTERM) else -sig)

    def _exit(self, proc: BackgroundProcess, code: int) -> None:
        del self.live[proc.pid]
        proc.exit_code = code
        self.events.append(("exit", proc.name))

    # What the events say.

    def started(self) -> list[str]:
        return [e[1] for e in self.events if e[0] == "start"]

    def first_signals(self) -> list[str]:
        """Process names in the order they were first signalled."""
        seen: list[str] = []
        for event in self.events:
            if event[0] == "signal" and event[1] not in seen:
                seen.append(event[1])
        return seen
