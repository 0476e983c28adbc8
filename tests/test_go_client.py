"""The Go crypto/tls client and the Go TLS probes, against the real Python server on loopback.

The Go client is what reproduced the misattribution (docs/background.md): these tests build it with
the real Go toolchain, check that its client.jsonl is the documented contract (so the analysis
can match it against server.jsonl), that its churn flags really change how connections are made,
and, as root, that the Go TLS uprobes see every request it sends under its own pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from usmlab.analysis.tuples import read_tuples
from usmlab.certs import LabCerts, ensure_certs
from usmlab.errors import UsmlabError
from usmlab.kit.probe import mapped_libraries
from usmlab.manifest import run_tag
from usmlab.run import go_build
from usmlab.run.go_build import GoBuild, GoBuildError, build_go_client, find_go
from usmlab.scenarios import DEFAULT_PATHS as SCENARIO_DEFAULT_PATHS
from usmlab.targets.local import LocalTarget
from usmlab.tracers.bpftrace import STRLEN_ENV
from usmlab.tracers.builtin import ATTACHED_MARK, exported_functions, render_program
from usmlab.tracers.go_tls import check_go_binary, render_go_probes

SERVER_PY = Path(__file__).resolve().parents[1] / "usmlab" / "kit" / "server.py"
CLIENT_FIELDS = [
    "seq", "pid", "tid", "local_addr", "local_port", "remote", "method", "path", "status",
    "error", "scheduled_mono", "start_mono", "end_mono", "start_wall", "end_wall", "conn_id",
    "wrote_request",
    # The Go client's own: the connection as USM's caches see it (docs/usm-model.md).
    "tls_conn", "net_fd", "fd",
]  # fmt: skip
DEFAULT_PATHS = list(SCENARIO_DEFAULT_PATHS)
# Every line names the run whose tracer printed it (run_tag("test") for the program below).
TAG = run_tag("test")
TLS_LINE = re.compile(
    rf"bpf_trace_printk: usmlab-tls (write|read) pid=(\d+) len=(\d+) run={TAG} line=(.*)$"
)
TLS_READ_CALL = re.compile(
    rf"bpf_trace_printk: usmlab-tls read-call pid=(\d+) len=(\d+) run={TAG}$"
)


# ---------------------------------------------------------------------------------------------
# Fixtures: the built client, certificates, a running server


@pytest.fixture(scope="module")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> GoBuild:
    """The client built by usmlab's own build step, on this machine, with the real toolchain."""
    work = tmp_path_factory.mktemp("go-work")
    target = LocalTarget(work_dir=work)
    try:
        find_go(target)
    except UsmlabError as exc:
        pytest.skip(f"Go toolchain not installed (CI installs golang): {exc}")
    return build_go_client(target, str(work / "kit"), str(work / "goclient"))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> LabCerts:
    return ensure_certs(tmp_path_factory.mktemp("certs"))


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.log)


