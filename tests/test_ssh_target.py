"""The SSH target against a real OpenSSH server on 127.0.0.1 (tests/sshd.py).

The "remote" machine is this machine, so the tests can check from the outside what happened
there: which processes live, in which group and session, which files exist.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sshd import SshServer, free_port, keygen

from usmlab.errors import UsageError, UsmlabError
from usmlab.kit import lease
from usmlab.targets.base import CommandFailed
from usmlab.targets.ssh import SshTarget, parse_ssh_spec

SIGINT_CATCHER = """
import pathlib, signal, sys, time
def on_sigint(signum, frame):
    pathlib.Path(sys.argv[1]).write_text("SIGINT")
    sys.exit(3)
signal.signal(signal.SIGINT, on_sigint)
print("ready", flush=True)
time.sleep(60)
"""

SIGINT_IGNORER = """
import signal, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(300)
"""


def group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is still in the group."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] not in "ZX":
                return True
    return False


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def wait_for_text(target: SshTarget, path: str, text: str, timeout: float = 10.0) -> None:
    def seen() -> bool:
        return text in target.run(["cat", "--", path], check=False).stdout

    assert wait_until(seen, timeout), f"{text!r} never appeared in {path}"


def drop(target: SshTarget, server: SshServer) -> None:
    """End a target by cutting its connection, so its lease stops whatever a failed test left."""
    with contextlib.suppress(UsmlabError):  # connection already gone: its lease has acted
        server.kill_connection_of(target.lease_pid)
    target.close()


@pytest.fixture(scope="module")
def target(sshd_server: SshServer) -> Iterator[SshTarget]:
    opened = SshTarget(sshd_server.spec, identity=sshd_server.key_path)
    yield opened
    drop(opened, sshd_server)


@pytest.fixture
def fresh_target(sshd_server: SshServer) -> Iterator[SshTarget]:
    """A target with its own connection, for tests that break or close it."""
    opened = SshTarget(sshd_server.spec, identity=sshd_server.key_path)
    yield opened
    drop(opened, sshd_server)


@pytest.fixture
def run_dir(target: SshTarget) -> str:
    return target.join(target.work_dir, "runs", uuid.uuid4().hex)


# Specs and labels.


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("ssh://root@127.0.0.1", ("root", "127.0.0.1", 22)),
        ("ssh://vagrant@127.0.0.1:2222", ("vagrant", "127.0.0.1", 2222)),
        ("ssh://me@[::1]:2200", ("me", "::1", 2200)),
        ("ssh://me@lab-vm.local", ("me", "lab-vm.local", 22)),
    ],
)
def test_spec_is_parsed(spec: str, expected: tuple[str, str, int]) -> None:
    assert parse_ssh_spec(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "root@127.0.0.1",
        "ssh:/root@127.0.0.1",
        "http://root@127.0.0.1",
        "ssh://127.0.0.1",
        "ssh://@127.0.0.1",
        "ssh://root@",
        "ssh://root@127.0.0.1:0",
        "ssh://root@127.0.0.1:99999",
        "ssh://root@127.0.0.1:ssh",
        "ssh://root:secret@127.0.0.1",
        "ssh://root@127.0.0.1/tmp",
        "ssh://root@127.0.0.1?port=22",
        "ssh://root@127.0.0.1 ; rm -rf /",
        "ssh://a@b@127.0.0.1",
    ],
)
def test_malformed_spec_is_a_one_line_usage_error(spec: str) -> None:
    with pytest.raises(UsageError) as raised:
        SshTarget(spec)
    assert "\n" not in str(raised.value)
    assert "ssh://USER@HOST[:PORT]" in str(raised.value)


def test_label_keeps_two_servers_on_one_host_apart() -> None:
    assert SshTarget("ssh://root@127.0.0.1").label == "127.0.0.1"
    assert SshTarget("ssh://root@127.0.0.1:2222").label == "127.0.0.1_2222"
    assert SshTarget("ssh://root@[::1]:2222").label == "__1_2222"


# Connecting.


def test_wrong_key_is_a_one_line_error(sshd_server: SshServer, tmp_path: Path) -> None:
    wrong = keygen(tmp_path / "not_authorized", "usmlab-test-wrong")
    with pytest.raises(UsmlabError) as raised:
        SshTarget(sshd_server.spec, identity=wrong).run(["true"])
    assert "authentication failed" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_refused_connection_is_a_one_line_error(sshd_server: SshServer) -> None:
    spec = f"ssh://root@127.0.0.1:{free_port()}"
    with pytest.raises(UsmlabError) as raised:
        SshTarget(spec, identity=sshd_server.key_path).run(["true"])
    assert "connection refused" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_missing_identity_file_is_a_usage_error(sshd_server: SshServer, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        SshTarget(sshd_server.spec, identity=tmp_path / "nope")


def test_ssh_config_and_its_keys_are_honoured_without_an_identity(
    sshd_server: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ssh://root@alias` works when ~/.ssh/config gives the alias a HostName, Port and key."""
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text(
        "Host usmlab-test-alias\n"
        f"    HostName {sshd_server.host}\n"
        f"    Port {sshd_server.port}\n"
        f"    IdentityFile {sshd_server.key_path}\n"
    )
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    with SshTarget(f"ssh://{sshd_server.user}@usmlab-test-alias") as target:
        assert target.label == f"usmlab-test-alias_{sshd_server.port}"
        assert target.run(["echo", "via config"]).stdout == "via config\n"


