"""The Go server (kit/go_server): built by usmlab's own build step with the real toolchain, it
answers like server.py (same endpoints, same statuses, same server.jsonl fields), says when it
listens, exits 98 on a port in use and stops cleanly on SIGTERM."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from labrun import free_port

from usmlab.certs import LabCerts, ensure_certs
from usmlab.errors import UsmlabError
from usmlab.run.go_build import GoBuild, build_go_server, find_go
from usmlab.targets.local import LocalTarget

KIT = Path(__file__).resolve().parents[1] / "usmlab" / "kit"
PATHS = [
    "/api/v1/persistentvolumes/pvc-63958627-daf8-4858-bf79-3818733c87b4",
    "/api/v1/namespaces/kube-system/pods",
    "/api/v1/namespaces/datadog-agent/configmaps",
    "/api/v1/persistentvolumes",
    "/server{port}/identify",
]


@pytest.fixture(scope="module")
def go_server(tmp_path_factory: pytest.TempPathFactory) -> GoBuild:
    work = tmp_path_factory.mktemp("go-server")
    target = LocalTarget(work_dir=work)
    try:
        find_go(target)
    except UsmlabError as exc:
        pytest.skip(f"Go toolchain not installed (CI installs golang): {exc}")
    return build_go_server(target, str(work / "kit"), str(work / "goserver"))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> LabCerts:
    return ensure_certs(tmp_path_factory.mktemp("certs"))


def serve(argv: list[str], port: int, certs: LabCerts, log: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*argv, "--port", str(port), "--cert", str(certs.server_cert),
         "--key", str(certs.server_key), "--log", str(log)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith("Starting TLS server on :") and f"(PID: {proc.pid})" in first, first
    return proc


def traffic(port: int, certs: LabCerts, tmp_path: Path) -> list[dict]:
    log = tmp_path / f"client-{port}.jsonl"
    done = subprocess.run(
        [sys.executable, str(KIT / "client.py"), "-url", f"https://127.0.0.1:{port}",
         "-count", str(len(PATHS)), "-interval", "0", "--paths", ",".join(PATHS),
         "--cacert", str(certs.ca_cert), "--log", str(log)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_the_go_server_answers_like_the_python_server(go_server, certs, tmp_path) -> None:
    answers = {}
    records = {}
    for kind, argv in (
        ("go", [go_server["path"]]),
        ("python", [sys.executable, str(KIT / "server.py")]),
    ):
        port = free_port()
        log = tmp_path / f"{kind}.jsonl"
        proc = serve(argv, port, certs, log)
        try:
            sent = traffic(port, certs, tmp_path)
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0
        assert f"Server stopped: {len(PATHS)} requests served" in out
        answers[kind] = sorted((r["path"].replace(str(port), "P"), r["status"]) for r in sent)
        records[kind] = [json.loads(line) for line in log.read_text().splitlines()]
        client_ports = {r["local_port"] for r in sent}
        assert {r["peer_port"] for r in records[kind]} == client_ports
        assert {r["local_port"] for r in records[kind]} == {port}
    assert answers["go"] == answers["python"]
    assert all(status == 200 for _, status in answers["go"])
    assert list(records["go"][0]) == list(records["python"][0])  # same fields, same order


def test_a_port_in_use_exits_98_in_one_line(go_server, certs, tmp_path) -> None:
    port = free_port()
    holder = serve([go_server["path"]], port, certs, tmp_path / "a.jsonl")
    try:
        second = subprocess.run(
            [go_server["path"], "--port", str(port), "--cert", str(certs.server_cert),
             "--key", str(certs.server_key)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    finally:
        holder.terminate()
        holder.wait()
    assert second.returncode == 98
    assert (
        second.stderr.strip() == f"ERROR: cannot listen on 127.0.0.1:{port}: address already in use"
    )


@pytest.mark.parametrize(("machine", "elf_machine"), [("x86_64", 62), ("aarch64", 183)])
def test_a_target_without_go_gets_binaries_built_here_for_its_architecture(
    sshd_server, tmp_path, monkeypatch, machine, elf_machine
) -> None:
    """The lab's test box and bare staging hosts have no Go: the controller builds the
    workload for the target's architecture (static) and uploads it."""
    from usmlab.kit import GO_CLIENT_DIR
    from usmlab.run import go_build
    from usmlab.targets.ssh import SshTarget

    real_find_go = go_build.find_go

    def no_go_on_the_target(target):
        if isinstance(target, SshTarget):
            raise UsmlabError("Go is not installed on the target")
        return real_find_go(target)

    monkeypatch.setattr(go_build, "find_go", no_go_on_the_target)
    target = SshTarget(sshd_server.spec, sshd_server.key_path, str(tmp_path / "remote"))
    out = str(tmp_path / "remote" / "goclient")
    try:
        built = go_build.build_go_program(
            target, str(tmp_path / "remote" / "kit"), GO_CLIENT_DIR, "go_client", out, machine
        )
    finally:
        target.close()
    assert built["built_on"] == "controller"
    assert built["goarch"] == ("arm64" if machine == "aarch64" else "amd64")
    header = Path(out).read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == elf_machine
    assert built["sha256"] == hashlib.sha256(Path(out).read_bytes()).hexdigest()
