"""The one interface every target implements, modelled on pyinfra's connectors.

A target is where a run executes: this machine, an SSH host, a Vagrant VM. The scenario code only
uses the operations below, so a new transport is one small module. Commands are argv lists, never
shell strings: a transport that needs a shell quotes every argument itself.
"""

from __future__ import annotations

import hashlib
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from usmlab.errors import UsmlabError


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class CommandFailed(UsmlabError):
    """A command on the target exited non-zero where success was required."""

    def __init__(self, argv: Sequence[str], result: CommandResult) -> None:
        tail = (result.stderr or result.stdout).strip().splitlines()
        detail = tail[-1] if tail else f"exit status {result.exit_code}"
        super().__init__(f"{argv[0]} failed on the target: {detail}")
        self.result = result


@dataclass
class BackgroundProcess:
    """A process started detached in its own session, so its whole group can be signalled."""

    name: str
    pid: int
    pgid: int
    argv: list[str]
    stdout_path: str
    stderr_path: str
    sudo: bool = False
    started_mono: float = field(default_factory=time.monotonic)
    exit_code: int | None = None
    handle: object | None = field(default=None, repr=False, compare=False)


# The controller's one stop ladder is `Target.stop_many`; these are the rungs it climbs.
Ladder = tuple[tuple[signal.Signals, float], ...]
# fetch_dir tells of each file it copies: (number, total, relative name).
FileProgress = Callable[[int, int, str], None]
# A lab process: ask politely, then insist.
STOP_SEQUENCE: Ladder = ((signal.SIGINT, 5.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0))


def term_then_kill(grace: float) -> Ladder:
    """SIGTERM, `grace` seconds to finish (a reader draining, a restart as Kubernetes does it),
    then SIGKILL."""
    return ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0))


