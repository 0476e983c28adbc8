"""A real, throwaway OpenSSH server on 127.0.0.1 for tests of the SSH target.

Every server gets its own host key, client key, config, pid file and home directory under a
temporary folder, runs in the foreground as a child of the test process (`sshd -D -e`) and is
stopped by its PID. Nothing system-wide is started or changed, except that the privilege
separation directory /run/sshd is created when missing, as sshd refuses to start without it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PRIVSEP_DIR = Path("/run/sshd")


class SshdUnavailable(Exception):
    """sshd cannot run here (not installed, or no privilege separation dir): tests skip."""


def find_sshd() -> Path | None:
    """sshd re-executes itself, so it must be started by its absolute path."""
    found = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/sbin")
    return Path(found).resolve() if found else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def keygen(path: Path, comment: str) -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    return path


def children_of(pid: int) -> list[int]:
    """Direct children of a process, read from /proc/*/stat (no process names involved)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def parent_of(pid: int) -> int:
    """Parent PID, or 0 once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2 :].split()[1])


@dataclass
class SshServer:
    """One running sshd; `spec` is what `usmlab --target` takes."""

    host: str
    port: int
    user: str
    key_path: Path
    home: Path
    root: Path
    process: subprocess.Popen[bytes]
    sshd_path: Path
    factory: SshdFactory | None = field(default=None, repr=False)

    @property
    def spec(self) -> str:
        return f"ssh://{self.user}@{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log(self) -> str:
        return (self.root / "sshd.log").read_text(errors="replace")

    def start_another(self) -> SshServer:
        """A second, independent server (own port, keys and home), stopped at session end."""
        if self.factory is None:
            raise RuntimeError("this server was not started by a factory")
        return self.factory.start()

    def connection_pids(self) -> list[int]:
        """sshd processes serving connections: the listener's children and their sshd children.

        Session commands (shells, the commands they run) are children of these and are not
        included: killing only the sshd processes is what a dropped connection looks like.
        """
        monitors = children_of(self.pid)
        pids = list(monitors)
        for monitor in monitors:
            pids.extend(c for c in children_of(monitor) if self._is_sshd(c))
        return pids

    def kill_connection_of(self, pid: int) -> list[int]:
        """SIGKILL the sshd processes serving the connection that runs pid (a session command).

        Other connections to this server (other tests' targets) are left alone.
        """
        serving = set(self.connection_pids())
        chain = []
        while pid > 1:
            if pid in serving:
                chain.append(pid)
            pid = parent_of(pid)
        for victim in chain:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        return chain

    def kill_connections(self) -> list[int]:
        """SIGKILL every per-connection sshd process (by PID); returns the PIDs killed."""
        killed = []
        for pid in self.connection_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        return killed

    def stop(self) -> None:
        self.kill_connections()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def _is_sshd(self, pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/exe").resolve() == self.sshd_path
        except OSError:
            return False


class SshdFactory:
    """Starts servers under base_dir and stops all of them in stop_all()."""

    def __init__(self, base_dir: Path) -> None:
        sshd = find_sshd()
        if sshd is None:
            raise SshdUnavailable("sshd not installed (apt-get install openssh-server)")
        if not PRIVSEP_DIR.is_dir():
            try:
                PRIVSEP_DIR.mkdir(mode=0o755, parents=True)
            except OSError as exc:
                raise SshdUnavailable(f"cannot create {PRIVSEP_DIR}: {exc.strerror}") from None
        self.sshd_path = sshd
        self.base_dir = base_dir
        self.servers: list[SshServer] = []

    def start(self) -> SshServer:
        root = self.base_dir / f"sshd{len(self.servers)}"
        root.mkdir(parents=True)
        home = root / "home"
        home.mkdir()
        host_key = keygen(root / "host_ed25519", "usmlab-test-host")
        user_key = keygen(root / "user_ed25519", "usmlab-test-user")
        (root / "authorized_keys").write_text(Path(f"{user_key}.pub").read_text())
        last_error = ""
        for _ in range(3):  # the free port may be taken between probing and binding
            port = free_port()
            process = self._launch(root, home, host_key, port)
            try:
                wait_for_banner("127.0.0.1", port, process, root / "sshd.log")
            except RuntimeError as exc:
                last_error = str(exc)
                continue
            server = SshServer(
                host="127.0.0.1",
                port=port,
                user=pwd.getpwuid(os.getuid()).pw_name,
                key_path=user_key,
                home=home,
                root=root,
                process=process,
                sshd_path=self.sshd_path,
                factory=self,
            )
            self.servers.append(server)
            return server
        raise RuntimeError(f"sshd did not start: {last_error}")

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()

    def _launch(self, root: Path, home: Path, host_key: Path, port: int) -> subprocess.Popen[bytes]:
        config = root / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    "ListenAddress 127.0.0.1",
                    f"Port {port}",
                    f"HostKey {host_key}",
                    f"AuthorizedKeysFile {root / 'authorized_keys'}",
                    f"PidFile {root / 'sshd.pid'}",
                    "PermitRootLogin prohibit-password",
                    "AuthenticationMethods publickey",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "StrictModes no",
                    "UsePAM no",
                    "UseDNS no",
                    "PrintMotd no",
                    "PrintLastLog no",
                    "X11Forwarding no",
                    "Subsystem sftp internal-sftp",
                    # A home of its own, so tests may write ~/.profile without touching the
                    # real one (sshd applies SetEnv after setting HOME from the passwd entry).
                    f"SetEnv HOME={home}",
                    "LogLevel INFO",
                    "",
                ]
            )
        )
        with (root / "sshd.log").open("ab") as log:
            return subprocess.Popen(
                [str(self.sshd_path), "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )


def wait_for_banner(
    host: str, port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 10.0
) -> None:
    """Ready means a TCP connect gets an SSH banner; an exited sshd fails at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()
            raise RuntimeError(tail[-1] if tail else f"sshd exited with {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1) as sock:
                if sock.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"sshd on port {port} did not answer within {timeout:.0f} s")


@contextlib.contextmanager
def running_sshd(base_dir: Path) -> Iterator[SshServer]:
    """One server for the duration of a with-block (outside pytest fixtures)."""
    factory = SshdFactory(base_dir)
    try:
        yield factory.start()
    finally:
        factory.stop_all()