def test_default_work_dir_is_expanded_under_the_remote_home(
    target: SshTarget, sshd_server: SshServer
) -> None:
    assert target.work_dir == str(sshd_server.home / "usmlab")


# Commands.


def test_arguments_arrive_unchanged_and_run_nothing(target: SshTarget) -> None:
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    args = [
        "two words",
        "it's",
        'say "hi"',
        f"; touch {marker}",
        f"$(touch {marker})",
        f"`touch {marker}`",
        f"line one\nline two && touch {marker}",
        "$HOME ~ * ?",
        "back\\slash",
        "",
        "-n",
        "ünïcödé ✓",
    ]
    result = target.run(["printf", "%s\\n", *args])
    assert result.stdout == "".join(f"{arg}\n" for arg in args)
    result = target.run(["printenv", "USMLAB_VALUE"], env={"USMLAB_VALUE": f"$(touch {marker})'"})
    assert result.stdout == f"$(touch {marker})'\n"
    assert not marker.exists()


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")),
        min_size=1,
        max_size=4,
    )
)
def test_any_text_argument_round_trips(target: SshTarget, args: list[str]) -> None:
    result = target.run(["printf", "%s\\n", *args])
    assert result.stdout == "".join(f"{arg}\n" for arg in args)


def test_long_multibyte_output_is_not_mangled(target: SshTarget) -> None:
    text = "é" * 5000 + "✓" * 3001
    assert target.run(["printf", "%s", text]).stdout == text


def test_exit_status_stdout_and_stderr_come_back(target: SshTarget) -> None:
    result = target.run(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False)
    assert (result.exit_code, result.stdout, result.stderr) == (3, "out\n", "err\n")
    with pytest.raises(CommandFailed, match="err"):
        target.run(["sh", "-c", "echo err >&2; exit 3"])


def test_unknown_command_is_a_one_line_error(target: SshTarget) -> None:
    with pytest.raises(UsmlabError, match="usmlab-no-such-command: command not found"):
        target.run(["usmlab-no-such-command", "x"], check=False)


def test_stdin_is_empty_so_nothing_waits_for_input(target: SshTarget) -> None:
    assert target.run(["cat"], timeout=5).stdout == ""


def test_timeout_is_a_one_line_error(target: SshTarget) -> None:
    with pytest.raises(UsmlabError, match="did not finish within 1 s"):
        target.run(["sleep", "3"], timeout=1)


