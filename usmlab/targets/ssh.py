"""The SSH target: another machine driven with fabric (paramiko).

Commands are argv lists; every word is quoted with shlex before it reaches the remote shell, so
arguments arrive unchanged and nothing in them is executed. A command line is built as

    bash -lc '[sudo -n --] [env K=V ...] ARGV...' </dev/null

`bash -l` because a non-interactive SSH command gets sshd's minimal PATH, not the one users see:
tools installed under the home directory (Go installed with gimme) are only on PATH after the
login profile (/etc/profile, then ~/.bash_profile, ~/.bash_login or ~/.profile) has run. Hosts
without bash get `sh -c` after sourcing /etc/profile and ~/.profile. `sudo -n` never prompts: a
sudo that wants a password fails at once with a message saying so. Root needs no sudo.

Background processes are started by a small Python launcher (kit/detach.py): it forks a wrapper
that calls setsid (so it leads a new session and process group, pgid == pid), lets go of the SSH
channel (stdin /dev/null, output to the given files; a channel whose stdout is still held by a
background process never closes), and runs the command as its child in the same group. The
wrapper ignores SIGINT/SIGTERM/SIGHUP with a no-op handler, which the command does not inherit:
a signal to the group reaches the command, and the wrapper lives on to write the command's exit
status to `<stdout_path>.exit` (negative signal number when killed, as subprocess reports it).
The BackgroundProcess's pid is the command's own pid (the one workloads log and the analysis
matches), its pgid the wrapper's: signals and poll() go to the group.

A lease (usmlab/kit/lease.py) runs on its own channel from the first start() on; see that file.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import posixpath
import re
import shlex
import signal
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import paramiko
from fabric import Connection
from invoke.exceptions import CommandTimedOut, ThreadException
from paramiko.ssh_exception import NoValidConnectionsError

from usmlab.errors import UsageError, UsmlabError
from usmlab.kit import KIT_DIR
from usmlab.targets.base import BackgroundProcess, CommandFailed, CommandResult, Target

# paramiko logs a dropped connection with a traceback; usmlab reports it in one line instead.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

CONNECT_TIMEOUT = 15
SPEC_HELP = "expected ssh://USER@HOST[:PORT]"
PASSWORD_PROMPT = "a password is required"

# One round trip at connect time: who we are, where home is, which shell and sudo exist.
_PROBE = 'id -u; printf "%s\\n" "$HOME"; command -v bash || echo; command -v sudo || echo'

# Create the output folders as the login user (never as root through sudo), then run the rest.
_MKDIRS_THEN = 'mkdir -p -- "$1" "$2" && shift 2 && exec "$@"'

# The lease's pgid list lives in the work dir, created by the login user so a non-root
# launcher can append to it even when the lease itself runs through sudo.
_LEASE_THEN = 'mkdir -p -- "$1" && f=$(mktemp "$1/.lease.XXXXXX") && shift && exec "$@" "$f"'

# Each (exit file, process group) pair in turn, one line each: the exit file's text once it
# exists, else `running` while the group leader is alive, else `gone`.
_POLL_MANY = (
    'while [ "$#" -ge 2 ]; do '
    'if c=$(cat -- "$1" 2>/dev/null); then echo "$c"; '
    'elif s=$(cat "/proc/$2/stat" 2>/dev/null) && s=${s##*) } && '
    "case $s in Z*|X*) false;; *) true;; esac; then echo running; "
    'else c=$(cat -- "$1" 2>/dev/null) && echo "$c" || echo gone; fi; '
    "shift 2; done"
)

LEASE_ANSWER_TIMEOUT = 10.0

_SH_PROFILE = (
    '[ -r /etc/profile ] && . /etc/profile; [ -r "$HOME/.profile" ] && . "$HOME/.profile"; '
)

# The launcher, sent with `python3 -c` (it must work before anything is deployed).
_DETACH = (KIT_DIR / "detach.py").read_text()


def parse_ssh_spec(spec: str) -> tuple[str, str, int]:
    """(user, host, port) from `ssh://USER@HOST[:PORT]`; IPv6 hosts go in brackets."""

    def bad(reason: str) -> UsageError:
        return UsageError(f"bad SSH target {spec!r}: {SPEC_HELP} ({reason})")

    if any(c.isspace() for c in spec):
        raise bad("no spaces allowed")
    try:
        parts = urlsplit(spec)
        port = parts.port
    except ValueError as exc:
        raise bad(str(exc).lower()) from None
    if parts.scheme != "ssh" or not spec.startswith("ssh://"):
        raise bad("must start with ssh://")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise bad("nothing may follow the host and port")
    if parts.password is not None:
        raise bad("passwords are not supported: use a key or ssh-agent")
    if not parts.username or "@" in parts.username:
        raise bad("missing USER@")
    host = parts.hostname
    if not host or not re.fullmatch(r"[A-Za-z0-9._:%-]+", host):
        raise bad("missing or malformed HOST")
    if port == 0:
        raise bad("port must be 1-65535")
    return parts.username, host, port or 22


def env_words(env: Mapping[str, str] | None) -> list[str]:
    """`env K=V ...` as argv words; names are checked because `env` would split at `=`."""
    if not env:
        return []
    for name in env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise UsageError(f"bad environment variable name {name!r}")
    return ["env", *(f"{name}={value}" for name, value in env.items())]


def exit_file_for(stdout_path: str) -> str:
    """Where the wrapper records the exit status; derivable, so adopted processes work too."""
    return stdout_path + ".exit"


def one_line(text: object) -> str:
    return " ".join(str(text).split())


@dataclass(frozen=True)
class RemoteFacts:
    """What the first round trip learned about the login user and the host."""

    is_root: bool
    home: str
    bash: str | None
    sudo: str | None


@dataclass
class Lease:
    channel: paramiko.Channel
    pid: int
    list_path: str
    root: bool = False  # whether it may signal processes started through sudo
    answering: bool = True  # false after a lost answer: requests would read the wrong line
    pending: bytes = b""  # what was read past the last answer line
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def alive(self) -> bool:
        return not self.channel.closed and not self.channel.exit_status_ready()

    def ask(self, request: dict[str, Any]) -> Any | None:
        """The lease's answer to one request (kit/lease.py), or None when it cannot answer:
        the caller then runs a command instead."""
        if not self.answering or not self.alive:
            return None
        with self.lock:
            try:
                self.channel.settimeout(LEASE_ANSWER_TIMEOUT)
                self.channel.sendall(json.dumps(request).encode() + b"\n")
                while b"\n" not in self.pending:
                    chunk = self.channel.recv(1 << 16)
                    if not chunk:
                        raise EOFError
                    self.pending += chunk
                line, _, self.pending = self.pending.partition(b"\n")
                return json.loads(line)
            except (OSError, EOFError, ValueError, paramiko.SSHException):
                self.answering = False
                return None
            finally:
                with contextlib.suppress(OSError, paramiko.SSHException):
                    self.channel.settimeout(None)


class SshTarget(Target):
    kind = "ssh"

    def __init__(
        self,
        spec: str,
        identity: Path | None = None,
        work_dir: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.user, self.host, self.port = parse_ssh_spec(spec)
        self.spec = spec
        self.identity = identity
        connect_kwargs: dict[str, object] = {
            "banner_timeout": connect_timeout,
            "auth_timeout": connect_timeout,
        }
        if identity is not None:
            identity = identity.expanduser()
            if not identity.is_file():
                raise UsageError(f"identity file {identity} not found")
            # An explicit key means that key only, like `ssh -i KEY -o IdentitiesOnly=yes`.
            connect_kwargs.update(
                key_filename=str(identity), look_for_keys=False, allow_agent=False
            )
        self._requested_work_dir = work_dir or "~/usmlab"
        # Without a port in the spec, ~/.ssh/config may name one (as it may HostName, keys).
        self._conn = Connection(
            self.host,
            user=self.user,
            port=urlsplit(spec).port,
            connect_timeout=int(connect_timeout),
            connect_kwargs=connect_kwargs,
        )
        self.port = self._conn.port
        self._facts: RemoteFacts | None = None
        self._work_dir: str | None = None
        self._lease: Lease | None = None

    # Identity and connection.

    @property
    def label(self) -> str:
        name = re.sub(r"[^A-Za-z0-9.-]", "_", self.host)
        return name if self.port == 22 else f"{name}_{self.port}"

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def work_dir(self) -> str:
        self._remote()
        assert self._work_dir is not None
        return self._work_dir

    def _remote(self) -> RemoteFacts:
        """Connect and probe once; later calls reuse what was learned."""
        if self._facts is None:
            with self._ssh_errors():
                self._conn.open()
            result = self._exec(_PROBE, timeout=CONNECT_TIMEOUT, what="probe")
            lines = result.stdout.splitlines()
            if not result.ok or len(lines) < 4 or not lines[-4].strip().isdigit():
                raise UsmlabError(f"ssh {self.where}: unexpected answer from the login shell")
            uid, home, bash, sudo = (line.strip() for line in lines[-4:])
            self._facts = RemoteFacts(uid == "0", home, bash or None, sudo or None)
            self._work_dir = self._expand(self._requested_work_dir, home)
        return self._facts

    @staticmethod
    def _expand(path: str, home: str) -> str:
        if path == "~" or path.startswith("~/"):
            path = home + path[1:]
        elif path.startswith("~"):
            raise UsageError(f"work dir {path!r}: write other users' homes as full paths")
        elif not path.startswith("/"):
            path = posixpath.join(home, path)
        return posixpath.normpath(path)

    @contextlib.contextmanager
    def _ssh_errors(self, doing: str = "connect") -> Iterator[None]:
        """Every failure of the transport becomes one line naming the host."""
        where = self.where
        try:
            yield
        except UsmlabError:
            raise
        except paramiko.AuthenticationException:
            raise UsmlabError(
                f"ssh {where}: authentication failed (check the identity file or ssh-agent)"
            ) from None
        except paramiko.BadHostKeyException:
            raise UsmlabError(
                f"ssh {where}: host key differs from the one in known_hosts"
            ) from None
        except NoValidConnectionsError as exc:
            refused = all(getattr(e, "errno", None) == 111 for e in exc.errors.values())
            reason = "connection refused" if refused else "cannot connect"
            raise UsmlabError(f"ssh {where}: {reason}") from None
        except TimeoutError:
            raise UsmlabError(
                f"ssh {where}: no answer (timed out while trying to {doing})"
            ) from None
        except socket.gaierror:
            raise UsmlabError(f"ssh {where}: unknown host {self.host}") from None
        except (paramiko.SSHException, ThreadException, EOFError) as exc:
            raise UsmlabError(f"ssh {where}: {doing} failed: {one_line(exc)}") from None
        except OSError as exc:
            raise UsmlabError(f"ssh {where}: {doing} failed: {exc.strerror or exc}") from None

    # Commands.

    def _command(self, words: Sequence[str], stdin: bool = False) -> str:
        """One remote command line from argv words, with the login profile's PATH.

        stdin is /dev/null unless asked for, so nothing can wait for input that never comes.
        """
        inner = shlex.join(words)
        bash = self._remote().bash
        line = shlex.join([bash, "-lc", inner] if bash else ["sh", "-c", _SH_PROFILE + inner])
        return line if stdin else f"{line} </dev/null"

    def _sudo_words(self, sudo: bool) -> list[str]:
        facts = self._remote()
        if not sudo or facts.is_root:
            return []
        if facts.sudo is None:
            raise UsmlabError(
                f"this step needs root on {self.host}: log in as root or install sudo"
            )
        return ["sudo", "-n", "--"]

    def _check_sudo(self, result: CommandResult) -> None:
        if not result.ok and PASSWORD_PROMPT in result.stderr:
            raise UsmlabError(
                f"sudo on {self.host} asks {self.user} for a password: "
                "usmlab needs passwordless sudo (NOPASSWD) there"
            )

    def _exec(self, command: str, timeout: float | None, what: str) -> CommandResult:
        """Run one command line and decode its output.

        invoke decodes output chunk by chunk, which splits multi-byte characters: it is asked
        for latin-1 (one byte, one character) and the whole output is re-decoded as UTF-8.
        On timeout the channel is closed; the remote command is not signalled.
        """
        started = time.monotonic()
        timed_out = UsmlabError(f"{what} did not finish within {timeout or 0:g} s on {self.host}")
        try:
            with self._ssh_errors(f"run {what}"):
                done = self._conn.run(
                    command,
                    hide=True,
                    warn=True,
                    in_stream=False,
                    pty=False,
                    timeout=timeout,
                    encoding="latin-1",
                )
        except CommandTimedOut:
            raise timed_out from None
        if done.exited == -1:  # the channel closed without an exit status
            if timeout is not None and time.monotonic() - started >= timeout:
                raise timed_out  # invoke's timer won the race against its own timeout check
            if not self._conn.is_connected:
                raise UsmlabError(f"ssh {self.where}: connection lost while running {what}")
        return CommandResult(
            done.exited,
            done.stdout.encode("latin-1").decode("utf-8", "replace"),
            done.stderr.encode("latin-1").decode("utf-8", "replace"),
        )

    def run(
        self,
        argv: Sequence[str],
        *,
        sudo: bool = False,
        check: bool = True,
        timeout: float | None = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult:
        if not argv:
            raise UsageError("empty command")
        words = [*self._sudo_words(sudo), *env_words(env), *argv]
        result = self._exec(self._command(words), timeout, what=argv[0])
        if sudo:
            self._check_sudo(result)
        name = re.escape(argv[0])
        if result.exit_code == 127 and re.search(
            rf"{name}\W{{0,3}}: (command not found|not found|No such file)", result.stderr
        ):
            raise UsmlabError(f"{argv[0]}: command not found on {self.host}")
        if check and not result.ok:
            raise CommandFailed(argv, result)
        return result

    # Files.

    def _sftp(self) -> paramiko.SFTPClient:
        self._remote()
        with self._ssh_errors("open SFTP"):
            return self._conn.sftp()

    def put(self, local: Path, remote: str, mode: int | None = None) -> None:
        if not local.is_file():
            raise UsmlabError(f"{local}: no such file on this machine")
        sftp = self._sftp()
        with self._ssh_errors(f"upload {remote}"):
            try:
                self._sftp_makedirs(sftp, posixpath.dirname(remote))
                sftp.put(str(local), remote)
                if mode is not None:
                    sftp.chmod(remote, mode)
            except PermissionError:
                raise UsmlabError(f"{remote}: permission denied on {self.host}") from None

    @staticmethod
    def _sftp_makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
        missing = []
        while path not in ("", "/"):
            try:
                sftp.stat(path)
                break
            except FileNotFoundError:
                missing.append(path)
                path = posixpath.dirname(path)
        for folder in reversed(missing):
            with contextlib.suppress(OSError):  # created meanwhile; put() reports real failures
                sftp.mkdir(folder)

    def get(self, remote: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        sftp = self._sftp()
        with self._ssh_errors(f"download {remote}"):
            try:
                sftp.get(remote, str(local))
                return
            except FileNotFoundError:
                local.unlink(missing_ok=True)  # paramiko creates the local file first
                raise UsmlabError(f"{remote}: no such file on {self.host}") from None
            except PermissionError:
                local.unlink(missing_ok=True)
                if self._remote().is_root:
                    raise UsmlabError(f"{remote}: permission denied on {self.host}") from None
        # Readable by root only (written through sudo): read it through sudo instead.
        encoded = self.run(["base64", "--", remote], sudo=True, timeout=None).stdout
        local.write_bytes(base64.b64decode(encoded))

    # Background processes.

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
        stderr_path = stderr_path or stdout_path
        env_words(env)  # validates the names
        lease = self._running_lease().list_path
        sudo_words = self._sudo_words(sudo)
        exit_path = exit_file_for(stdout_path)
        words = [
            *("sh", "-c", _MKDIRS_THEN, "sh"),
            posixpath.dirname(stdout_path) or ".",
            posixpath.dirname(stderr_path) or ".",
            *sudo_words,
            *self.python("-c", _DETACH, exit_path, stdout_path, stderr_path, lease),
            json.dumps(dict(env or {})),
            *argv,
        ]
        result = self._exec(self._command(words), CONNECT_TIMEOUT, what=argv[0])
        if sudo:
            self._check_sudo(result)
        found = re.search(r"^started (\d+) (\d+)$", result.stdout, re.MULTILINE)
        if not result.ok or found is None:
            tail = (result.stdout + result.stderr).strip().splitlines()
            detail = tail[-1] if tail else f"exit status {result.exit_code}"
            raise UsmlabError(f"{name} did not start on {self.host}: {detail}")
        return BackgroundProcess(
            name=name,
            pid=int(found.group(2)),
            pgid=int(found.group(1)),
            argv=[*sudo_words, *argv],
            stdout_path=stdout_path,
            stderr_path=stderr_path,
            sudo=sudo,
        )

    def poll(self, proc: BackgroundProcess) -> int | None:
        return self.poll_many([proc])[0]

    @staticmethod
    def _note_exit(proc: BackgroundProcess, answer: str) -> None:
        """Record a poll answer: an exit status, `running`, or anything else (gone: -1)."""
        answer = answer.strip()
        if answer != "running":
            proc.exit_code = int(answer) if re.fullmatch(r"-?\d+", answer) else -1

    def signal_group(self, proc: BackgroundProcess, sig: signal.Signals) -> None:
        self.signal_many([proc], sig)

    def can_sudo(self) -> bool:
        """Root needs no sudo: answered from the connection's facts, no round trip."""
        return self._remote().is_root or super().can_sudo()

    def poll_many(self, procs: Sequence[BackgroundProcess]) -> list[int | None]:
        """Asked of the lease when it answers (milliseconds), else one command per sudo
        setting: a teardown polls every 20 ms and a command costs a session."""
        pending = [p for p in procs if p.exit_code is None]
        lease = self._lease
        if pending and lease is not None:
            answers = lease.ask(
                {"op": "poll", "procs": [[exit_file_for(p.stdout_path), p.pgid] for p in pending]}
            )
            if isinstance(answers, list) and len(answers) == len(pending):
                for proc, answer in zip(pending, answers, strict=True):
                    self._note_exit(proc, str(answer))
                pending = []
        for sudo in (False, True):
            group = [p for p in pending if p.sudo == sudo]
            if not group:
                continue
            words = ["sh", "-c", _POLL_MANY, "sh"]
            for proc in group:
                words += [exit_file_for(proc.stdout_path), str(proc.pgid)]
            answers = self.run(words, sudo=sudo, check=False).stdout.split("\n")
            for proc, answer in zip(group, answers, strict=False):
                self._note_exit(proc, answer)
        return [p.exit_code for p in procs]

    def signal_many(self, procs: Sequence[BackgroundProcess], sig: signal.Signals) -> None:
        lease = self._lease
        if (
            lease is not None
            and all(lease.root or not p.sudo for p in procs)
            and lease.ask({"op": "kill", "sig": int(sig), "pgids": [p.pgid for p in procs]})
        ):
            return
        for sudo in (False, True):
            groups = [f"-{p.pgid}" for p in procs if p.sudo == sudo]
            if groups:
                self.run(["kill", f"-{sig.name[3:]}", "--", *groups], sudo=sudo, check=False)

    def read_text(self, remote: str, sudo: bool = False) -> str:
        lease = self._lease
        if lease is not None and (lease.root or not sudo):
            answer = lease.ask({"op": "read", "path": remote})
            if isinstance(answer, dict) and isinstance(answer.get("text"), str):
                return answer["text"]
            if isinstance(answer, dict) and isinstance(answer.get("error"), str):
                # The lease could not read it either (not written yet): no command would.
                raise UsmlabError(f"cannot read {remote} on the target: {answer['error']}")
        return super().read_text(remote, sudo=sudo)

    # The lease.

    @property
    def lease_pid(self) -> int:
        """PID of the lease on the target: the process whose life is this controller's."""
        return self._running_lease().pid

    def lifeline_pid(self) -> int | None:
        return self.lease_pid

    def _running_lease(self) -> Lease:
        """The lease, started on first use (through sudo when that needs no password)."""
        if self._lease is None or not self._lease.alive:
            facts = self._remote()
            lease = None
            if not facts.is_root and facts.sudo is not None:
                lease = self._open_lease(["sudo", "-n", "--"])
            if lease is None:
                lease = self._open_lease([])
                assert lease is not None  # without sudo words it starts or raises
                lease.root = facts.is_root
            else:
                lease.root = True
            self._lease = lease
        return self._lease

    def _open_lease(self, sudo_words: list[str]) -> Lease | None:
        """Start the lease on its own channel; None when sudo wants a password."""
        source = (KIT_DIR / "lease.py").read_text()
        words = ["sh", "-c", _LEASE_THEN, "sh", self.work_dir, *sudo_words]
        command = self._command([*words, *self.python("-c", source)], stdin=True)
        with self._ssh_errors("start the lease"):
            self._conn.open()  # reconnects when the connection was lost or closed
            channel = self._conn.transport.open_session(timeout=CONNECT_TIMEOUT)
            channel.settimeout(CONNECT_TIMEOUT)
            channel.exec_command(command)
            line = b""
            while not line.endswith(b"\n"):
                chunk = channel.recv(4096)
                if not chunk:
                    break
                line += chunk
            channel.settimeout(None)
        ready = re.fullmatch(rb"ready (\d+) (.+)\n", line)
        if ready:
            return Lease(channel, int(ready[1]), ready[2].decode("utf-8", "replace"))
        errors = b""
        with contextlib.suppress(OSError):
            while chunk := channel.recv_stderr(4096):
                errors += chunk
        channel.close()
        if sudo_words and PASSWORD_PROMPT.encode() in errors:
            return None
        tail = errors.decode("utf-8", "replace").strip().splitlines()
        raise UsmlabError(
            f"the process lease did not start on {self.host}: {tail[-1] if tail else 'no answer'}"
        )

    def close(self) -> None:
        """Release the lease (processes keep running) and disconnect."""
        lease, self._lease = self._lease, None
        gone = (OSError, EOFError, paramiko.SSHException)  # the connection may already be dead
        if lease is not None:
            with contextlib.suppress(*gone):
                if lease.alive:
                    lease.channel.sendall(b"release\n")
                    lease.channel.shutdown_write()
                    deadline = time.monotonic() + 5
                    while not lease.channel.exit_status_ready() and time.monotonic() < deadline:
                        time.sleep(0.02)
                lease.channel.close()
        with contextlib.suppress(*gone):
            self._conn.close()

    def __enter__(self) -> SshTarget:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