@contextlib.contextmanager
def launch_server(folder: Path, certs: LabCerts) -> Iterator[Server]:
    """The Python server on a free loopback port, logging to `folder`; stopped on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "server.log"
    log = folder / "server.jsonl"
    argv = [
        sys.executable, str(SERVER_PY), "--host", "127.0.0.1", "--port", "0",
        "--cert", str(certs.server_cert), "--key", str(certs.server_key), "--log", str(log),
    ]  # fmt: skip
    with out.open("wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        port = wait_for(lambda: re.search(r"Starting TLS server on :(\d+)", out.read_text()), 10)
        yield Server(proc, int(port.group(1)), log)
    finally:
        stop(proc, signal.SIGINT)


@pytest.fixture
def server(tmp_path: Path, certs: LabCerts) -> Iterator[Server]:
    with launch_server(tmp_path, certs) as running:
        yield running


@pytest.fixture
def two_servers(tmp_path: Path, certs: LabCerts) -> Iterator[tuple[Server, Server]]:
    """Two servers on their own ports: the setup that reproduced the bug (docs/background.md)."""
    with launch_server(tmp_path / "a", certs) as a, launch_server(tmp_path / "b", certs) as b:
        yield a, b


def wait_for(check: Any, timeout: float, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)


def stop(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Stop a process this test started, by its pid; SIGKILL if it ignores `sig`."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_client(
    go_client: GoBuild, *args: str, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [go_client["path"], *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def client_pid(stdout: str) -> int:
    match = re.search(r"^Starting TLS client \(PID: (\d+)\)$", stdout, flags=re.MULTILINE)
    assert match, stdout
    return int(match.group(1))


# ---------------------------------------------------------------------------------------------
# The client and its client.jsonl


def test_build_reports_version_and_hash_of_the_binary(go_client: GoBuild) -> None:
    assert re.fullmatch(r"go1\.\d+(\.\d+)?", go_client["go_version"])
    digest = subprocess.run(
        ["sha256sum", go_client["path"]], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    assert go_client["sha256"] == digest


def test_each_request_is_one_documented_line_matching_the_server(
    go_client: GoBuild, server: Server, certs: LabCerts, tmp_path: Path
) -> None:
    log = tmp_path / "client.jsonl"
    before = time.monotonic()
    done = run_client(
        go_client, "-url", server.url, "-count", "10", "-interval", "20ms",
        "--cacert", str(certs.ca_cert), "--log", str(log),
    )  # fmt: skip
    after = time.monotonic()
    assert done.returncode == 0, done.stderr
    pid = client_pid(done.stdout)
    records = read_jsonl(log)
    assert [list(r) for r in records] == [CLIENT_FIELDS] * 10
    assert sorted(r["seq"] for r in records) == list(range(10))
    by_seq = {r["seq"]: r for r in records}
    t0 = by_seq[0]["scheduled_mono"]
    for seq, r in by_seq.items():
        assert r["pid"] == pid and isinstance(r["tid"], int) and r["tid"] > 0
        assert (r["status"], r["error"], r["method"]) == (200, None, "GET")
        assert r["wrote_request"] is True
        assert r["path"] == DEFAULT_PATHS[seq % len(DEFAULT_PATHS)]
        assert r["remote"] == f"127.0.0.1:{server.port}"
        assert r["local_addr"] == "127.0.0.1" and 0 < r["local_port"] < 65536
        assert r["tls_conn"].startswith("0x") and r["net_fd"].startswith("0x") and r["fd"] > 2
        assert r["conn_id"].startswith(f"{pid}-")
        # Request k is due at t0 + k*interval, on the same clock as Python's time.monotonic().
        assert r["scheduled_mono"] == pytest.approx(t0 + seq * 0.02, abs=1e-6)
        assert before <= r["scheduled_mono"] <= r["start_mono"] <= r["end_mono"] <= after
        assert r["start_wall"] <= r["end_wall"]
        assert abs((r["start_wall"] - time.time()) - (r["start_mono"] - time.monotonic())) < 1
    # The analysis matches client and server by the client's local port and the path.
    served = {(s["peer_port"], s["path"]) for s in server.records()}
    assert {(r["local_port"], r["path"]) for r in records} <= served
    assert len({r["conn_id"] for r in records}) == 10  # --connection new is the default
    assert re.search(r"^Start jitter ms: p50=[\d.]+ p99=[\d.]+ max=[\d.]+$", done.stdout, re.M)
    assert re.search(r"^Summary: sent=10 ok=10 failed=0 connections=10 ", done.stdout, re.M)


def test_transport_per_request_makes_one_connection_per_request(
    go_client: GoBuild, server: Server, tmp_path: Path
) -> None:
    log = tmp_path / "client.jsonl"
    done = run_client(
        go_client, "-url", server.url, "-count", "12", "-interval", "10ms",
        "--concurrency", "3", "--transport-per-request", "--skip-close", "0.3",
        "--gc-every", "4", "--log", str(log),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = read_jsonl(log)
    assert len(records) == 12 and all(r["status"] == 200 for r in records)
    assert len({r["conn_id"] for r in records}) == 12
    # Seen from the server too: 12 TCP connections, one request each.
    served = server.records()
    assert len({s["conn_id"] for s in served}) == 12
    assert {r["local_port"] for r in records} == {s["peer_port"] for s in served}
    assert done.stdout.count("(body not closed)") == 3  # floor(12 * 0.3), spread evenly


def test_connection_reuse_keeps_one_connection(
    go_client: GoBuild, server: Server, tmp_path: Path
) -> None:
    log = tmp_path / "client.jsonl"
    done = run_client(
        go_client, "-url", server.url, "-count", "6", "-interval", "0.01",
        "--connection", "reuse", "--log", str(log),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = read_jsonl(log)
    assert len(records) == 6
    assert len({r["conn_id"] for r in records}) == 1
    assert len({s["conn_id"] for s in server.records()}) == 1


def test_unreachable_server_is_recorded_as_errors_and_exit_1(
    go_client: GoBuild, tmp_path: Path
) -> None:
    log = tmp_path / "client.jsonl"
    # A port bound but not listening refuses connections, and nobody else gets it meanwhile.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        url = f"https://127.0.0.1:{holder.getsockname()[1]}"
        done = run_client(
            go_client, "-url", url, "-count", "2", "-interval", "0", "--log", str(log)
        )
    assert done.returncode == 1
    records = read_jsonl(log)
    assert len(records) == 2
    for r in records:
        assert r["status"] is None and "refused" in r["error"] and "\n" not in r["error"]
        assert r["wrote_request"] is False


def test_sigint_stops_scheduling_and_prints_the_summary(
    go_client: GoBuild, server: Server, tmp_path: Path
) -> None:
    log = tmp_path / "client.jsonl"
    out = tmp_path / "client.log"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [go_client["path"], "-url", server.url, "-count", "0", "-interval", "50ms",
             "--log", str(log)],
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: len(read_jsonl(log)) >= 3, 10)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(10)
    finally:
        stop(proc, signal.SIGKILL)
    text = out.read_text()
    assert code == 0, text
    assert "Stopped by SIGINT" in text
    summary = re.search(r"Summary: sent=(\d+) ok=\1 failed=0", text)
    assert summary, text
    assert int(summary.group(1)) == len(read_jsonl(log)) >= 3


# ---------------------------------------------------------------------------------------------
# One client, two servers


@pytest.mark.parametrize(
    ("mode", "connections"),
    [
        # The churn pattern that reproduced the bug: a connection per request.
        (["--transport-per-request", "--skip-close", "0.25", "--gc-every", "4",
          "--concurrency", "3"], 12),
        # One keep-alive connection per server, the worker rotating between them.
        (["--connection", "reuse"], 2),
    ],
    ids=["churn", "reuse"],
)  # fmt: skip
def test_one_client_rotates_over_two_servers_with_paths_naming_them(
    go_client: GoBuild,
    two_servers: tuple[Server, Server],
    tmp_path: Path,
    mode: list[str],
    connections: int,
) -> None:
    log = tmp_path / "client.jsonl"
    done = run_client(
        go_client, "-url", ",".join(s.url for s in two_servers), "-count", "12",
        "-interval", "10ms", "--paths", "/server{port}/identify", "--log", str(log), *mode,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    records = sorted(read_jsonl(log), key=lambda r: r["seq"])
    assert [r["seq"] for r in records] == list(range(12))
    for r in records:
        server = two_servers[r["seq"] % 2]  # request k goes to url k % 2
        assert r["remote"] == f"127.0.0.1:{server.port}"
        assert r["path"] == f"/server{server.port}/identify"
        assert (r["status"], r["error"]) == (200, None)  # the other server answers 404
    assert len({r["conn_id"] for r in records}) == connections
    for server in two_servers:
        # Bodies left unclosed: the server may log a moment after the client is done.
        served = wait_for(lambda s=server: len(s.records()) >= 6 and s.records(), 5)
        assert [s["path"] for s in served] == [f"/server{server.port}/identify"] * 6
        assert {s["local_port"] for s in served} == {server.port}
        mine = [r for r in records if r["remote"] == f"127.0.0.1:{server.port}"]
        assert sorted(r["local_port"] for r in mine) == sorted(s["peer_port"] for s in served)
        assert len({s["conn_id"] for s in served}) == len({r["conn_id"] for r in mine})
        assert f"Remote 127.0.0.1:{server.port}: sent=6 ok=6 failed=0" in done.stdout


def test_check_needs_a_handshake_with_every_server(
    go_client: GoBuild, two_servers: tuple[Server, Server]
) -> None:
    up, other = two_servers
    both = run_client(go_client, "-url", f"{up.url},{other.url}", "--check", "--timeout", "5")
    assert (both.returncode, both.stdout, both.stderr) == (0, "ready\n", "")
    # A port bound but not listening refuses connections, and nobody else gets it meanwhile.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        down = holder.getsockname()[1]
        started = time.monotonic()
        one_down = run_client(
            go_client, "-url", f"{up.url},https://127.0.0.1:{down}", "--check",
            "--timeout", "0.5",
        )  # fmt: skip
        waited = time.monotonic() - started
    assert one_down.returncode == 1
    assert one_down.stdout == ""
    assert re.fullmatch(r"error: [^\n]+\n", one_down.stderr), one_down.stderr
    assert f"127.0.0.1:{down}" in one_down.stderr
    assert f"127.0.0.1:{up.port}" not in one_down.stderr  # that one answered
    assert 0.4 < waited < 5
    assert up.records() == other.records() == []  # handshakes only, no HTTP


@pytest.mark.parametrize(
    "args",
    [
        ["-count", "many"],
        ["-interval", "-1s"],
        ["-interval", "2 parsecs"],
        ["-url", "http://127.0.0.1:8443"],
        ["--connection", "sometimes"],
        ["--skip-close", "1.5"],
        ["--gc-every", "-1"],
        ["--paths", "/server{host}/identify"],
        ["--paths", "/ok,/server{port/identify"],
        ["-url", "https://127.0.0.1:8443,http://127.0.0.1:9443"],
        ["-url", ","],
        ["--transport-per-request", "--connection", "reuse"],
        ["--cacert", "/nonexistent/ca.pem"],
        ["--no-such-flag"],
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(
    go_client: GoBuild, tmp_path: Path, args: list[str]
) -> None:
    log = tmp_path / "client.jsonl"
    done = run_client(go_client, *args, "--log", str(log))
    assert done.returncode == 2
    assert done.stdout == ""
    assert re.fullmatch(r"error: [^\n]+\n", done.stderr), done.stderr
    assert not log.exists()


def test_a_failed_build_shows_the_compiler_output_verbatim(
    go_client: GoBuild, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "src"
    broken.mkdir()
    (broken / "go.mod").write_text("module usmlab/goclient\n\ngo 1.19\n")
    (broken / "main.go").write_text("package main\n\nfunc main() {\n\tx := 1\n}\n")
    monkeypatch.setattr(go_build, "SOURCE_DIR", broken)
    target = LocalTarget(work_dir=tmp_path / "work")
    with pytest.raises(GoBuildError) as failure:
        build_go_client(target, str(tmp_path / "kit"), str(tmp_path / "out"))
    # The compiler's own words, file:line:col included (their wording varies across Go versions).
    assert re.search(r"\./main\.go:4:2: .*declared.*not used", str(failure.value))
    assert not (tmp_path / "out").exists()


def test_probes_read_the_go_register_abi_of_each_architecture() -> None:
    amd64 = render_go_probes("r", ["/opt/lab/goclient"], "x86_64")
    arm64 = render_go_probes("r", ["/opt/lab/goclient"], "aarch64")
    probe = 'uprobe:/opt/lab/goclient:"crypto/tls.(*Conn).Write"'
    assert probe in amd64 and probe in arm64
    assert 'reg("bx")' in amd64 and 'reg("cx")' in amd64 and 'reg("r1")' not in amd64
    assert 'reg("r1")' in arm64 and 'reg("r2")' in arm64 and 'reg("bx")' not in arm64
    assert "BEGIN" not in amd64  # a fragment, appended to the built-in program
    whole = render_go_probes("r", ["/opt/lab/goclient"], "amd64", with_begin=True)
    assert whole.startswith(amd64.rstrip("\n")) and ATTACHED_MARK in whole
    assert not re.search(r"^uretprobe", amd64 + arm64, re.M)  # Go moves stacks: entry only
    for bad in (["relative/goclient"], ['/tmp/x"y'], []):
        with pytest.raises(UsmlabError):
            render_go_probes("r", bad, "x86_64")
    with pytest.raises(UsmlabError, match="architecture"):
        render_go_probes("r", ["/opt/lab/goclient"], "riscv64")


# ---------------------------------------------------------------------------------------------
# The Go TLS probes, for real (root, bpftrace)


def tracefs_dir() -> Path:
    for path in (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing")):
        if (path / "trace_pipe").exists():
            return path
    subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"], check=False)
    if Path("/sys/kernel/tracing/trace_pipe").exists():
        return Path("/sys/kernel/tracing")
    pytest.skip("tracefs is not available and could not be mounted")


def start_trace_reader(trace_pipe: Path, out: Path) -> subprocess.Popen[bytes]:
    """The one trace_pipe reader; waits a little if another one (a concurrent run) has it."""
    deadline = time.monotonic() + 15
    while True:
        with out.open("wb") as sink:
            proc = subprocess.Popen(
                ["cat", str(trace_pipe)], stdout=sink, stderr=subprocess.PIPE,
                start_new_session=True,
            )  # fmt: skip
        try:
            proc.wait(0.3)
        except subprocess.TimeoutExpired:
            return proc  # reading
        err = proc.stderr.read().decode() if proc.stderr else ""
        if "busy" not in err.lower() or time.monotonic() > deadline:
            pytest.skip(f"cannot read {trace_pipe}: {err.strip()}")
        time.sleep(0.5)


@pytest.mark.root
def test_go_tls_probes_see_every_request_under_the_client_pid(
    go_client: GoBuild, server: Server, tmp_path: Path
) -> None:
    """The Go probes appended to the built-in OpenSSL program, as one bpftrace run.

    Each request must then be seen twice: written by the Go client (Go probes) and read by the
    Python server (OpenSSL probes), each under its own pid.
    """
    if os.geteuid() != 0:
        pytest.skip("the Go TLS probes need root (CI runs as root)")
    if shutil.which("bpftrace") is None:
        pytest.skip("bpftrace is not installed (CI installs it)")
    target = LocalTarget(work_dir=tmp_path / "work")
    check_go_binary(target, go_client["path"])
    libraries = mapped_libraries(server.proc.pid)
    assert libraries, "the Python server maps no libssl"
    openssl = render_program("test", {lib: exported_functions(target, lib) for lib in libraries})
    program = tmp_path / "tracer.bt"
    program.write_text(openssl + render_go_probes("test", [go_client["path"]], platform.machine()))
    tracer_log = tmp_path / "tracer.log"
    with tracer_log.open("wb") as sink:
        tracer = subprocess.Popen(
            ["bpftrace", str(program)], stdout=sink, stderr=subprocess.STDOUT,
            env={**os.environ, **STRLEN_ENV}, start_new_session=True,
        )  # fmt: skip
    reader = None
    try:
        wait_for(lambda: ATTACHED_MARK in tracer_log.read_text() or tracer.poll() is not None, 30)
        assert tracer.poll() is None, tracer_log.read_text()
        trace = tmp_path / "trace_pipe.log"
        reader = start_trace_reader(tracefs_dir() / "trace_pipe", trace)
        log = tmp_path / "client.jsonl"
        # The churn pattern that reproduced the bug: a transport per request, bodies left open.
        done = run_client(
            go_client, "-url", server.url, "-count", "16", "-interval", "15ms",
            "--concurrency", "4", "--transport-per-request", "--skip-close", "0.25",
            "--gc-every", "5", "--log", str(log),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        pid = client_pid(done.stdout)
        expected = Counter(f"GET {r['path']} HTTP/1.1" for r in read_jsonl(log))
        assert sum(expected.values()) == 16

        def seen(direction: str, by_pid: int) -> Counter[str]:
            found: Counter[str] = Counter()
            for line in trace.read_text(errors="replace").splitlines():
                match = TLS_LINE.search(line)
                if match and match.group(1) == direction and int(match.group(2)) == by_pid:
                    assert int(match.group(3)) > len(match.group(4))  # headers follow the line
                    found[match.group(4)] += 1
            return found

        def complete() -> bool:
            return seen("write", pid) == expected and seen("read", server.proc.pid) == expected

        with contextlib.suppress(AssertionError):  # the asserts below show what is missing
            wait_for(complete, 5, step=0.1)
        assert seen("write", pid) == expected  # the Go client's writes, under its own pid
        assert seen("read", server.proc.pid) == expected  # the server's reads, under its pid
        read_calls = [m for m in map(TLS_READ_CALL.search, trace.read_text().splitlines()) if m]
        assert any(int(m.group(1)) == pid for m in read_calls)
        # Each Go write's connection, followed from the *tls.Conn to its socket: the client's
        # own local port to the server's port (all zeros would mean the pointer chain failed).
        ports = {r["local_port"] for r in read_jsonl(log)}
        tuples = [t for d, _, p, t in read_tuples(tracer_log) if d == "write" and p == pid]
        assert len(tuples) >= 16, tracer_log.read_text()[-2000:]
        assert {(t.sport in ports, t.dport) for t in tuples} == {(True, server.port)}
    finally:
        if reader is not None:
            stop(reader, signal.SIGTERM)
        stop(tracer, signal.SIGINT)
