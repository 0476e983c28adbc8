"""The NAT and ephemeral-port helpers, on this machine's real netfilter and kernel.

A loopback VIP is DNAT'ed to a real TLS lab server and real HTTPS requests go through it; the
rule must then disappear completely, from teardown or from a crashed-run cleanup.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from usmlab.certs import LabCerts, ensure_certs
from usmlab.errors import UsageError, UsmlabError
from usmlab.kit import KIT_DIR, kit_files
from usmlab.run.nat import (
    STATE_NAME,
    NatLeftover,
    NatRule,
    ephemeral_port,
    ephemeral_ports,
    leftover_tables,
    remove_leftovers,
)
from usmlab.targets.base import BackgroundProcess
from usmlab.targets.local import LocalTarget

VIP = "127.0.0.42"
START_LINE = re.compile(r"Starting TLS server on \S*:(\d+) \(PID: (\d+)\)")
ROUTE_LOCALNET = Path("/proc/sys/net/ipv4/conf/all/route_localnet")


def tool_usable(argv: list[str]) -> bool:
    if shutil.which(argv[0]) is None:
        return False
    return subprocess.run(argv, capture_output=True).returncode == 0


IS_ROOT = os.geteuid() == 0
HAS_NFT = IS_ROOT and tool_usable(["nft", "list", "tables"])
HAS_IPTABLES = IS_ROOT and tool_usable(["iptables-save", "-t", "nat"])
needs_nat = pytest.mark.skipif(
    not (HAS_NFT or HAS_IPTABLES),
    reason="needs root and nft (apt-get install nftables) or iptables"
    if IS_ROOT
    else "NAT rules need root",
)
TOOLS = [
    pytest.param("auto", marks=needs_nat),
    pytest.param(
        "iptables",
        marks=pytest.mark.skipif(
            not HAS_IPTABLES, reason="needs root and iptables (apt-get install iptables)"
        ),
    ),
]


@dataclass
class RunningServer:
    proc: BackgroundProcess
    port: int
    log: Path

    def records(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]


@pytest.fixture
def target(tmp_path: Path) -> LocalTarget:
    return LocalTarget(work_dir=tmp_path / "work")


@pytest.fixture
def kit_dir(target: LocalTarget) -> str:
    """The kit deployed as a run deploys it."""
    kit = target.join(target.work_dir, "kit")
    target.sync(kit_files(), kit)
    return kit


@pytest.fixture
def run_dir(tmp_path: Path) -> str:
    path = tmp_path / "run"
    path.mkdir()
    return str(path)


@pytest.fixture
def certs(tmp_path: Path) -> LabCerts:
    return ensure_certs(tmp_path / "certs")


@pytest.fixture
def server(target: LocalTarget, kit_dir: str, run_dir: str, certs: LabCerts) -> Iterator:
    """The lab's TLS server on 127.0.0.1, on a port the kernel picks."""
    log = Path(run_dir) / "server.jsonl"
    out = Path(run_dir) / "server.log"
    argv = [sys.executable, target.join(kit_dir, "server.py"), "--host", "127.0.0.1"]
    argv += ["--port", "0", "--cert", str(certs.server_cert), "--key", str(certs.server_key)]
    proc = target.start([*argv, "--log", str(log)], name="server", stdout_path=str(out))
    try:
        deadline = time.monotonic() + 10
        while not (match := START_LINE.search(out.read_text())):
            assert target.poll(proc) is None, out.read_text()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        yield RunningServer(proc, int(match.group(1)), log)
    finally:
        target.stop(proc)


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def new_run_id() -> str:
    return f"test-nat-{uuid.uuid4().hex[:10]}"