def test_sudo_as_root_runs_as_root(target: SshTarget, sshd_server: SshServer) -> None:
    if sshd_server.user != "root":
        pytest.skip("the test sshd logs in as root only when the tests run as root")
    assert target.run(["id", "-u"], sudo=True).stdout == "0\n"


def test_login_profile_path_is_visible(
    target: SshTarget, sshd_server: SshServer, tmp_path: Path
) -> None:
    """Tools installed under the home (Go via gimme) are on PATH only after ~/.profile ran."""
    bin_dir = tmp_path / "gimme bin"
    bin_dir.mkdir()
    tool = bin_dir / "usmlab-profile-tool"
    tool.write_text("#!/bin/sh\necho from-profile\n")
    tool.chmod(0o755)
    profile = sshd_server.home / ".profile"
    with pytest.raises(UsmlabError, match="command not found"):
        target.run(["usmlab-profile-tool"])
    profile.write_text(f'export PATH="$PATH:{bin_dir}"\n')
    try:
        assert target.run(["usmlab-profile-tool"]).stdout == "from-profile\n"
    finally:
        profile.unlink()


# Files.


def test_put_get_round_trip_through_an_awkward_work_dir(
    sshd_server: SshServer, tmp_path: Path
) -> None:
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    work_dir = f"~/work dir $(touch {marker}) 'q' `touch {marker}`"
    payload = os.urandom(70_000)
    local = tmp_path / "payload.bin"
    local.write_bytes(payload)
    with SshTarget(sshd_server.spec, identity=sshd_server.key_path, work_dir=work_dir) as target:
        expected_dir = str(sshd_server.home) + work_dir[1:]
        assert target.work_dir == expected_dir
        remote = target.join(target.work_dir, "kit dir", "payload.bin")
        target.put(local, remote, mode=0o750)
        assert Path(remote).read_bytes() == payload
        assert Path(remote).stat().st_mode & 0o777 == 0o750
        target.get(remote, tmp_path / "back" / "payload.bin")
        assert (tmp_path / "back" / "payload.bin").read_bytes() == payload
        kit = target.join(target.work_dir, "kit")
        assert target.sync({"payload.bin": local}, kit) == ["payload.bin"]
        assert target.sync({"payload.bin": local}, kit) == []
        assert target.fetch_dir(kit, tmp_path / "fetched") == ["payload.bin"]
        assert (tmp_path / "fetched" / "payload.bin").read_bytes() == payload
    assert not marker.exists()


def test_get_of_a_missing_file_is_a_one_line_error(target: SshTarget, tmp_path: Path) -> None:
    with pytest.raises(UsmlabError, match="no such file"):
        target.get(target.join(target.work_dir, "missing.txt"), tmp_path / "missing.txt")
    assert not (tmp_path / "missing.txt").exists()


# Background processes.


def test_background_process_is_detached_and_its_exit_status_recorded(
    target: SshTarget, run_dir: str
) -> None:
    out, err = target.join(run_dir, "job.out"), target.join(run_dir, "job.err")
    script = 'read line; echo "out $USMLAB_VALUE $line"; echo err >&2; sleep 0.3; exit 7'
    proc = target.start(
        ["sh", "-c", script],
        name="job",
        stdout_path=out,
        stderr_path=err,
        env={"USMLAB_VALUE": "a b $(x)"},
    )
    assert os.getsid(proc.pgid) == proc.pgid  # leads a session of its own
    assert os.getpgid(proc.pid) == proc.pgid  # the command is in that group
    assert target.poll(proc) is None
    assert target.wait(proc, 10) == 7
    assert target.read_text(out) == "out a b $(x) \n"  # stdin was /dev/null: empty line
    assert target.read_text(err) == "err\n"
    assert target.read_text(out + ".exit") == "7\n"


