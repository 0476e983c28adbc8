"""`run_doctor` on the local machine against real states: nothing running, a real TLS server, a
TCP listener that does not speak TLS, a busy trace_pipe, and the usm-debugger test double."""

from __future__ import annotations

import errno
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from labrun import can_trace, free_port, needs_tracer

from usmlab.certs import ensure_certs
from usmlab.errors import UsageError
from usmlab.kit import KIT_DIR
from usmlab.run.doctor import Check, failed, render_checks, run_doctor
from usmlab.targets.local import LocalTarget

DOUBLE = Path(__file__).resolve().parent / "usm_debugger_double.py"


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


@pytest.fixture
def target(tmp_path: Path) -> LocalTarget:
    return LocalTarget(tmp_path / "work")


def stop(proc: subprocess.Popen[str]) -> int:
    """End a process group this test started, politely first."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=10)


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """The lab's real server.py on a free loopback port, ready for handshakes."""
    certs = ensure_certs(tmp_path / "certs")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(KIT_DIR / "server.py"), "--host", "127.0.0.1",
         "--port", str(port), "--cert", str(certs.server_cert), "--key", str(certs.server_key)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )  # fmt: skip
    ready = subprocess.run(
        [sys.executable, str(KIT_DIR / "client.py"), "--check",
         "-url", f"https://127.0.0.1:{port}", "--timeout", "10"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert ready.returncode == 0, ready.stderr
    yield port, proc
    stop(proc)


def test_nothing_running_fails_usm_debugger_with_the_seed_hint(target: LocalTarget) -> None:
    port = free_port()
    checks = run_doctor(target, port=port)
    found = by_name(checks)
    running = found["usm-debugger running"]
    assert running.ok is False
    assert "ps aux | grep usm-debugger" in running.hint
    assert found["probes attached"].ok is None
    assert found["BTF present"].ok is os.path.exists("/sys/kernel/btf/vmlinux")
    kernel = found["kernel version"]
    assert kernel.ok is True and platform.release() in kernel.detail
    assert found[f"port {port} free"].ok is True
    assert found[f"server listening on port {port}"].ok is None
    assert found["TLS handshake"].ok is None
    assert found["root or passwordless sudo"].ok is True  # the test suite runs as root or sudo
    assert failed(checks)
    table = render_checks(checks)
    assert "FAIL  usm-debugger running" in table
    assert "hint: ps aux | grep usm-debugger" in table
    # The kit was deployed where a run deploys it.
    assert (Path(target.work_dir) / "kit" / "bpf_attached.py").is_file()


def test_a_real_tls_server_passes_listening_and_handshake(
    target: LocalTarget, tls_server: tuple[int, subprocess.Popen[str]]
) -> None:
    port, server = tls_server
    found = by_name(run_doctor(target, url=f"https://127.0.0.1:{port}"))
    listening = found[f"server listening on port {port}"]
    assert listening.ok is True
    assert f"pid {server.pid}" in listening.detail
    assert found["TLS handshake"].ok is True
    free = found[f"port {port} free"]
    assert free.ok is None and "--url" in free.hint


def test_a_listener_that_does_not_speak_tls_fails_the_handshake(target: LocalTarget) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        found = by_name(run_doctor(target, port=port))
    assert found[f"server listening on port {port}"].ok is True
    handshake = found["TLS handshake"]
    assert handshake.ok is False
    assert handshake.detail and "openssl s_client -connect 127.0.0.1:" in handshake.hint


def test_a_url_outside_loopback_is_refused(target: LocalTarget) -> None:
    with pytest.raises(UsageError, match="not loopback"):
        run_doctor(target, url="https://192.0.2.1:8443")


@pytest.mark.skipif(os.geteuid() != 0, reason="opening trace_pipe needs root")
def test_a_busy_trace_pipe_names_its_reader(target: LocalTarget) -> None:
    sys.path.insert(0, str(KIT_DIR))
    import tracefs  # the kit's own module, as the target runs it

    path, mounted_here = tracefs.find_tracefs()  # mounts tracefs when missing (fresh machine)
    assert path is not None, "no tracefs on this kernel"
    try:
        try:
            fd = os.open(f"{path}/trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                pytest.skip("another reader holds trace_pipe")
            raise
        try:
            check = by_name(run_doctor(target, port=free_port()))["trace_pipe readable"]
        finally:
            os.close(fd)
    finally:
        if mounted_here:
            subprocess.run(["umount", path], check=False)
    assert check.ok is False
    assert f"{os.getpid()} (" in check.detail and "busy" in check.detail
    again = by_name(run_doctor(target, port=free_port()))["trace_pipe readable"]
    assert again.ok is True, again.detail


@needs_tracer
def test_the_running_double_passes_running_and_probes_attached(
    target: LocalTarget, tmp_path: Path
) -> None:
    assert can_trace() is None
    log = tmp_path / "double.log"
    with log.open("w") as out:
        double = subprocess.Popen(
            [str(DOUBLE)], stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 20
        while "probes attached" not in log.read_text():
            assert double.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        checks = run_doctor(target, port=free_port(), usm_debugger_path=str(DOUBLE))
    finally:
        code = stop(double)
    found = by_name(checks)
    running = found["usm-debugger running"]
    assert running.ok is True
    assert f"pid {double.pid} " in running.detail
    probes = found["probes attached"]
    assert probes.ok is True
    programs = int(probes.detail.split(" BPF programs")[0])
    assert programs >= 1
    assert found["usm-debugger built"].ok is True
    assert code == 0  # doctor only looked: the double stopped on our SIGINT, cleanly
    held = subprocess.run(
        [sys.executable, str(KIT_DIR / "bpf_attached.py"), str(double.pid)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert held.returncode == 1, held.stdout  # gone, and it says so
