"""Makes sure libvirt's daemons run on hosts without systemd (containers, CI runners).

vagrant-libvirt needs libvirtd, and libvirtd needs virtlogd to start a domain. On a systemd host
both are socket-activated and nothing is started here; elsewhere they are started by hand, and the
caller gets their PIDs so it can stop exactly what it started (never anything by name).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from usmlab.errors import UsmlabError

LIBVIRT_URI = "qemu:///system"
DAEMONS = (("virtlogd", Path("/run/virtlogd.pid")), ("libvirtd", Path("/run/libvirtd.pid")))


class LibvirtUnavailable(UsmlabError):
    """libvirt cannot be reached and could not be started."""


@dataclass(frozen=True)
class StartedDaemon:
    name: str
    pid: int


def libvirt_reachable(timeout: float = 60.0) -> bool:
    """Whether qemu:///system answers (the first answer after a start can take ~15 s)."""
    if shutil.which("virsh") is None:
        return False
    try:
        done = subprocess.run(
            ["virsh", "-c", LIBVIRT_URI, "version"],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def _live_pid(pidfile: Path, name: str) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if comm == name else None


def ensure_libvirt_daemons(progress: Callable[[str], None] = print) -> list[StartedDaemon]:
    """Start virtlogd and libvirtd if libvirt is not reachable; returns what this call started."""
    if libvirt_reachable(timeout=10):
        return []
    missing = [name for name, _ in DAEMONS if shutil.which(name) is None]
    if missing:
        raise LibvirtUnavailable(
            f"{missing[0]} not found: apt-get install libvirt-daemon-system qemu-system-x86"
        )
    started: list[StartedDaemon] = []
    for name, pidfile in DAEMONS:
        if _live_pid(pidfile, name) is not None:
            continue
        subprocess.run([name, "-d"], check=True, capture_output=True)
        deadline = time.monotonic() + 10
        pid = _live_pid(pidfile, name)
        while pid is None and time.monotonic() < deadline:
            time.sleep(0.1)
            pid = _live_pid(pidfile, name)
        if pid is None:
            raise LibvirtUnavailable(f"{name} -d did not write {pidfile}")
        progress(f"[libvirt] started {name} (pid {pid})")
        started.append(StartedDaemon(name, pid))
    if not libvirt_reachable():
        stop_daemons(started)
        raise LibvirtUnavailable(f"libvirtd started but {LIBVIRT_URI} does not answer")
    return started


def stop_daemons(started: list[StartedDaemon], grace: float = 10.0) -> None:
    """Stop the daemons ensure_libvirt_daemons started, by PID, newest first."""
    for daemon in reversed(started):
        try:
            os.kill(daemon.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + grace
        while Path(f"/proc/{daemon.pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