def test_polls_kills_and_reads_agree_with_and_without_the_lease(
    fresh_target: SshTarget, run_dir: str
) -> None:
    """The lease answers polls, signals and reads in one round trip; when it cannot answer,
    the same questions go as commands and get the same answers."""
    sleepers = [
        fresh_target.start(
            ["sleep", "30"], name=f"s{i}", stdout_path=fresh_target.join(run_dir, f"s{i}.log")
        )
        for i in range(2)
    ]
    quick = fresh_target.start(
        ["sh", "-c", "echo hi; exit 3"], name="q", stdout_path=fresh_target.join(run_dir, "q.log")
    )
    assert fresh_target.wait(quick, 10) == 3
    lease = fresh_target._lease
    assert lease is not None and lease.answering
    assert fresh_target.poll_many([*sleepers, quick]) == [None, None, 3]
    assert fresh_target.read_text(quick.stdout_path) == "hi\n"
    with pytest.raises(UsmlabError, match="cannot read"):
        fresh_target.read_text(fresh_target.join(run_dir, "never-written.log"))
    assert lease.answering  # all of that was answered by the lease

    fresh_target.signal_many([sleepers[0]], signal.SIGTERM)
    assert wait_until(lambda: not group_alive(sleepers[0].pgid), 10)
    assert fresh_target.wait(sleepers[0], 10) == -signal.SIGTERM  # like Popen.returncode

    lease.answering = False  # from here on: commands only
    sleepers[0].exit_code = None  # asked again, from the exit file
    assert fresh_target.poll_many(sleepers) == [-signal.SIGTERM, None]
    assert fresh_target.read_text(quick.stdout_path) == "hi\n"
    fresh_target.signal_many([sleepers[1]], signal.SIGKILL)
    assert wait_until(lambda: not group_alive(sleepers[1].pgid), 10)
    assert fresh_target.wait(sleepers[1], 10) is not None


def test_sigint_to_the_group_reaches_the_command(
    target: SshTarget, run_dir: str, tmp_path: Path
) -> None:
    marker = tmp_path / "got-sigint"
    out = target.join(run_dir, "catcher.log")
    proc = target.start(
        ["python3", "-c", SIGINT_CATCHER, str(marker)], name="catcher", stdout_path=out
    )
    wait_for_text(target, out, "ready")
    target.signal_group(proc, signal.SIGINT)
    assert target.wait(proc, 5) == 3
    assert marker.read_text() == "SIGINT"


def test_stop_ends_a_process_with_sigint(target: SshTarget, run_dir: str) -> None:
    proc = target.start(["sleep", "30"], name="sleeper", stdout_path=target.join(run_dir, "s"))
    started = time.monotonic()
    assert target.stop(proc) == -signal.SIGINT
    assert time.monotonic() - started < 3
    assert not group_alive(proc.pgid)


def test_process_killed_outright_reads_as_vanished(target: SshTarget, run_dir: str) -> None:
    proc = target.start(["sleep", "30"], name="sleeper", stdout_path=target.join(run_dir, "s"))
    target.signal_group(proc, signal.SIGKILL)  # the wrapper dies too: no exit file
    assert target.wait(proc, 5) == -1


def test_unknown_background_command_is_a_one_line_error(target: SshTarget, run_dir: str) -> None:
    with pytest.raises(UsmlabError, match="did not start") as raised:
        target.start(["usmlab-no-such-command"], name="x", stdout_path=target.join(run_dir, "x"))
    assert "\n" not in str(raised.value)


def test_sudo_background_process_as_root(
    target: SshTarget, sshd_server: SshServer, run_dir: str
) -> None:
    if sshd_server.user != "root":
        pytest.skip("the test sshd logs in as root only when the tests run as root")
    out = target.join(run_dir, "root.log")
    proc = target.start(["sh", "-c", "id -u; exec sleep 30"], name="r", stdout_path=out, sudo=True)
    wait_for_text(target, out, "0\n")
    assert target.stop(proc) == -signal.SIGINT


# The lease.


