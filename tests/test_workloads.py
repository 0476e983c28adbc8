"""The lab's server and client workloads, run as real processes speaking real TLS on loopback.

Both files are copied into a scratch directory and started with ``sys.executable``, the way they
are deployed on a target (plain files, no usmlab package next to them).
"""

import ast
import datetime
import http.client
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

import usmlab.kit
from usmlab.kit import client as client_module
from usmlab.kit import kit_files, labkit

WORKLOADS_DIR = Path(usmlab.kit.__file__).parent
START_LINE = re.compile(r"^Starting TLS server on (?:\S*):(\d+) \(PID: (\d+)\)$", re.MULTILINE)


# ---------------------------------------------------------------------------------------------
# Certificates


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    other_ca_cert: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA, a server certificate it signed, and an unrelated second CA."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _make_ca("usmlab test CA")
    server_key, server_cert = _make_server_cert(ca_key, ca_cert)
    _, other_ca_cert = _make_ca("some other CA")
    key_path = folder / "server.key"
    key_path.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Pki(
        ca_cert=_write_cert(folder / "ca.pem", ca_cert),
        server_cert=_write_cert(folder / "server.pem", server_cert),
        server_key=key_path,
        other_ca_cert=_write_cert(folder / "other-ca.pem", other_ca_cert),
    )


# ---------------------------------------------------------------------------------------------
# Processes


@pytest.fixture
def deployed(tmp_path: Path) -> Path:
    """server.py and client.py copied alone (with labkit.py, which they share) into a folder,
    as on a target."""
    folder = tmp_path / "deployed"
    folder.mkdir()
    for name in ("server.py", "client.py", "labkit.py"):
        shutil.copy(WORKLOADS_DIR / name, folder / name)
    return folder


@dataclass
class RunningServer:
    proc: subprocess.Popen[bytes]
    host: str
    port: int
    log: Path
    out: Path
    err: Path

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.log)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every process a test starts goes here; whatever is still alive is ended at teardown."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=3)


StartServer = Callable[..., RunningServer]


@pytest.fixture
def start_server(
    deployed: Path, pki: Pki, processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> StartServer:
    """Start server.py (port 0 = it picks a free one) and wait for its start line."""
    counter = iter(range(1000))

    def start(host: str = "127.0.0.1", port: int = 0, *extra: str) -> RunningServer:
        n = next(counter)
        log, out, err = (tmp_path / f"server{n}.{ext}" for ext in ("jsonl", "out", "err"))
        argv = [
            sys.executable,
            str(deployed / "server.py"),
            *("--host", host, "--port", str(port)),
            *("--cert", str(pki.server_cert), "--key", str(pki.server_key)),
            *("--log", str(log)),
            *extra,
        ]
        with out.open("wb") as out_file, err.open("wb") as err_file:
            proc = subprocess.Popen(argv, stdout=out_file, stderr=err_file, cwd=deployed)
        processes.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            match = START_LINE.search(out.read_text())
            if match:
                assert int(match.group(2)) == proc.pid
                return RunningServer(proc, host, int(match.group(1)), log, out, err)
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}: {err.read_text()}")
            time.sleep(0.02)
        pytest.fail("server did not print its start line within 10 s")

    return start


@pytest.fixture
def server(start_server: StartServer) -> RunningServer:
    return start_server()