class Target(ABC):
    """Run commands, move files and manage background processes somewhere."""

    kind: str = "abstract"
    spec: str = ""  # how the user named it on the command line
    identity: Path | None = None  # key file, for transports that use one
    _can_sudo: bool | None = None  # learned once by can_sudo()
    # How kit scripts are started: `python3` until the probe names the interpreter it is, then
    # that file directly (a version manager's `python3` shim costs tens of milliseconds a
    # start). `-S`: kit scripts use the standard library only, so site-packages (and their
    # .pth start-up hooks) are skipped.
    python_argv: tuple[str, ...] = ("python3", "-S")

    @property
    @abstractmethod
    def label(self) -> str:
        """Short name used in run folder names (`local`, `127.0.0.1`)."""

    @property
    @abstractmethod
    def work_dir(self) -> str:
        """Folder on the target that holds the deployed kit and remote run folders."""

    @abstractmethod
    def run(
        self,
        argv: Sequence[str],
        *,
        sudo: bool = False,
        check: bool = True,
        timeout: float | None = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult:
        """Run a command to completion and return its output."""

    @abstractmethod
    def put(self, local: Path, remote: str, mode: int | None = None) -> None:
        """Copy a local file to the target."""

    @abstractmethod
    def get(self, remote: str, local: Path) -> None:
        """Copy a file from the target to a local path."""

    @abstractmethod
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
        """Start a detached process (new session, stdin from /dev/null, output to files)."""

    @abstractmethod
    def poll(self, proc: BackgroundProcess) -> int | None:
        """Exit status of a background process, or None while it still runs."""

    @abstractmethod
    def signal_group(self, proc: BackgroundProcess, sig: signal.Signals) -> None:
        """Send a signal to the process group of a background process."""

    def python(self, *args: str) -> list[str]:
        """argv that runs the target's python3 on a kit script or `-c` source."""
        return [*self.python_argv, *args]

    def use_python(self, executable: object) -> None:
        """Start kit scripts with this interpreter from now on (the probe's `sys.executable`,
        i.e. what `python3` resolved to); anything but an absolute path is ignored."""
        if isinstance(executable, str) and executable.startswith("/"):
            self.python_argv = (executable, "-S")

    def can_sudo(self) -> bool:
        """Whether root work is possible here (root already, or passwordless sudo); asked once."""
        cached = self._can_sudo
        if cached is None:
            try:
                cached = self.run(["true"], sudo=True, check=False, timeout=10).ok
            except UsmlabError:
                cached = False  # no sudo, or it wants a password
            self._can_sudo = cached
        return cached

    def lifeline_pid(self) -> int | None:
        """Pid, on the target, of a process that lives exactly as long as this controller.

        A run's marker names it, so a later cleanup can tell a crashed run from a live one.
        """
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, most targets hold nothing
        """Release connections; the default target holds none."""

    # Operations built on the primitives above, shared by every transport.

    def wait(self, proc: BackgroundProcess, timeout: float, step: float = 0.05) -> int | None:
        deadline = time.monotonic() + timeout
        while True:
            code = self.poll(proc)
            if code is not None or time.monotonic() >= deadline:
                return code
            time.sleep(step)

    def stop(
        self,
        proc: BackgroundProcess,
        sequence: Sequence[tuple[signal.Signals, float]] = STOP_SEQUENCE,
    ) -> int | None:
        """Stop a process group by escalating signals; returns its exit status if known."""
        return self.stop_many([proc], sequence)[0]

    def stop_many(
        self,
        procs: Sequence[BackgroundProcess],
        sequence: Sequence[tuple[signal.Signals, float]] = STOP_SEQUENCE,
    ) -> list[int | None]:
        """Stop several process groups at once: each step signals all, then waits for all."""
        running = self._still_running(procs)
        for sig, grace in sequence:
            if not running:
                break
            self.signal_many(running, sig)
            deadline = time.monotonic() + grace
            while running and time.monotonic() < deadline:
                time.sleep(0.02)
                running = self._still_running(running)
        return [p.exit_code for p in procs]

    def _still_running(self, procs: Sequence[BackgroundProcess]) -> list[BackgroundProcess]:
        return [p for p, code in zip(procs, self.poll_many(procs), strict=True) if code is None]

    def poll_many(self, procs: Sequence[BackgroundProcess]) -> list[int | None]:
        """`poll` for several processes; remote transports answer in one round trip."""
        return [self.poll(p) for p in procs]

    def signal_many(self, procs: Sequence[BackgroundProcess], sig: signal.Signals) -> None:
        """`signal_group` for several processes; remote transports send them at once."""
        for proc in procs:
            self.signal_group(proc, sig)

    def join(self, *parts: str) -> str:
        """Join target paths (targets are POSIX)."""
        return "/".join([parts[0].rstrip("/"), *(p.strip("/") for p in parts[1:])])

    def run_dir_for(self, run_id: str, local_run_dir: Path) -> str:
        """Where a run's files are written on the target."""
        return self.join(self.work_dir, "runs", run_id)

    def list_files(self, remote_dir: str) -> list[str]:
        """Relative paths of the regular files under remote_dir."""
        found = self.run(["find", remote_dir, "-type", "f", "-printf", "%P\\n"], sudo=True)
        return sorted(line for line in found.stdout.splitlines() if line)

    def file_hashes(self, remote_dir: str) -> dict[str, str]:
        """sha256 of every file under remote_dir, computed on the target in one command."""
        listing = self.run(
            ["sh", "-c", 'cd -- "$1" && find . -type f -print0 | xargs -0r sha256sum --', "sh",
             remote_dir],
            sudo=True,
            timeout=300,
        ).stdout  # fmt: skip
        digests = {}
        for line in listing.splitlines():
            digest, _, path = line.partition("  ")
            if path.startswith("./") and len(digest) == 64:  # `\`-escaped odd names are skipped
                digests[path[2:]] = digest
        return dict(sorted(digests.items()))

    def fetch_dir(
        self, remote_dir: str, local_dir: Path, on_file: FileProgress | None = None
    ) -> list[str]:
        """Copy every file of a remote folder into local_dir, verified by sha256.

        Files already present locally with the right content are not copied again, so an
        interrupted collection resumes where it stopped. Returns the relative paths fetched.
        `on_file(number, total, name)` is told of each file before it is copied.
        """
        fetched = []
        digests = self.file_hashes(remote_dir)
        for number, (name, digest) in enumerate(digests.items(), 1):
            local = local_dir / name
            if local.is_file() and sha256_file(local) == digest:
                continue
            if on_file is not None:
                on_file(number, len(digests), name)
            self.get(self.join(remote_dir, name), local)
            if sha256_file(local) != digest:
                raise UsmlabError(f"{name} changed in transit (sha256 mismatch); collect again")
            fetched.append(name)
        return fetched

    def read_text(self, remote: str, sudo: bool = False) -> str:
        return self.run(["cat", "--", remote], sudo=sudo).stdout

    def sync(
        self,
        files: Mapping[str, Path],
        remote_dir: str,
        before_upload: Callable[[list[str]], None] | None = None,
    ) -> list[str]:
        """Upload files whose content differs on the target; returns the names uploaded.
        `before_upload` sees those names first, and may refuse by raising."""
        names = sorted(files)
        remote_paths = [self.join(remote_dir, n) for n in names]
        listing = self.run(
            ["sh", "-c", 'mkdir -p -- "$1" && shift && sha256sum -- "$@"', "sh", remote_dir,
             *remote_paths],
            check=False,
        ).stdout  # fmt: skip
        remote_hashes = {}
        for line in listing.splitlines():
            digest, _, path = line.partition("  ")
            remote_hashes[path] = digest
        changed = [
            (name, path)
            for name, path in zip(names, remote_paths, strict=True)
            if remote_hashes.get(path) != sha256_file(files[name])
        ]
        if changed and before_upload is not None:
            before_upload([name for name, _ in changed])
        for name, path in changed:
            self.put(files[name], path, mode=files[name].stat().st_mode & 0o777)
        return [name for name, _ in changed]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