def test_lost_connection_stops_every_started_process_group(
    fresh_target: SshTarget, sshd_server: SshServer
) -> None:
    run_dir = fresh_target.join(fresh_target.work_dir, "runs", uuid.uuid4().hex)
    other_leases = set(Path(fresh_target.work_dir).glob(".lease.*"))  # other targets' leases
    sleeper = fresh_target.start(["sleep", "300"], name="s", stdout_path=f"{run_dir}/s.log")
    (lease_file,) = set(Path(fresh_target.work_dir).glob(".lease.*")) - other_leases
    stubborn = fresh_target.start(
        ["python3", "-c", SIGINT_IGNORER], name="t", stdout_path=f"{run_dir}/t.log"
    )
    wait_for_text(fresh_target, f"{run_dir}/t.log", "ready")
    lease_pid = fresh_target.lease_pid
    assert pid_alive(lease_pid)

    # The network is gone, as far as sshd can tell: its processes for this connection die.
    assert sshd_server.kill_connection_of(lease_pid)

    assert wait_until(lambda: not group_alive(sleeper.pgid), 3)  # SIGINT
    assert wait_until(lambda: not group_alive(stubborn.pgid), 6)  # SIGTERM after the grace
    assert wait_until(lambda: not pid_alive(lease_pid), 3)
    assert not lease_file.exists()
    started = time.monotonic()
    fresh_target.close()
    assert time.monotonic() - started < 1


def test_release_on_close_leaves_processes_running(
    fresh_target: SshTarget, sshd_server: SshServer
) -> None:
    run_dir = fresh_target.join(fresh_target.work_dir, "runs", uuid.uuid4().hex)
    proc = fresh_target.start(["sleep", "300"], name="s", stdout_path=f"{run_dir}/s.log")
    lease_pid = fresh_target.lease_pid
    fresh_target.close()
    assert wait_until(lambda: not pid_alive(lease_pid), 5)
    time.sleep(0.3)
    assert group_alive(proc.pgid)
    # A later controller can still stop it: poll() works from the files and the group alone.
    with SshTarget(sshd_server.spec, identity=sshd_server.key_path) as again:
        assert again.stop(proc) == -signal.SIGINT
    assert not group_alive(proc.pgid)


def test_sigterm_to_the_lease_stops_the_processes_too(fresh_target: SshTarget) -> None:
    run_dir = fresh_target.join(fresh_target.work_dir, "runs", uuid.uuid4().hex)
    proc = fresh_target.start(["sleep", "300"], name="s", stdout_path=f"{run_dir}/s.log")
    os.kill(fresh_target.lease_pid, signal.SIGTERM)  # e.g. the target machine shuts down
    assert wait_until(lambda: not group_alive(proc.pgid), 3)


def test_lease_leaves_a_reused_pid_alone(tmp_path: Path) -> None:
    """A listed group whose leader pid now belongs to another process is not signalled."""
    with subprocess.Popen(["sleep", "30"], start_new_session=True) as stranger:
        try:
            started = lease.read_stat(stranger.pid)[2]
            listing = tmp_path / "pgids"
            listing.write_text(f"{stranger.pid} 1{started}\n")  # recorded before the reuse
            assert lease.owned_groups(str(listing)) == []
            listing.write_text(f"{stranger.pid} {started}\n")
            assert lease.owned_groups(str(listing)) == [stranger.pid]
            lease.stop_groups([stranger.pid])
            assert stranger.wait(1) == -signal.SIGINT
        finally:
            stranger.kill()


def test_second_server_is_independent(sshd_server: SshServer) -> None:
    other = sshd_server.start_another()
    assert other.port != sshd_server.port
    first = SshTarget(sshd_server.spec, identity=sshd_server.key_path)
    second = SshTarget(other.spec, identity=other.key_path)
    try:
        assert first.label != second.label
        assert second.run(["printenv", "HOME"]).stdout == f"{other.home}\n"
        assert first.run(["true"]).ok
        other.kill_connections()
        assert first.run(["echo", "still here"]).stdout == "still here\n"
    finally:
        first.close()
        second.close()
        other.stop()
