"""USM's own tuple caches, read while the tracer runs (kit/usm_maps.py) and judged per request
(analysis/usm_maps.py). The real tracer cannot run here: the usm-debugger TEST DOUBLE holds BPF
maps with USM's names and sizes (tests/usm_maps_double.py), filled from a real Go client's
connections with planted stale tuples; the verdict must name exactly those requests."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from labrun import free_port, needs_tracer, only_run_dir, run_usmlab
from usm_maps_double import conn_tuple

from usmlab.kit import usm_maps

DOUBLE = Path(__file__).resolve().parent / "usm_debugger_double.py"
needs_bpftool = pytest.mark.skipif(shutil.which("bpftool") is None, reason="bpftool missing")


def test_a_conn_tuple_decodes_from_its_literal_bytes() -> None:
    """conn_tuple_t of datadog-agent's conn_tuple.h: saddr_h, saddr_l, daddr_h, daddr_l (u64),
    sport, dport (u16), netns, pid, metadata (u32): 48 bytes, little-endian on x86 and arm."""
    raw = bytes.fromhex(
        "0000000000000000"
        "7f00000100000000"  # saddr: 127.0.0.1 in the low word
        "0000000000000000"
        "7f00000100000000"  # daddr
        "d204"
        "fb20"  # sport 1234, dport 8443
        "01000000"
        "39300000"
        "01000000"  # netns 1, pid 12345, metadata: TCP, IPv4
    )
    assert len(raw) == 48
    assert usm_maps.decode(raw) == {
        "saddr": "127.0.0.1", "sport": 1234, "daddr": "127.0.0.1", "dport": 8443,
        "netns": 1, "pid": 12345, "tcp": True, "v6": False,
    }  # fmt: skip
    assert usm_maps.decode(conn_tuple("127.0.0.1", 1, "127.0.0.2", 2, 3))["daddr"] == "127.0.0.2"
    assert usm_maps.decode(struct.pack("<II", 7, 9))["pid"] == 7


@needs_bpftool
def test_the_reader_finds_maps_by_name_and_sizes_not_by_name_alone(tmp_path: Path) -> None:
    bpffs = tmp_path / "bpffs"
    bpffs.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], check=True)
    try:
        for name, key, value in (("tuple_by_pid_fd", 8, 48), ("pid_fd_by_tuple", 4, 4)):
            subprocess.run(
                ["bpftool", "map", "create", str(bpffs / name), "type", "hash", "key", str(key),
                 "value", str(value), "entries", "16", "name", name],
                check=True,
            )  # fmt: skip
        found = {m["role"] for m in usm_maps.find([])}
        assert "tuple_by_pid_fd" in found
        assert "pid_fd_by_tuple" not in found  # right name, wrong sizes: not USM's
    finally:
        subprocess.run(["umount", str(bpffs)], check=False)


@needs_bpftool
def test_the_dumper_takes_in_maps_created_after_the_first_it_found(tmp_path: Path) -> None:
    """A tracer creates its maps one after another: the dumper, started on the first, dumps
    the later ones too (it dumped only the first under load, and judged nothing else)."""
    import signal
    import sys
    import time

    bpffs = tmp_path / "bpffs"
    bpffs.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], check=True)
    dumper = None

    def create(name: str, key: int, value: int) -> None:
        subprocess.run(
            ["bpftool", "map", "create", str(bpffs / name), "type", "hash", "key", str(key),
             "value", str(value), "entries", "16", "name", name],
            check=True,
        )  # fmt: skip

    try:
        create("tuple_by_pid_fd", 8, 48)
        out = tmp_path / "dumps.jsonl"
        dumper = subprocess.Popen(
            [sys.executable, usm_maps.__file__, "dump", "--out", str(out), "--every", "50"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(1.5)
        create("pid_fd_by_tuple", 48, 8)
        time.sleep(2.5)
        dumper.send_signal(signal.SIGTERM)
        said, _ = dumper.communicate(timeout=10)
        roles = {json.loads(line)["map"] for line in out.read_text().splitlines()}
        assert roles == {"tuple_by_pid_fd", "pid_fd_by_tuple"}, said
        assert "dumping pid_fd_by_tuple too" in said
    finally:
        if dumper is not None and dumper.poll() is None:
            dumper.kill()
            dumper.wait()
        subprocess.run(["umount", str(bpffs)], check=False)


@needs_tracer
@needs_bpftool
def test_planted_stale_tuples_in_usm_maps_are_exactly_the_misattributed_requests(
    tmp_path: Path,
) -> None:
    planted_at = tmp_path / "planted-at"
    env = {
        **os.environ,
        "USMLAB_DOUBLE_MAPS": json.dumps({
            "watch": str(tmp_path / "runs"), "conn_every": 4, "fd_every": 5,
            "planted_at": str(planted_at),
        }),
    }  # fmt: skip
    done = run_usmlab(
        "test", "churn", "--target", "local", "--tracer", "usm-debugger",
        "--usm-debugger", str(DOUBLE),
        "--runs-dir", str(tmp_path / "runs"), "--state-dir", str(tmp_path / "state"),
        "--servers", f"{free_port()},{free_port()}", "--count", "40", "--interval", "100ms",
        "--concurrency", "2", "--skip-close", "0", "--gc-every", "0",
        timeout=300, env=env,
    )  # fmt: skip
    run_dir = only_run_dir(tmp_path / "runs")
    planted = [json.loads(x) for x in Path(planted_at.read_text()).read_text().splitlines()]
    report = json.loads((run_dir / "report.json").read_text())
    maps = report["usm_maps"]
    assert maps is not None and maps["dumps"] > 0
    for name in ("conn_tup_by_go_tls_conn", "tuple_by_pid_fd"):
        expected = {p["conn_id"] for p in planted if p["map"] == name}
        judged = maps[name]
        assert judged["judged"] + judged["not_seen"] == 40
        assert judged["judged"] >= 30, judged  # the dumps caught most entries
        found = {e["conn_id"] for e in maps["examples"] if e["map"] == name}
        assert found <= expected  # nothing but planted entries is called stale
        assert judged["stale_tuple"]["count"] == len(found)
        assert len(found) >= len(expected) - judged["not_seen"]  # every planted one that was seen
    assert report["outcome"] == "misattribution"
    assert done.returncode == 1, done.stderr


@needs_bpftool
def test_doctor_finds_usm_maps_when_they_are_loaded(tmp_path: Path) -> None:
    from usm_maps_double import MapsDouble

    if os.geteuid() != 0:
        pytest.skip("reading BPF maps needs root")
    before = run_usmlab("doctor", "--target", "local", "--port", str(free_port()))
    maps_line = next(ln for ln in before.stdout.splitlines() if "USM maps readable" in ln)
    assert "SKIP" in maps_line and "no USM map is loaded" in maps_line
    double = MapsDouble(tmp_path).start()
    try:
        after = run_usmlab("doctor", "--target", "local", "--port", str(free_port()))
    finally:
        double.stop()
    maps_line = next(ln for ln in after.stdout.splitlines() if "USM maps readable" in ln)
    assert "PASS" in maps_line and "conn_tup_by_go_tls_conn" in maps_line


@needs_bpftool
def test_over_ssh_with_system_probe_the_machines_usm_maps_are_judged(
    sshd_server, tmp_path: Path
) -> None:
    """system-probe already runs on a staging host: usmlab starts no tracer, fetches its stats
    (the system-probe TEST DOUBLE serves them) and dumps the machine's USM maps (the maps TEST
    DOUBLE holds them here, planted) over SSH; the planted requests, and only they, are stale."""
    import tempfile

    from sysprobe_double import SysprobeDouble
    from usm_maps_double import MapsDouble

    if os.geteuid() != 0:
        pytest.skip("BPF maps need root")
    work = tmp_path / "remote"
    short = Path(tempfile.mkdtemp(prefix="usmsp-"))
    maps = MapsDouble(work, conn_every=3).start()
    try:
        with SysprobeDouble(short) as double:
            done = run_usmlab(
                "test", "churn", "--target", sshd_server.spec,
                "--identity", str(sshd_server.key_path), "--work-dir", str(work),
                "--tracer", "system-probe", "--sysprobe-socket", str(double.socket_path),
                "--runs-dir", str(tmp_path / "runs"), "--state-dir", str(tmp_path / "state"),
                "--servers", f"{free_port()},{free_port()}", "--count", "30",
                "--interval", "100ms", "--concurrency", "2", "--skip-close", "0",
                "--gc-every", "0", timeout=300,
            )  # fmt: skip
    finally:
        maps.stop()
        shutil.rmtree(short, ignore_errors=True)
    run_dir = only_run_dir(tmp_path / "runs")
    report = json.loads((run_dir / "report.json").read_text())
    planted = {json.loads(x)["conn_id"] for x in maps.planted.read_text().splitlines()}
    conn = report["usm_maps"]["conn_tup_by_go_tls_conn"]
    found = {e["conn_id"] for e in report["usm_maps"]["examples"]}
    assert found <= planted and len(found) >= len(planted) - conn["not_seen"]
    assert conn["stale_tuple"]["count"] == len(found) > 0
    assert report["usm_maps"]["tuple_by_pid_fd"]["stale_tuple"]["count"] == 0
    assert done.returncode == 1, done.stderr
