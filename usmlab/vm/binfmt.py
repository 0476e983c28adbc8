"""Runs foreign-architecture programs during a box build: binfmt_misc + qemu-user-static.

debootstrap --arch=arm64 on an x86_64 machine runs the guest's own dpkg and maintainer scripts;
the kernel hands those arm64 binaries to qemu-user when binfmt_misc has an entry for them. This
module mounts binfmt_misc and registers the entry only for the build, and leaves both as it found
them (an entry or mount that was already there stays). See docs/vm.md, "arm64".
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from usmlab.arch import Arch
from usmlab.errors import UsmlabError
from usmlab.kit.labkit import pid_alive

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
# Where Debian's qemu-user-static keeps its registrations (systemd binfmt.d format: one line,
# exactly what /proc/sys/fs/binfmt_misc/register takes).
REGISTRATION_DIRS = (Path("/usr/lib/binfmt.d"), Path("/lib/binfmt.d"), Path("/etc/binfmt.d"))
# What usmlab changed in binfmt_misc and which processes need it (several builds may overlap).
STATE_FILE = Path("/run/usmlab/binfmt.json")


class BinfmtError(UsmlabError):
    """Foreign binaries cannot be run here; the message says what to install or enable."""


def registration_line(arch: Arch, dirs: tuple[Path, ...] = REGISTRATION_DIRS) -> str:
    """qemu-user-static's binfmt_misc line for arch (":qemu-aarch64:M::...:OPF")."""
    for folder in dirs:
        path = folder / f"qemu-{arch.kernel}.conf"
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.startswith(":"):
                    return line.strip()
    raise BinfmtError(
        f"no qemu-user registration for {arch.kernel}: apt-get install qemu-user-static"
    )


def entry_name(line: str) -> str:
    """The entry's name: the first field of ":name:type:offset:magic:mask:interpreter:flags"."""
    return line.split(":")[1]


def _enabled(entry: Path) -> bool:
    try:
        return entry.read_text().splitlines()[0].strip() == "enabled"
    except (OSError, IndexError):
        return False


@contextlib.contextmanager
def foreign_binaries(
    arch: Arch, binfmt_dir: Path = BINFMT_DIR, state_file: Path = STATE_FILE
) -> Iterator[None]:
    """Let this machine run arch's binaries for the duration of the block (root only).

    Two builds may overlap: the state file records what usmlab changed and which processes use
    it, and the last one out undoes the changes (a user killed with -9 is pruned by PID).
    """
    line = registration_line(arch)
    interpreter = Path(line.split(":")[6])
    if not interpreter.exists():
        raise BinfmtError(f"{interpreter} is missing: apt-get install qemu-user-static")
    with _locked(state_file) as state:
        if not state.get("pids"):
            state.clear()
            state.update(_set_up(line, binfmt_dir))
        state["pids"] = [*state.get("pids", []), os.getpid()]
    try:
        yield
    finally:
        with _locked(state_file) as state:
            pids = [p for p in state.get("pids", []) if p != os.getpid() and pid_alive(p)]
            state["pids"] = pids
            if not pids:
                _undo(state, binfmt_dir)
                state.clear()


def _set_up(line: str, binfmt_dir: Path) -> dict[str, object]:
    """Mount binfmt_misc and register line where missing; return what was changed."""
    changed: dict[str, object] = {"mounted": False, "registered": ""}
    if not (binfmt_dir / "register").exists():
        done = subprocess.run(
            ["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt_dir)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise BinfmtError(
                f"cannot mount binfmt_misc on {binfmt_dir}: {done.stderr.strip()} "
                "(needs root on the host, not in an unprivileged container)"
            )
        changed["mounted"] = True
    entry = binfmt_dir / entry_name(line)
    if not entry.exists():
        (binfmt_dir / "register").write_text(line)
        changed["registered"] = entry.name
    elif not _enabled(entry):
        _undo(changed, binfmt_dir)
        raise BinfmtError(
            f"{entry} exists but is disabled: `echo 1 > {entry}` to let the build use it"
        )
    return changed


def _undo(changed: dict[str, object], binfmt_dir: Path) -> None:
    if changed.get("registered"):
        with contextlib.suppress(OSError):
            (binfmt_dir / str(changed["registered"])).write_text("-1")  # removes this entry only
    if changed.get("mounted") and shutil.which("umount"):
        subprocess.run(["umount", str(binfmt_dir)], capture_output=True, check=False)


@contextlib.contextmanager
def _locked(state_file: Path) -> Iterator[dict[str, Any]]:
    """The shared state, read and written back under an exclusive lock."""
    state_file.parent.mkdir(parents=True, exist_ok=True)
    with open(state_file.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            state: dict[str, Any] = json.loads(state_file.read_text())
        except (OSError, ValueError):
            state = {}
        yield state
        if state:
            state_file.write_text(json.dumps(state) + "\n")
        else:
            state_file.unlink(missing_ok=True)