def run_client(deployed: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run client.py to completion."""
    return subprocess.run(
        [sys.executable, str(deployed / "client.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=deployed,
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        time.sleep(0.02)


def unverified_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def fetch(
    server: RunningServer,
    path: str,
    method: str = "GET",
    conn: http.client.HTTPSConnection | None = None,
) -> tuple[int, http.client.HTTPResponse, Any]:
    """One request over real TLS; (status, response, decoded JSON body)."""
    conn = conn or http.client.HTTPSConnection(
        server.host, server.port, context=unverified_context(), timeout=5
    )
    conn.request(method, path)
    response = conn.getresponse()
    body = response.read()
    assert int(response.headers["Content-Length"]) == len(body)
    return response.status, response, json.loads(body) if body else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Server


PV = "pvc-63958627-daf8-4858-bf79-3818733c87b4"


@pytest.mark.parametrize(
    ("path", "kind", "check"),
    [
        (f"/api/v1/persistentvolumes/{PV}", "PersistentVolume", lambda b: b["metadata"]["name"]),
        ("/api/v1/persistentvolumes", "PersistentVolumeList", lambda b: len(b["items"]) > 0),
        ("/api/v1/persistentvolumes/", "PersistentVolumeList", lambda b: len(b["items"]) > 0),
        ("/api/v1/namespaces", "NamespaceList", lambda b: b["items"][0]["kind"]),
        (
            "/api/v1/namespaces/orgstore-maze/configmaps",
            "ConfigMapList",
            lambda b: {i["metadata"]["namespace"] for i in b["items"]},
        ),
        (
            "/api/v1/namespaces/kube-system/pods?limit=5",
            "PodList",
            lambda b: {i["metadata"]["namespace"] for i in b["items"]},
        ),
    ],
)
def test_api_endpoints_answer_kubernetes_shaped_json(
    server: RunningServer, path: str, kind: str, check: Callable[[Any], Any]
) -> None:
    status, response, body = fetch(server, path)
    assert status == 200
    assert response.headers["Content-Type"] == "application/json"
    assert body["kind"] == kind
    assert body["apiVersion"] == "v1"
    expected = {
        "PersistentVolume": PV,
        "PersistentVolumeList": True,
        "NamespaceList": "Namespace",
        "ConfigMapList": {"orgstore-maze"},
        "PodList": {"kube-system"},
    }[kind]
    assert check(body) == expected


def test_identify_answers_for_its_own_port_only(start_server: StartServer) -> None:
    server = start_server("127.0.0.1", 0, "--name", "apiserver-a")
    status, _, body = fetch(server, f"/server{server.port}/identify")
    assert status == 200
    assert body == {
        "kind": "ServerIdentity",
        "port": server.port,
        "pid": server.proc.pid,
        "name": "apiserver-a",
    }
    other_port = server.port + 1 if server.port < 65535 else server.port - 1
    status, _, body = fetch(server, f"/server{other_port}/identify")
    assert status == 404
    assert body["kind"] == "Status"
    assert str(server.port) in body["message"]


def test_unknown_paths_and_methods_get_a_status_object(server: RunningServer) -> None:
    status, _, body = fetch(server, "/apis/apps/v1/deployments")
    assert status == 404
    assert (body["kind"], body["status"], body["code"]) == ("Status", "Failure", 404)
    status, _, body = fetch(server, "/api/v1/namespaces", method="POST")
    assert status == 405
    assert (body["kind"], body["code"]) == ("Status", 405)
    logged = [(r["method"], r["path"], r["status"]) for r in server.records()]
    assert logged == [
        ("GET", "/apis/apps/v1/deployments", 404),
        ("POST", "/api/v1/namespaces", 405),
    ]


def test_server_log_identifies_connections_peers_and_times(server: RunningServer) -> None:
    before = time.monotonic()
    conn = http.client.HTTPSConnection(
        server.host, server.port, context=unverified_context(), timeout=5
    )
    fetch(server, "/api/v1/namespaces", conn=conn)
    fetch(server, "/api/v1/namespaces/a/pods", conn=conn)
    client_port = conn.sock.getsockname()[1]
    conn.close()
    fetch(server, "/api/v1/namespaces/b/pods")
    after = time.monotonic()

    first, second, third = server.records()
    assert first["conn_id"] == second["conn_id"] != third["conn_id"]
    assert first["conn_id"].startswith(f"{server.proc.pid}-")
    assert (first["peer_addr"], first["peer_port"]) == ("127.0.0.1", client_port)
    for record in (first, second, third):
        assert record["pid"] == server.proc.pid
        assert record["local_port"] == server.port
        assert isinstance(record["tid"], int)
        assert before <= record["mono"] <= after  # CLOCK_MONOTONIC is shared by processes
    assert first["mono"] <= second["mono"] <= third["mono"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_server_stops_cleanly_on_signal(server: RunningServer, signum: int) -> None:
    for _ in range(3):
        fetch(server, "/api/v1/namespaces")
    server.proc.send_signal(signum)
    assert server.proc.wait(timeout=5) == 0
    assert server.out.read_text().splitlines()[-1] == "Server stopped: 3 requests served"
    assert len(server.records()) == 3


def test_port_in_use_exits_98_with_one_line(
    server: RunningServer, deployed: Path, pki: Pki
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(deployed / "server.py"),
            *("--port", str(server.port), "--cert", str(pki.server_cert)),
            *("--key", str(pki.server_key)),
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == 98
    assert result.stderr == (
        f"ERROR: cannot listen on 127.0.0.1:{server.port}: address already in use\n"
    )


def test_missing_certificate_exits_2_with_one_line(deployed: Path, pki: Pki) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(deployed / "server.py"),
            *("--port", "0", "--cert", str(deployed / "missing.pem")),
            *("--key", str(pki.server_key)),
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "missing.pem" in result.stderr or "No such file" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Client against the server


def test_client_requests_match_server_log(server: RunningServer, deployed: Path) -> None:
    log = deployed / "client.jsonl"
    result = run_client(
        deployed, "-url", server.url, "-count", "10", "-interval", "0.05", "--log", str(log)
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"Starting TLS client \(PID: \d+\)", lines[0])
    assert sum(1 for line in lines if re.match(r"\[\d+\] GET /\S+ -> 200 \(", line)) == 10
    assert any(line.startswith("Summary: sent=10 ok=10 failed=0") for line in lines)

    sent = read_jsonl(log)
    expected_paths = [labkit.DEFAULT_PATHS[k % 8] for k in range(10)]
    assert [r["path"] for r in sent] == expected_paths
    assert all(r["status"] == 200 and r["error"] is None for r in sent)
    assert [r["seq"] for r in sent] == list(range(10))
    assert {r["remote"] for r in sent} == {f"127.0.0.1:{server.port}"}

    served = {r["peer_port"]: r for r in server.records()}
    assert sorted(r["path"] for r in served.values()) == sorted(expected_paths)
    for record in sent:
        assert served[record["local_port"]]["path"] == record["path"]
        assert record["start_mono"] <= served[record["local_port"]]["mono"] <= record["end_mono"]


def test_connection_modes(server: RunningServer, deployed: Path) -> None:
    reuse_log, new_log = deployed / "reuse.jsonl", deployed / "new.jsonl"
    common = ("-url", server.url, "-count", "10", "-interval", "0.01")
    reused = run_client(
        deployed, *common, "--connection", "reuse", "--concurrency", "2", "--log", str(reuse_log)
    )
    assert reused.returncode == 0, reused.stderr
    records = read_jsonl(reuse_log)
    assert len(records) == 10
    assert 1 <= len({r["conn_id"] for r in records}) <= 2
    served_conns = {r["conn_id"] for r in server.records()}
    assert 1 <= len(served_conns) <= 2

    fresh = run_client(deployed, *common, "--connection", "new", "--log", str(new_log))
    assert fresh.returncode == 0, fresh.stderr
    records = read_jsonl(new_log)
    assert len({r["conn_id"] for r in records}) == 10
    assert len({r["local_port"] for r in records}) == 10
    assert len({r["conn_id"] for r in server.records()}) == len(served_conns) + 10


def test_cacert_verifies_the_server(server: RunningServer, deployed: Path, pki: Pki) -> None:
    good_log, bad_log = deployed / "good.jsonl", deployed / "bad.jsonl"
    common = ("-url", server.url, "-count", "1", "-interval", "0")
    good = run_client(deployed, *common, "--cacert", str(pki.ca_cert), "--log", str(good_log))
    assert good.returncode == 0, good.stdout + good.stderr
    assert read_jsonl(good_log)[0]["status"] == 200
    assert read_jsonl(good_log)[0]["wrote_request"] is True

    bad = run_client(deployed, *common, "--cacert", str(pki.other_ca_cert), "--log", str(bad_log))
    assert bad.returncode == 1
    (record,) = read_jsonl(bad_log)
    assert record["status"] is None
    assert "CERTIFICATE_VERIFY_FAILED" in record["error"]
    assert "\n" not in record["error"]
    assert record["local_port"] is not None  # TCP connected; the handshake failed
    assert record["wrote_request"] is False  # nothing of it could be captured
    assert "Traceback" not in bad.stderr
    assert len(server.records()) == 1  # only the verified client got to send its request


def test_schedule_holds_without_drift(server: RunningServer, deployed: Path) -> None:
    log = deployed / "client.jsonl"
    result = run_client(
        deployed, "-url", server.url, "-count", "20", "-interval", "50ms", "--log", str(log)
    )
    assert result.returncode == 0, result.stderr
    records = read_jsonl(log)
    assert len(records) == 20
    t0 = records[0]["scheduled_mono"]
    for k, record in enumerate(records):
        assert record["scheduled_mono"] == pytest.approx(t0 + k * 0.05, abs=1e-6)
        lateness = record["start_mono"] - record["scheduled_mono"]
        assert 0 <= lateness < 0.025, f"request {k} started {lateness * 1000:.1f} ms late"
    span = records[-1]["start_mono"] - t0
    assert 0.95 <= span < 0.975

    stats = client_module.summarize(records)
    assert stats["sent"] == stats["ok"] == 20
    assert stats["jitter_ms"]["max"] < 25
    assert f"p99={stats['jitter_ms']['p99']:.1f}" in result.stdout


def test_duration_stops_scheduling(server: RunningServer, deployed: Path) -> None:
    log = deployed / "client.jsonl"
    result = run_client(
        deployed,
        *("-url", server.url, "-count", "0", "-interval", "100ms"),
        *("--duration", "0.35", "--log", str(log)),
    )
    assert result.returncode == 0, result.stderr
    assert [r["seq"] for r in read_jsonl(log)] == [0, 1, 2, 3]


def test_sigint_stops_client_with_summary(
    server: RunningServer, deployed: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    log, out = deployed / "client.jsonl", deployed / "client.out"
    argv = [sys.executable, str(deployed / "client.py"), "-url", server.url, "-count", "0"]
    with out.open("wb") as out_file:
        proc = subprocess.Popen(
            [*argv, "-interval", "0.05", "--log", str(log)],
            stdout=out_file,
            stderr=subprocess.STDOUT,
        )
    processes.append(proc)
    wait_for(lambda: log.exists() and log.read_text().count("\n") >= 3)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=5) == 0
    assert time.monotonic() - signalled < 1.0
    records = read_jsonl(log)
    assert [r["seq"] for r in records] == list(range(len(records)))
    text = out.read_text()
    assert "Stopped by SIGINT" in text
    assert f"Summary: sent={len(records)} ok={len(records)} failed=0" in text
    assert "Traceback" not in text


def test_stuck_request_is_recorded_as_interrupted_after_grace(
    deployed: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    # A listener that never accepts: TCP connects (backlog), the TLS handshake never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        log, out = deployed / "client.jsonl", deployed / "client.out"
        with out.open("wb") as out_file:
            argv = [
                sys.executable,
                str(deployed / "client.py"),
                "-url",
                f"https://127.0.0.1:{port}",
            ]
            proc = subprocess.Popen(
                [*argv, "-count", "1", "--log", str(log)],
                stdout=out_file,
                stderr=subprocess.STDOUT,
            )
        processes.append(proc)
        wait_for(lambda: "Starting TLS client" in out.read_text())
        time.sleep(0.3)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=6) == 1
        waited = time.monotonic() - signalled
    assert 1.5 < waited < 4.0  # the ~2 s grace, not the 10 s request timeout
    (record,) = read_jsonl(log)
    assert record["error"].startswith("interrupted")
    assert record["local_port"] is not None
    assert "Summary: sent=1 ok=0 failed=1" in out.read_text()


def test_check_reports_ready_only_when_a_handshake_completes(
    server: RunningServer, deployed: Path
) -> None:
    ready = run_client(deployed, "-url", server.url, "--check", "--timeout", "5")
    assert (ready.returncode, ready.stdout, ready.stderr) == (0, "ready\n", "")
    assert server.records() == []  # no HTTP request was sent

    started = time.monotonic()
    closed = run_client(
        deployed, "-url", f"https://127.0.0.1:{free_port()}", "--check", "--timeout", "0.5"
    )
    assert closed.returncode == 1
    assert closed.stdout == ""
    assert len(closed.stderr.splitlines()) == 1
    assert closed.stderr.startswith("error: ")
    assert 0.4 < time.monotonic() - started < 5


# ---------------------------------------------------------------------------------------------
# One client, two servers (the setup that reproduced the bug: docs/background.md)


@pytest.mark.parametrize("connection", ["new", "reuse"])
def test_one_client_rotates_over_two_servers_with_paths_naming_them(
    start_server: StartServer, deployed: Path, connection: str
) -> None:
    servers = [start_server(), start_server()]
    log = deployed / "client.jsonl"
    result = run_client(
        deployed,
        *("-url", ",".join(s.url for s in servers), "-count", "10", "-interval", "0.02"),
        *("--connection", connection, "--paths", "/server{port}/identify", "--log", str(log)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    sent = read_jsonl(log)
    assert [r["seq"] for r in sent] == list(range(10))
    for record in sent:
        server = servers[record["seq"] % 2]  # request k goes to url k % 2
        assert record["remote"] == f"127.0.0.1:{server.port}"
        assert record["path"] == f"/server{server.port}/identify"
        assert (record["status"], record["error"]) == (200, None)  # 404 from the other server
    for server in servers:
        served = server.records()
        assert [r["path"] for r in served] == [f"/server{server.port}/identify"] * 5
        assert {r["local_port"] for r in served} == {server.port}
        # What the client says it sent there is what that server saw, connection by connection.
        mine = [r for r in sent if r["remote"] == f"127.0.0.1:{server.port}"]
        assert sorted(r["local_port"] for r in mine) == sorted(r["peer_port"] for r in served)
        conns = {r["conn_id"] for r in mine}
        assert len(conns) == (5 if connection == "new" else 1)
        assert len({r["conn_id"] for r in served}) == len(conns)
    assert len({r["conn_id"] for r in sent}) == (10 if connection == "new" else 2)
    for server in servers:
        assert f"Remote 127.0.0.1:{server.port}: sent=5 ok=5 failed=0" in result.stdout


def test_rotations_of_urls_and_paths_are_independent(
    start_server: StartServer, deployed: Path
) -> None:
    servers = [start_server(), start_server()]
    log = deployed / "client.jsonl"
    paths = "/server{port}/identify,/api/v1/namespaces/s{port}/pods,/api/v1/namespaces"
    result = run_client(
        deployed,
        *("-url", ",".join(s.url for s in servers), "-count", "6", "-interval", "0"),
        *("--paths", paths, "--log", str(log)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    a, b = servers[0].port, servers[1].port
    expected = [
        (a, f"/server{a}/identify"),
        (b, f"/api/v1/namespaces/s{b}/pods"),
        (a, "/api/v1/namespaces"),
        (b, f"/server{b}/identify"),
        (a, f"/api/v1/namespaces/s{a}/pods"),
        (b, "/api/v1/namespaces"),
    ]
    by_seq = sorted(read_jsonl(log), key=lambda r: r["seq"])
    assert [(int(r["remote"].rsplit(":", 1)[1]), r["path"]) for r in by_seq] == expected


def test_check_needs_a_handshake_with_every_server(
    start_server: StartServer, deployed: Path
) -> None:
    servers = [start_server(), start_server()]
    both = run_client(
        deployed, "-url", ",".join(s.url for s in servers), "--check", "--timeout", "5"
    )
    assert (both.returncode, both.stdout, both.stderr) == (0, "ready\n", "")

    down = free_port()
    started = time.monotonic()
    one_down = run_client(
        deployed,
        *("-url", f"{servers[0].url},https://127.0.0.1:{down}", "--check", "--timeout", "0.5"),
    )
    assert one_down.returncode == 1
    assert one_down.stdout == ""
    assert len(one_down.stderr.splitlines()) == 1
    assert f"127.0.0.1:{down}" in one_down.stderr
    assert f"127.0.0.1:{servers[0].port}" not in one_down.stderr  # that one answered
    assert 0.4 < time.monotonic() - started < 5
    assert servers[0].records() == servers[1].records() == []  # handshakes only, no HTTP


@pytest.mark.parametrize(
    "args",
    [
        ("-count", "-1"),
        ("-count", "ten"),
        ("-interval", "abc"),
        ("-interval", "-1s"),
        ("-url", "http://x"),
        ("-url", "notaurl"),
        ("-url", "https://127.0.0.1:99999"),
        ("--concurrency", "0"),
        ("--duration", "soon"),
        ("--paths", "no-slash"),
        ("--paths", "/server{host}/identify"),
        ("--paths", "/ok,/server{port/identify"),
        ("--paths", "/server{PORT}/identify"),
        ("-url", "https://127.0.0.1:8443,http://127.0.0.1:9443"),
        ("-url", ","),
        ("--no-such-flag",),
    ],
)
def test_client_rejects_bad_input_in_one_line(deployed: Path, args: tuple[str, ...]) -> None:
    result = run_client(deployed, *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback (::1) here")
def test_ipv6_round_trip(start_server: StartServer, deployed: Path) -> None:
    server = start_server("::1")
    log = deployed / "client.jsonl"
    result = run_client(
        deployed, "-url", server.url, "-count", "2", "-interval", "0", "--log", str(log)
    )
    assert result.returncode == 0, result.stderr
    records = read_jsonl(log)
    assert [r["status"] for r in records] == [200, 200]
    assert {r["local_addr"] for r in records} == {"::1"}
    assert {r["remote"] for r in records} == {f"[::1]:{server.port}"}
    served = server.records()
    assert {r["peer_addr"] for r in served} == {"::1"}
    assert {r["peer_port"] for r in served} == {r["local_port"] for r in records}


# ---------------------------------------------------------------------------------------------
# Importable helpers and deployability


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2s", 2.0),
        ("500ms", 0.5),
        ("250us", 0.00025),
        ("0.1", 0.1),
        ("1m", 60.0),
        ("1m30s", 90.0),
        ("1.5s", 1.5),
        ("0", 0.0),
        (str(0.00001), 0.00001),
    ],
)
def test_parse_duration_accepts_go_style_and_plain_seconds(text: str, seconds: float) -> None:
    assert labkit.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "-1s", "-0.5", "2 s", "1x", "s", "1s2"])
def test_parse_duration_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        labkit.parse_duration(text)


def test_paths_name_the_port_of_the_server_they_go_to() -> None:
    targets = client_module.parse_urls(" https://127.0.0.1:8443 ,https://[::1]:9443/api,")
    assert [(t.remote, t.base_path) for t in targets] == [
        ("127.0.0.1:8443", ""),
        ("[::1]:9443", "/api"),
    ]
    (template,) = labkit.parse_paths("/server{port}/identify/{port}")
    assert labkit.expand_path(template, 9443) == "/server9443/identify/9443"
    assert labkit.parse_paths("/a,/b") == ("/a", "/b")
    for bad in ("/x{port}{host}", "/x}", "/{}", "/x{{port}}"):
        with pytest.raises(ValueError, match=r"token|brace"):
            labkit.parse_paths(bad)


def test_parse_url_handles_ipv6_default_port_and_prefix() -> None:
    target = client_module.parse_url("https://[::1]:9443/prefix/")
    assert (target.host, target.port, target.base_path, target.remote) == (
        "::1",
        9443,
        "/prefix",
        "[::1]:9443",
    )
    assert client_module.parse_url("https://localhost").port == 443


def _record(seq: int, lateness: float, latency: float, status: int | None) -> dict[str, Any]:
    scheduled = 100.0 + seq * 0.1
    return {
        "seq": seq,
        "scheduled_mono": scheduled,
        "start_mono": scheduled + lateness,
        "end_mono": scheduled + lateness + latency,
        "status": status,
        "error": None if status else "ConnectionRefusedError: refused",
        "conn_id": f"1-{seq}",
    }


def test_summarize_reports_counts_latency_and_start_jitter() -> None:
    records = [_record(k, lateness=0.001 * (k + 1), latency=0.005, status=200) for k in range(99)]
    records.append(_record(99, lateness=0.050, latency=0.5, status=None))
    stats = client_module.summarize(records)
    assert (stats["sent"], stats["ok"], stats["failed"], stats["connections"]) == (100, 99, 1, 100)
    assert stats["jitter_ms"] == {"p50": 50.0, "p99": 98.0, "max": 99.0}
    assert stats["latency_ms"]["p50"] == pytest.approx(5.0)  # failed request excluded
    assert stats["duration_s"] == pytest.approx(99 * 0.1 + 0.05 + 0.5 - 0.001)
    assert client_module.summarize([])["jitter_ms"] == {"p50": None, "p99": None, "max": None}


def test_summarize_counts_per_remote_only_with_several_servers() -> None:
    a, b, c = "127.0.0.1:8443", "127.0.0.1:9443", "[::1]:7443"
    records = [{**_record(k, 0.001, 0.002, 200), "remote": (a, b)[k % 2]} for k in range(6)]
    records[3] = {**_record(3, 0.001, 0.002, None), "remote": b}
    stats = client_module.summarize(records)
    assert stats["per_remote"] == {
        a: {"sent": 3, "ok": 3, "failed": 0},
        b: {"sent": 3, "ok": 2, "failed": 1},
    }
    assert "Remote 127.0.0.1:9443: sent=3 ok=2 failed=1" in client_module.format_summary(stats)
    # The client lists its servers: one nothing reached still shows, with zero counts.
    listed = client_module.summarize(records, [c, a, b])
    assert list(listed["per_remote"]) == [c, a, b]
    assert listed["per_remote"][c] == {"sent": 0, "ok": 0, "failed": 0}
    # One server: no per-remote breakdown, the totals say it all.
    single = client_module.summarize([r for r in records if r["remote"] == a], [a])
    assert "per_remote" not in single
    assert not any(line.startswith("Remote ") for line in client_module.format_summary(single))


@given(
    st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=5),
            st.floats(min_value=0, max_value=5),
            st.sampled_from([200, 404, None]),
        ),
        max_size=50,
    )
)
def test_summarize_invariants(samples: list[tuple[float, float, int | None]]) -> None:
    records = [
        _record(k, lateness, latency, status)
        for k, (lateness, latency, status) in enumerate(samples)
    ]
    stats = client_module.summarize(records)
    assert stats["sent"] == len(records) == stats["ok"] + stats["failed"]
    assert stats["ok"] == sum(1 for *_, status in samples if status == 200)
    jitter = stats["jitter_ms"]
    if records:
        observed = {round((r["start_mono"] - r["scheduled_mono"]) * 1000, 3) for r in records}
        assert {jitter["p50"], jitter["p99"], jitter["max"]} <= observed
        assert jitter["p50"] <= jitter["p99"] <= jitter["max"]
    else:
        assert jitter == {"p50": None, "p99": None, "max": None}


@pytest.mark.parametrize("name", sorted(kit_files()))
def test_target_side_parses_as_python_3_8_and_uses_only_the_standard_library(name: str) -> None:
    """Every file deployed onto a target: the standard library, and its siblings in the kit."""
    source = (WORKLOADS_DIR / name).read_text()
    tree = ast.parse(source, feature_version=(3, 8))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    siblings = {Path(n).stem for n in kit_files()}
    allowed = set(sys.stdlib_module_names) | siblings
    assert imported <= allowed, imported - allowed
    assert os.access(WORKLOADS_DIR / name, os.R_OK)
