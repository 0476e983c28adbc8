"""Helpers for tests that run the real lab: free ports, process checks, running the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sshd import free_port as free_port  # one port helper for every lab test


def can_trace() -> str | None:
    """None when the built-in tracer can run here, else why not."""
    if os.geteuid() != 0:
        return "the built-in tracer needs root"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "the kernel has no BTF"
    if shutil.which("bpftrace") is None:
        return "bpftrace is not installed (apt-get install bpftrace)"
    return None


needs_tracer = pytest.mark.skipif(can_trace() is not None, reason=str(can_trace()))


def processes_of_run(run_id: str) -> list[int]:
    """Pids of live processes carrying the run's id (how usmlab tags what it starts)."""
    found = []
    marker = f"USMLAB_RUN_ID={run_id}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if marker not in handle.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        found.append(int(entry))
    return found


def usmlab_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "usmlab", *args]


def run_usmlab(
    *args: str,
    timeout: float = 120,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """The usmlab CLI as a user runs it (cwd: where it looks for the lab VM's .usmlab/)."""
    return subprocess.run(
        usmlab_argv(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip


def only_run_dir(runs: Path) -> Path:
    dirs = [p for p in runs.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def interrupt_when(
    proc: subprocess.Popen[str], runs: Path, ready: str, sig: signal.Signals, timeout: float = 60
) -> tuple[int, str]:
    """Send `sig` to a running `usmlab test` once a file named `ready` has content."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dirs = [p for p in runs.iterdir() if p.is_dir()] if runs.exists() else []
        if dirs and (dirs[0] / ready).exists() and (dirs[0] / ready).stat().st_size > 0:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def run_in_a_terminal(argv: list[str], timeout: float = 60, cwd: Path | None = None) -> str:
    """Everything a command wrote to a pseudo-terminal, as a user's terminal would show it."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, on the terminal
        if cwd is not None:
            os.chdir(cwd)
        os.execvp(argv[0], argv)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if not ready:
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        out += data
    os.waitpid(pid, 0)
    return out.decode("utf-8", "replace")
