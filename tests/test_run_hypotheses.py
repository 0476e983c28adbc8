"""The hypothesis scenarios (docs/background.md) run end to end with the built-in tracer."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from labrun import (
    free_port,
    interrupt_when,
    needs_tracer,
    only_run_dir,
    processes_of_run,
    read_jsonl,
    run_usmlab,
    usmlab_argv,
)

pytestmark = needs_tracer


def args(tmp_path: Path, *extra: str, port: int | None = None) -> list[str]:
    return [
        "--runs-dir", str(tmp_path / "runs"), "--state-dir", str(tmp_path / "state"),
        "--tracer", "builtin", "--url", f"https://127.0.0.1:{port or free_port()}", *extra,
    ]  # fmt: skip


def report_of(tmp_path: Path) -> tuple[dict, dict]:
    run_dir = only_run_dir(tmp_path / "runs")
    report = json.loads((run_dir / "report.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return report, manifest


@pytest.mark.skipif(
    shutil.which("go") is None, reason="Go toolchain missing (apt-get install golang)"
)
def test_churn_runs_go_against_two_servers_with_a_per_server_verdict(tmp_path):
    ports = [free_port(), free_port()]
    done = run_usmlab(
        "test", "churn",
        *args(tmp_path, "--count", "80", "--concurrency", "8",
              "--servers", ",".join(map(str, ports))),
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report, manifest = report_of(tmp_path)
    assert manifest["go_client"]["sha256"] and manifest["go_client"]["go_version"]
    assert report["outcome"] == "capture-works"
    per_server = report["requests"]["per_server"]
    assert set(per_server) == {str(p) for p in ports}
    for row in per_server.values():
        assert row["sent"] == 40
        assert row["captured_client"] == 40  # every Go write, credited one to one
        assert row["misattributed"] == 0
        assert row["missed"] == 0
    # Each server only answered the path that names it.
    for port in ports:
        served = read_jsonl(only_run_dir(tmp_path / "runs") / f"server-{port}.jsonl")
        assert {r["path"] for r in served} == {f"/server{port}/identify"}


def test_restart_reports_old_and_new_pids_as_lab_roles(tmp_path):
    done = run_usmlab(
        "test", "restart", *args(tmp_path, "--duration", "3s", "--restart-after", "1.5s")
    )
    assert done.returncode == 0, done.stderr
    report, _ = report_of(tmp_path)
    roles = report["roles"]
    assert roles["client"]["role"] == roles["client-r1"]["role"] == "client"
    assert roles["server"]["role"] == roles["server-r1"]["role"] == "server"
    assert roles["client"]["pid"] != roles["client-r1"]["pid"]
    assert roles["server"]["pid"] != roles["server-r1"]["pid"]
    assert report["requests"]["misattributed"] == 0
    run_dir = only_run_dir(tmp_path / "runs")
    assert read_jsonl(run_dir / "client.jsonl") and read_jsonl(run_dir / "client-r1.jsonl")


def test_preexisting_traffic_is_judged_only_after_the_tracer_attached(tmp_path):
    done = run_usmlab(
        "test", "preexisting", *args(tmp_path, "--duration", "3s", "--preexisting", "1s")
    )
    assert done.returncode == 0, done.stderr
    report, manifest = report_of(tmp_path)
    assert manifest["tracer_attached_mono"] > 0
    assert report["requests"]["before_attach"] > 0
    assert report["outcome"] == "capture-works"


def test_multi_client_gives_each_client_its_own_paths(tmp_path):
    done = run_usmlab("test", "multi-client", *args(tmp_path, "--count", "6", "--interval", "0"))
    assert done.returncode == 0, done.stderr
    report, _ = report_of(tmp_path)
    clients = [n for n, r in report["roles"].items() if r["role"] == "client"]
    assert sorted(clients) == ["client-1", "client-2", "client-3"]
    run_dir = only_run_dir(tmp_path / "runs")
    paths = [{r["path"] for r in read_jsonl(run_dir / f"{c}.jsonl")} for c in clients]
    assert not (paths[0] & paths[1] or paths[1] & paths[2] or paths[0] & paths[2])
    assert report["requests"]["captured_client"] == 18
    _, manifest = report_of(tmp_path)
    assert manifest["client_summary"]["sent"] == 18  # every client's log, not just client.jsonl


def test_ephemeral_port_server_listens_inside_the_ephemeral_range(tmp_path):
    done = run_usmlab("test", "ephemeral-port-server", *args(tmp_path, "--count", "5"))
    assert done.returncode == 0, done.stderr
    _, manifest = report_of(tmp_path)
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    (port,) = manifest["server_ports"]
    assert low <= port <= high


def usmlab_nat_tables() -> list[str]:
    listing = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    return [line for line in listing.splitlines() if "usmlab" in line]


nat_tool = pytest.mark.skipif(shutil.which("nft") is None, reason="nft missing (nftables)")


@nat_tool
def test_nat_reaches_the_server_through_the_virtual_address_and_removes_its_rule(tmp_path):
    done = run_usmlab("test", "nat", *args(tmp_path, "--count", "5", "--interval", "0"))
    assert done.returncode == 0, done.stderr
    report, manifest = report_of(tmp_path)
    assert manifest["nat"]["vip"] == "127.0.0.42:443"
    assert report["requests"]["captured_client"] == 5
    client = read_jsonl(only_run_dir(tmp_path / "runs") / "client.jsonl")
    assert {r["remote"] for r in client} == {"127.0.0.42:443"}
    assert usmlab_nat_tables() == []


@nat_tool
def test_nat_rule_is_removed_after_ctrl_c(tmp_path):
    proc = subprocess.Popen(
        usmlab_argv("test", "nat", *args(tmp_path, "--count", "0", "--interval", "0.05")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    code, err = interrupt_when(proc, tmp_path / "runs", "client.jsonl", signal.SIGINT)
    assert code == 130, err
    _, manifest = report_of(tmp_path)
    assert manifest["status"] == "interrupted"
    assert usmlab_nat_tables() == []
    assert processes_of_run(manifest["run_id"]) == []


def test_system_probe_source_reports_a_wrong_server_entry(tmp_path):
    """--tracer system-probe starts no tracer and judges system-probe's own stats.

    system-probe cannot run here: its debug endpoints are served by the test double
    (tests/sysprobe_double.py), fed with one entry that names the wrong server.
    """
    import tempfile

    from sysprobe_double import SysprobeDouble, request_summary

    ports = [free_port(), free_port()]
    short = Path(tempfile.mkdtemp(prefix="usmsp-"))
    try:
        with SysprobeDouble(short) as double:
            lo, named = "127.0.0.1", f"/server{ports[0]}/identify"
            double.add_http(
                request_summary((lo, 40100), (lo, ports[0]), named, {200: 5}),
                request_summary((lo, 40102), (lo, ports[1]), named, {200: 1}),  # wrong server
            )
            done = run_usmlab(
                "test", "scenario1",
                "--runs-dir", str(tmp_path / "runs"), "--state-dir", str(tmp_path / "state"),
                "--tracer", "system-probe", "--sysprobe-socket", str(double.socket_path),
                "--servers", ",".join(map(str, ports)), "--count", "4", "--interval", "0",
                "--paths", "/server{port}/identify",
            )  # fmt: skip
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert done.returncode == 1, done.stderr
    report, manifest = report_of(tmp_path)
    assert manifest["tracer"] == "system-probe"
    assert not (only_run_dir(tmp_path / "runs") / "tracer.log").exists()
    assert report["outcome"] == "misattribution"
    wrong = report["system_probe"]["misattributed"]
    assert any(e["path"] == f"/server{ports[0]}/identify" for e in wrong), wrong