def https_get(certs: LabCerts, host: str, port: int, path: str) -> tuple[str, int, tuple]:
    """One verified HTTPS request: (status line, client's local port, peer the client saw)."""
    context = ssl.create_default_context(cafile=str(certs.ca_cert))
    request = f"GET {path} HTTP/1.1\r\nHost: kubernetes\r\nConnection: close\r\n\r\n"
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        local_port = tls.getsockname()[1]
        peer = tls.getpeername()
        tls.sendall(request.encode())
        reply = b""
        while chunk := tls.recv(65536):
            reply += chunk
    return reply.split(b"\r\n", 1)[0].decode(), local_port, peer


def our_entries(target: LocalTarget, kit_dir: str, run_ids: set[str]) -> dict[str, NatLeftover]:
    """run id -> entry, for the entries this test made (other tests may have their own)."""
    return {e.run_id: e for e in leftover_tables(target, kit_dir) if e.run_id in run_ids}


def netfilter_dump() -> str:
    """Every nft table and iptables nat rule, as the tools print them."""
    text = ""
    if HAS_NFT:
        text += subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    if HAS_IPTABLES:
        save = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True)
        text += save.stdout
    return text


def nft_nat_table() -> str | None:
    """The `ip nat` nft table iptables-nft keeps its rules in, if it exists."""
    done = subprocess.run(["nft", "list", "table", "ip", "nat"], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


@pytest.fixture
def nat_table_as_found(tool: str) -> Iterator[None]:
    """iptables-nft creates an (empty) `ip nat` table on first use: remove it if we made it."""
    existed = not HAS_NFT or nft_nat_table() is not None
    yield
    after = None if existed else nft_nat_table()
    if after is not None:
        words = {line.split()[0] for line in after.splitlines() if line.strip()}
        if words <= {"table", "chain", "type", "}"}:  # no rule in it
            subprocess.run(["nft", "delete", "table", "ip", "nat"], check=False)


@pytest.mark.root
@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.usefixtures("nat_table_as_found")
def test_vip_reaches_the_server_until_the_rule_is_removed(
    tool, target, kit_dir, run_dir, certs, server
):
    run_id = new_run_id()
    vport = free_port(VIP)
    localnet_before = ROUTE_LOCALNET.read_text()
    rule = NatRule.add(
        target, kit_dir, run_dir, run_id, VIP, vport, "127.0.0.1", server.port, tool=tool
    )
    try:
        assert rule.details["tool"] == ("nft" if tool == "auto" and HAS_NFT else "iptables")
        assert (Path(run_dir) / STATE_NAME).exists()
        assert run_id in netfilter_dump()
        assert ROUTE_LOCALNET.read_text() == localnet_before  # no sysctl is needed or touched

        status, client_port, peer = https_get(certs, VIP, vport, "/api/v1/namespaces")
        assert status.endswith(" 200 OK")
        assert peer == (VIP, vport)  # the client only ever sees the virtual address
        seen = [r for r in server.records() if r["peer_port"] == client_port]
        assert [(r["path"], r["local_port"], r["status"]) for r in seen] == [
            ("/api/v1/namespaces", server.port, 200)
        ]
    finally:
        removed = rule.remove()
    assert removed is True
    assert rule.remove() is False  # teardown may run twice
    assert not (Path(run_dir) / STATE_NAME).exists()
    assert run_id not in netfilter_dump()
    assert table_name_fragment(run_id) not in netfilter_dump()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((VIP, vport), timeout=5).close()
    served = len(server.records())
    status, _, _ = https_get(certs, "127.0.0.1", server.port, "/api/v1/namespaces")
    assert status.endswith(" 200 OK") and len(server.records()) == served + 1


def table_name_fragment(run_id: str) -> str:
    return "usmlab_" + run_id.replace("-", "_")


@pytest.mark.root
@needs_nat
def test_lab_client_workload_goes_through_the_vip(target, kit_dir, run_dir, server):
    run_id = new_run_id()
    vport = free_port(VIP)
    rule = NatRule.add(target, kit_dir, run_dir, run_id, VIP, vport, "127.0.0.1", server.port)
    try:
        client_log = Path(run_dir) / "client.jsonl"
        argv = [
            sys.executable,
            target.join(kit_dir, "client.py"),
            "--url",
            f"https://{VIP}:{vport}",
        ]
        argv += ["--count", "3", "--interval", "0", "--log", str(client_log)]
        done = target.run(argv, check=False, timeout=30)
        assert done.ok, done.stderr
    finally:
        rule.remove()
    sent = [json.loads(line) for line in client_log.read_text().splitlines()]
    assert [(r["remote"], r["status"]) for r in sent] == [(f"{VIP}:{vport}", 200)] * 3
    served_ports = {r["peer_port"] for r in server.records()}
    assert {r["local_port"] for r in sent} <= served_ports


@pytest.mark.root
@needs_nat
def test_cleanup_removes_only_rules_of_crashed_runs(target, kit_dir, tmp_path):
    crashed, alive, kept = new_run_id(), new_run_id(), new_run_id()
    rules = {}
    for run_id, owner in ((crashed, dead_pid()), (alive, os.getpid()), (kept, dead_pid())):
        run_dir = tmp_path / run_id
        run_dir.mkdir()
        rules[run_id] = NatRule.add(
            target, kit_dir, str(run_dir), run_id, VIP, free_port(VIP), "127.0.0.1", 8443,
            owner_pid=owner,
        )  # fmt: skip
    try:
        found = our_entries(target, kit_dir, set(rules))
        assert set(found) == set(rules)
        assert found[alive].owner_alive and not found[crashed].owner_alive

        purged = remove_leftovers(target, live_run_ids=[kept], kit_dir=kit_dir)
        assert crashed in {e.run_id for e in purged}
        assert {alive, kept}.isdisjoint(e.run_id for e in purged)
        assert set(our_entries(target, kit_dir, set(rules))) == {alive, kept}
        assert crashed not in netfilter_dump()
    finally:
        for rule in rules.values():
            rule.remove()
    assert our_entries(target, kit_dir, set(rules)) == {}


@pytest.mark.root
@needs_nat
def test_a_run_cannot_add_its_rule_twice(target, kit_dir, run_dir):
    run_id = new_run_id()
    rule = NatRule.add(target, kit_dir, run_dir, run_id, VIP, free_port(VIP), "127.0.0.1", 8443)
    try:
        with pytest.raises(UsmlabError, match="already added"):
            NatRule.add(target, kit_dir, run_dir, run_id, VIP, free_port(VIP), "127.0.0.1", 8443)
    finally:
        removed = rule.remove()
    assert removed is True
    assert our_entries(target, kit_dir, {run_id}) == {}


@pytest.mark.parametrize(
    ("vip", "to_host"),
    [("10.96.0.1", "127.0.0.1"), ("127.0.0.42", "192.168.1.10"), ("::1", "127.0.0.1")],
)
def test_addresses_outside_loopback_are_refused(target, kit_dir, run_dir, vip, to_host):
    with pytest.raises(UsageError, match=r"outside 127\.0\.0\.0/8|not an IPv4"):
        NatRule.add(target, kit_dir, run_dir, new_run_id(), vip, 443, to_host, 8443)
    # The kit refuses on its own too, before looking for root or tools, in one line.
    state = Path(run_dir) / STATE_NAME
    done = subprocess.run(
        [
            *(sys.executable, str(KIT_DIR / "nat.py"), "add", "--state", str(state)),
            *("--run-id", "x", "--vip", vip, "--vport", "443", "--to", f"{to_host}:8443"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert not state.exists()


def test_ephemeral_port_is_inside_the_range_and_bindable(target, kit_dir):
    low, high = (int(w) for w in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    port = ephemeral_port(target, kit_dir)
    assert low <= port <= high
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
    several = ephemeral_ports(target, kit_dir, 4)
    assert len(set(several)) == 4 and all(low <= p <= high for p in several)
