"""`--tracer usm-debugger` with the usm-debugger TEST DOUBLE (tests/usm_debugger_double.py): a real
root process holding real BPF programs and printing USM's pathless messages into trace_pipe."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from labrun import (
    free_port,
    needs_tracer,
    only_run_dir,
    processes_of_run,
    read_jsonl,
    run_usmlab,
    usmlab_argv,
)

from usmlab.errors import EXIT_FAILED, UsmlabError
from usmlab.kit import KIT_DIR, kit_files
from usmlab.targets.local import LocalTarget
from usmlab.tracers import TracerContext
from usmlab.tracers.usm_debugger import UsmDebuggerTracer, telling_line

DOUBLE = Path(__file__).resolve().parent / "usm_debugger_double.py"


def lab_args(tmp_path: Path, binary: str) -> list[str]:
    return [
        "scenario1", "--tracer", "usm-debugger", "--usm-debugger", binary,
        "--count", "5", "--interval", "0.1", "--url", f"https://127.0.0.1:{free_port()}",
        "--runs-dir", str(tmp_path / "runs"), "--state-dir", str(tmp_path / "state"),
    ]  # fmt: skip


@needs_tracer
def test_a_run_with_the_double_attributes_events_and_stops_it_before_the_reader(
    tmp_path: Path,
) -> None:
    done = run_usmlab("test", *lab_args(tmp_path, str(DOUBLE)))
    assert done.returncode == 0, done.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["tracer"] == "usm-debugger"
    pids = {p["role"]: p["pid"] for p in manifest["processes"]}

    report = json.loads((run_dir / "report.json").read_text())
    assert report["outcome"] == "capture-works"
    assert report["message_counts"].get("http_event", 0) >= 10  # 5 requests, 2 lines each side
    client = report["events_by_process"][str(pids["client"])]
    assert client["role"] == "client" and client["counts"].get("http_event", 0) > 0
    assert report["events_by_process"][str(pids["server"])]["role"] == "server"

    # Traffic started only once the double's probes were attached.
    first_request = min(r["start_mono"] for r in read_jsonl(run_dir / "client.jsonl"))
    assert manifest["tracer_attached_mono"] is not None
    assert manifest["tracer_attached_mono"] < first_request
    # USM finds processes as they load libssl: the server starts only after the attach.
    said = done.stderr
    assert said.index("tracer usm-debugger: attached") < said.index("server: ready")

    assert (run_dir / "tracer.log").read_text().startswith("usm-debugger TEST DOUBLE")
    # The double was stopped (SIGINT first) while the reader still ran: its last line is there.
    trace = (run_dir / "trace_pipe.log").read_text()
    assert f"usm-debugger TEST DOUBLE (pid {pids['tracer']}): stopped on SIGINT" in trace
    tracer = next(p for p in manifest["processes"] if p["role"] == "tracer")
    assert tracer["exit_code"] == 0
    assert processes_of_run(manifest["run_id"]) == []


@needs_tracer
def test_a_failing_tracer_fails_the_run_with_its_stderr_line(tmp_path: Path) -> None:
    message = "error while loading USM: the double was told to fail"
    done = subprocess.run(
        usmlab_argv("test", *lab_args(tmp_path, str(DOUBLE))),
        env={**os.environ, "USMLAB_DOUBLE_FAIL": message},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_FAILED, done.stderr
    assert "Traceback" not in done.stderr
    lines = [ln for ln in done.stderr.splitlines() if message in ln]
    assert len(lines) == 1, done.stderr
    assert "exited with status 255 before attaching" in lines[0]
    manifest = json.loads((only_run_dir(tmp_path / "runs") / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert processes_of_run(manifest["run_id"]) == []


@needs_tracer
@pytest.mark.parametrize(
    ("name", "expected"),
    [("absent/usm-debugger", "not found at"), ("not-executable", "not an executable file")],
)
def test_an_unusable_binary_is_named_in_one_line(tmp_path: Path, name: str, expected: str) -> None:
    binary = tmp_path / name
    if name == "not-executable":
        binary.write_text("#!/bin/sh\n")
    done = run_usmlab("test", *lab_args(tmp_path, str(binary)))
    assert done.returncode == EXIT_FAILED
    assert "Traceback" not in done.stderr
    lines = [ln for ln in done.stderr.splitlines() if str(binary) in ln]
    assert lines and expected in lines[0], done.stderr
    if expected == "not found at":
        assert "system-probe.build-usm-debugger --arch=" in lines[0]


@needs_tracer
def test_the_tracer_records_what_it_attached(tmp_path: Path) -> None:
    target = LocalTarget(tmp_path / "work")
    kit_dir = target.join(target.work_dir, "kit")
    target.sync(kit_files(), kit_dir)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ctx = TracerContext(
        run_id="test-usm-debugger",
        run_dir=str(run_dir),
        kit_dir=kit_dir,
        facts={"btf": True, "machine": "x86_64"},
        env={"USMLAB_RUN_ID": "test-usm-debugger"},
        binary=str(DOUBLE),
    )
    tracer = UsmDebuggerTracer()
    proc = tracer.start(target, ctx)
    try:
        tracer.wait_attached(target, ctx, proc, timeout=30)
        still_running = target.poll(proc) is None
    finally:
        code = target.stop(proc)
    assert still_running
    assert code == 0
    summary = tracer.attached_summary
    assert summary["programs"] >= 1
    assert summary["stable_seconds"] >= 1.0
    assert summary["binary"] == str(DOUBLE)
    # The double's programs live in its bpftrace child: descendants are counted.
    assert {h["comm"] for h in summary["holders"]} == {"bpftrace"}
    assert tracer.attached_mono is not None
    assert (run_dir / "tracer.log").read_text().startswith("usm-debugger TEST DOUBLE")


@needs_tracer
def test_bpf_attached_sees_no_program_in_a_plain_process() -> None:
    with subprocess.Popen(["sleep", "30"]) as sleeper:
        try:
            done = subprocess.run(
                ["python3", str(KIT_DIR / "bpf_attached.py"), str(sleeper.pid)],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
        finally:
            sleeper.kill()
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["pid"], report["programs"], report["links"]) == (sleeper.pid, 0, 0)
    assert report["holders"] == []


def test_telling_line_prefers_the_fatal_stderr_error() -> None:
    log = (
        "2026-11-25 16:00:00 UTC | USM-DEBUGGER | INFO | (pkg/network/usm/monitor.go:90) | "
        "starting\n"
        "2026-11-25 16:00:01 UTC | USM-DEBUGGER | ERROR | (pkg/ebpf/manager.go:12) | "
        "could not attach probe\n"
        "error while loading ebpf: field kprobe__tcp_sendmsg: program: load program: "
        "permission denied"  # checkError: stderr, no newline, exit 255
    )
    assert telling_line(log).startswith("error while loading ebpf: field kprobe__tcp_sendmsg")
    still_running = log.rsplit("\n", 1)[0] + (
        "\n2026-11-25 16:00:02 UTC | USM-DEBUGGER | DEBUG | (x.go:1) | stats pulled"
    )
    assert "could not attach probe" in telling_line(still_running)
    crash = "starting\npanic: runtime error: invalid memory address\n\ngoroutine 1 [running]:\n"
    assert telling_line(crash) == "panic: runtime error: invalid memory address"
    assert telling_line("") == "no output (see tracer.log)"


@pytest.mark.skipif(os.geteuid() != 0, reason="checking the binary runs it through sudo")
def test_the_tracer_refuses_a_kernel_without_btf(tmp_path: Path) -> None:
    target = LocalTarget(tmp_path / "work")
    ctx = TracerContext(
        run_id="x", run_dir=str(tmp_path), kit_dir=str(tmp_path),
        facts={"btf": False}, binary=str(DOUBLE),
    )  # fmt: skip
    with pytest.raises(UsmlabError, match="needs BTF"):
        UsmDebuggerTracer().start(target, ctx)
