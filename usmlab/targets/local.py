"""The local target: this machine, driven with subprocess."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from usmlab.errors import UsmlabError
from usmlab.targets.base import (
    BackgroundProcess,
    CommandFailed,
    CommandResult,
    FileProgress,
    Target,
)


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "usmlab"


@contextlib.contextmanager
def _found(argv: Sequence[str]) -> Iterator[None]:
    """A missing program is a one-line error, not a traceback."""
    try:
        yield
    except FileNotFoundError:
        raise UsmlabError(f"{argv[0]}: command not found on this machine") from None


class LocalTarget(Target):
    kind = "local"
    spec = "local"

    def __init__(self, work_dir: Path | None = None) -> None:
        self._work_dir = (work_dir or default_state_dir()).resolve()
        self._is_root = os.geteuid() == 0

    @property
    def label(self) -> str:
        return "local"

    @property
    def work_dir(self) -> str:
        return str(self._work_dir)

    @property
    def host(self) -> str:
        return socket.gethostname()

    def _argv(self, argv: Sequence[str], sudo: bool) -> list[str]:
        if sudo and not self._is_root:
            if shutil.which("sudo") is None:
                raise UsmlabError("this step needs root: run usmlab as root or install sudo")
            return ["sudo", "-n", "--", *argv]
        return list(argv)

    def _env(self, env: Mapping[str, str] | None) -> dict[str, str] | None:
        return None if env is None else {**os.environ, **env}

    def run(
        self,
        argv: Sequence[str],
        *,
        sudo: bool = False,
        check: bool = True,
        timeout: float | None = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult:
        full = self._argv(argv, sudo)
        try:
            with _found(full):
                done = subprocess.run(
                    full, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                    errors="replace", timeout=timeout, env=self._env(env),
                )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise UsmlabError(f"{full[0]} did not finish within {timeout:.0f} s") from None
        result = CommandResult(done.returncode, done.stdout, done.stderr)
        if check and not result.ok:
            raise CommandFailed(full, result)
        return result

    def put(self, local: Path, remote: str, mode: int | None = None) -> None:
        dest = Path(remote)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if local.resolve() != dest.resolve():
            shutil.copyfile(local, dest)
        if mode is not None:
            dest.chmod(mode)

    def get(self, remote: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        if Path(remote).resolve() != local.resolve():
            shutil.copyfile(remote, local)

    def read_text(self, remote: str, sudo: bool = False) -> str:
        """Read in place (no `cat` process); through sudo only when a non-root user needs it."""
        if sudo and not self._is_root:
            return super().read_text(remote, sudo=True)
        try:
            return Path(remote).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise UsmlabError(f"cannot read {remote}: {exc.strerror or exc}") from None

    def lifeline_pid(self) -> int | None:
        return os.getpid()

    def run_dir_for(self, run_id: str, local_run_dir: Path) -> str:
        """Locally the run folder is written in place: nothing to copy back."""
        return str(local_run_dir)

    def fetch_dir(
        self, remote_dir: str, local_dir: Path, on_file: FileProgress | None = None
    ) -> list[str]:
        if Path(remote_dir).resolve() == local_dir.resolve():
            return []  # written in place
        return super().fetch_dir(remote_dir, local_dir, on_file)

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
        full = self._argv(argv, sudo)
        stderr_path = stderr_path or stdout_path
        Path(stdout_path).parent.mkdir(parents=True, exist_ok=True)
        with open(stdout_path, "ab") as out:
            err = out if stderr_path == stdout_path else open(stderr_path, "ab")  # noqa: SIM115
            try:
                with _found(full):
                    popen = subprocess.Popen(
                        full, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                        env=self._env(env), start_new_session=True,
                    )  # fmt: skip
            finally:
                if err is not out:
                    err.close()
        return BackgroundProcess(
            name=name,
            pid=popen.pid,
            pgid=popen.pid,
            argv=full,
            stdout_path=stdout_path,
            stderr_path=stderr_path,
            sudo=sudo,
            handle=popen,
        )

    def poll(self, proc: BackgroundProcess) -> int | None:
        popen = proc.handle
        if isinstance(popen, subprocess.Popen):
            code = popen.poll()
        else:  # adopted from a previous usmlab process: only liveness is knowable
            try:
                os.kill(proc.pid, 0)
                code = None
            except ProcessLookupError:
                code = -1
        if code is not None:
            proc.exit_code = code
        return code

    def signal_group(self, proc: BackgroundProcess, sig: signal.Signals) -> None:
        if proc.sudo and not self._is_root:
            self.run(["kill", f"-{sig.name[3:]}", "--", f"-{proc.pgid}"], sudo=True, check=False)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pgid, sig)
