"""`usmlab test` on the local target: real workloads, real TLS, real processes, real signals."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from labrun import (
    free_port,
    interrupt_when,
    needs_tracer,
    only_run_dir,
    processes_of_run,
    read_jsonl,
    run_in_a_terminal,
    run_usmlab,
    usmlab_argv,
)

from usmlab.errors import EXIT_FAILED


def lab_args(tmp_path, *extra: str, port: int | None = None) -> list[str]:
    port = port or free_port()
    return [
        "--target", "local",
        "--runs-dir", str(tmp_path / "runs"),
        "--state-dir", str(tmp_path / "state"),
        "--url", f"https://127.0.0.1:{port}",
        *extra,
    ]  # fmt: skip


def test_scenario1_leaves_every_artifact_with_matching_requests(tmp_path):
    done = run_usmlab(
        "test", "scenario1", *lab_args(tmp_path, "--interval", "50ms", "--tracer", "none")
    )
    assert done.returncode == 0, done.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    assert str(run_dir) in done.stdout
    assert run_dir.name.endswith("-scenario1-local")
    for name in ("manifest.json", "client.jsonl", "server.jsonl", "client.log", "server.log"):
        assert (run_dir / name).stat().st_size > 0, name
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["scenario"] == "scenario1"
    assert manifest["parameters"]["count"] == 10
    assert manifest["tracer"] == "none"
    assert {p["role"] for p in manifest["processes"]} >= {"server", "client"}
    for key in ("python", "openssl", "kernel", "host"):
        assert manifest["target"][key]
    assert manifest["usmlab_version"]
    for name in ("client.jsonl", "server.jsonl", "client.log"):
        assert len(manifest["files"][name]["sha256"]) == 64

    client = read_jsonl(run_dir / "client.jsonl")
    server = read_jsonl(run_dir / "server.jsonl")
    assert [r["status"] for r in client] == [200] * 10
    by_port = {r["peer_port"]: r["path"] for r in server}
    assert {r["local_port"]: r["path"] for r in client} == by_port
    client_pid = next(p["pid"] for p in manifest["processes"] if p["role"] == "client")
    assert {r["pid"] for r in client} == {client_pid}
    assert processes_of_run(manifest["run_id"]) == []

    # The workloads ran on the interpreter the probe described (named by its path, so a
    # version manager's `python3` shim is passed once, and sudo cannot pick another one).
    workloads = [p["argv"] for p in manifest["processes"] if p["role"] in ("server", "client")]
    interpreters = {argv[argv.index("-S") - 1] for argv in workloads}
    assert len(interpreters) == 1
    interpreter = interpreters.pop()
    assert Path(interpreter).is_absolute()
    version = subprocess.run(
        [interpreter, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert version == manifest["target"]["python"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_run_stops_everything_and_keeps_the_files(tmp_path, sig):
    proc = subprocess.Popen(
        usmlab_argv("test", "scenario2", *lab_args(tmp_path, "--tracer", "none")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    code, err = interrupt_when(proc, tmp_path / "runs", "client.jsonl", sig)
    assert code == 130, err
    run_dir = only_run_dir(tmp_path / "runs")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert processes_of_run(manifest["run_id"]) == []
    assert read_jsonl(run_dir / "client.jsonl")
    assert "client.jsonl" in manifest["files"]
    assert "Traceback" not in err


def test_a_busy_port_names_its_holder(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = run_usmlab("test", "scenario1", *lab_args(tmp_path, "--tracer", "none", port=port))
    assert done.returncode == EXIT_FAILED
    assert f"port {port} is in use by pid" in done.stderr
    assert "Traceback" not in done.stderr
    manifest = json.loads((only_run_dir(tmp_path / "runs") / "manifest.json").read_text())
    assert manifest["status"] == "failed"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["test", "scenario9"], "unknown scenario"),
        (["test", "scenario1", "--count", "-1"], "count"),
        (["test", "scenario1", "--url", "http://127.0.0.1:8443"], "malformed URL"),
        (["test", "scenario1", "--url", "notaurl"], "malformed URL"),
        (["test", "scenario1", "--interval", "abc"], "malformed interval"),
        (["test", "scenario1", "--tracer", "strace"], "unknown tracer"),
        (["test", "scenario1", "--target", "ftp://x"], "unknown target"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    from typer.testing import CliRunner

    from usmlab.cli import app

    result = CliRunner().invoke(app, [*args, "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_scenarios_lists_each_with_its_goal():
    from typer.testing import CliRunner

    from usmlab.cli import app

    result = CliRunner().invoke(app, ["scenarios"])
    assert result.exit_code == 0
    from usmlab.scenarios import SCENARIOS

    for scenario in SCENARIOS.values():  # every hypothesis scenario, with what it tests
        assert scenario.name in result.output
        assert scenario.goal in result.output
    for name, goal in [
        ("scenario1", "Verify eBPF captures requests with correct PID"),
        ("scenario2", "Sustained traffic to test for sporadic issues"),
        ("scenario3", "High-frequency requests to stress test"),
    ]:
        assert name in result.output
        assert goal in result.output


def test_the_library_runs_a_scenario_without_the_cli(tmp_path):
    from usmlab.run.pipeline import LabRun
    from usmlab.scenarios import get_scenario
    from usmlab.targets.local import LocalTarget

    scenario = get_scenario("scenario3")
    params = scenario.with_overrides(
        count=20, interval=0.02, url=f"https://127.0.0.1:{free_port()}", concurrency=2
    )
    messages: list[str] = []
    result = LabRun(
        LocalTarget(work_dir=tmp_path / "work"),
        scenario,
        params,
        runs_dir=tmp_path / "runs",
        tracer="none",
        state_dir=tmp_path / "state",
        progress=messages.append,
    ).execute()
    assert result.status == "complete"
    assert result.manifest["client_summary"]["ok"] == 20
    assert any("server: ready" in m for m in messages)
    assert threading.active_count() >= 1


def current_trace_clock() -> str:
    text = Path("/sys/kernel/tracing/trace_clock").read_text()
    return next(w.strip("[]") for w in text.split() if w.startswith("["))


@needs_tracer
@pytest.mark.parametrize("ready", ["tracer.log", "client.jsonl"])
def test_ctrl_c_with_the_tracer_restores_tracefs_and_leaves_nothing(tmp_path, ready):
    """Interrupted while the tracer attaches, or mid-traffic: same clean end either way, and
    tracefs as it was before the run (unmounted again if the run mounted it)."""
    clock_file = Path("/sys/kernel/tracing/trace_clock")
    clock_before = current_trace_clock() if clock_file.exists() else None
    proc = subprocess.Popen(
        usmlab_argv("test", "scenario2", *lab_args(tmp_path, "--tracer", "builtin")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    code, err = interrupt_when(proc, tmp_path / "runs", ready, signal.SIGINT)
    assert code == 130, err
    run_dir = only_run_dir(tmp_path / "runs")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert processes_of_run(manifest["run_id"]) == []
    if clock_before is None:  # a fresh machine: the run mounted tracefs, and unmounted it
        assert not clock_file.exists()
    else:
        assert current_trace_clock() == clock_before
    tracefs = manifest.get("tracefs")
    if tracefs is not None and clock_before is not None:
        assert tracefs["trace_clock"] == clock_before  # the manifest names what it restored
    assert (run_dir / "trace_pipe.log").exists() or tracefs is None


@needs_tracer
def test_a_second_trace_pipe_reader_is_a_clear_error(tmp_path):
    from usmlab.kit.tracefs import find_tracefs

    path, _ = find_tracefs()
    assert path is not None
    other = subprocess.Popen(["cat", f"{path}/trace_pipe"], stdout=subprocess.DEVNULL)
    try:
        done = run_usmlab("test", "scenario1", *lab_args(tmp_path, "--tracer", "builtin"))
    finally:
        other.terminate()
        other.wait()
    assert done.returncode == EXIT_FAILED
    assert "trace_pipe is busy" in done.stderr
    assert len(done.stderr.strip().splitlines()[-2:]) <= 2
    assert "Traceback" not in done.stderr


@needs_tracer
def test_scenario3_with_the_builtin_tracer_attributes_every_request_to_the_client(tmp_path):
    done = run_usmlab("test", "scenario3", *lab_args(tmp_path, "--tracer", "builtin"))
    assert done.returncode == 0, done.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    report = json.loads((run_dir / "report.json").read_text())
    assert report["outcome"] == "capture-works"
    assert report["requests"]["sent"] == 100
    assert report["requests"]["captured_client"] == 100
    assert report["requests"]["misattributed"] == 0
    assert report["requests"]["missed"] == 0
    assert report["foreign"] == []
    client_pid = read_jsonl(run_dir / "client.jsonl")[0]["pid"]
    assert report["roles"]["client"]["pid"] == client_pid
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["tracer"] == "builtin"
    assert manifest["trace_clock"] == "mono"
    assert manifest["client_summary"]["jitter_ms"]["p99"] <= 20
    assert (run_dir / "report.md").read_text().startswith("# usmlab report")
    assert "capture-works" in done.stdout


FOREIGN_CLIENT = """
import ssl, sys, time, urllib.request
ctx = ssl._create_unverified_context()
for path in sys.argv[2:]:
    with urllib.request.urlopen("https://127.0.0.1:%s%s" % (sys.argv[1], path), context=ctx) as r:
        r.read()
print("done", flush=True)
"""


FOREIGN_PATHS = [
    "/api/v1/namespaces/kube-system/pods",
    "/api/v1/namespaces/datadog-agent/configmaps",
]


@needs_tracer
def test_a_process_outside_the_lab_sending_lab_paths_is_named_as_foreign(tmp_path):
    port = free_port()
    lab = subprocess.Popen(
        usmlab_argv(
            "test", "scenario2",
            *lab_args(tmp_path, "--tracer", "builtin", "--duration", "4s", port=port),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        runs = tmp_path / "runs"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            dirs = list(runs.glob("*/client.jsonl")) if runs.exists() else []
            if dirs and dirs[0].stat().st_size:
                break
            time.sleep(0.05)
        foreign = subprocess.Popen(
            [sys.executable, "-c", FOREIGN_CLIENT, str(port), *FOREIGN_PATHS],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, foreign_err = foreign.communicate(timeout=30)
        assert out.strip() == "done", foreign_err
        _, err = lab.communicate(timeout=90)
    finally:
        if lab.poll() is None:
            lab.send_signal(signal.SIGINT)
            lab.wait(timeout=60)
    assert lab.returncode == 1, err
    report = json.loads((only_run_dir(tmp_path / "runs") / "report.json").read_text())
    assert report["outcome"] == "misattribution"
    entries = [f for f in report["foreign"] if f["pid"] == foreign.pid]
    assert len(entries) == 1, report["foreign"]
    assert set(FOREIGN_PATHS) <= set(entries[0]["paths"])
    assert entries[0]["comm"]


def test_a_run_where_no_request_succeeds_is_failed_with_the_reason(tmp_path):
    """The CLI refuses paths the server does not serve; the library, given them anyway (they
    skip validation here), must still not call a run of 404s a measurement."""
    import dataclasses

    from usmlab.run.pipeline import LabRun
    from usmlab.scenarios import get_scenario
    from usmlab.targets.local import LocalTarget

    scenario = get_scenario("scenario1")
    params = dataclasses.replace(
        scenario.params, count=2, interval=0.0, paths=("/no/such/endpoint",),
        url=f"https://127.0.0.1:{free_port()}",
    )  # fmt: skip
    result = LabRun(
        LocalTarget(work_dir=tmp_path / "work"), scenario, params, runs_dir=tmp_path / "runs",
        tracer="none", state_dir=tmp_path / "state",
    ).execute()  # fmt: skip
    assert result.exit_code == EXIT_FAILED
    assert result.error == "none of the 2 requests succeeded: status 404"
    manifest = json.loads((only_run_dir(tmp_path / "runs") / "manifest.json").read_text())
    assert manifest["status"] == "failed"


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--paths", "/no/such/endpoint"], "does not serve /no/such/endpoint"),
        (["--paths", "/a b"], "paths start with / and have no spaces"),
        (["--paths", "/server1/identify"], "does not serve /server1/identify"),
        (["--url", "https://127.0.0.2:8443"], "the lab certificate does not name 127.0.0.2"),
        (["--concurrency", "100000"], "concurrency must be 1 to 1000"),
        (["--duration", "1e9"], "duration must be above 0 and at most 7 days"),
        (["--duration", "1000000000"], "duration must be above 0 and at most 7 days"),
        (["--interval", "1m30x"], "malformed interval"),
    ],
)
def test_bad_input_is_refused_before_anything_is_deployed(tmp_path, flags, said):
    done = run_usmlab("test", "scenario1", *lab_args(tmp_path, "--tracer", "none", *flags))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0], done.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started, nothing was written


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_a_runs_dir_that_cannot_hold_runs_is_a_usage_error(tmp_path, kind):
    runs = tmp_path / "runs"
    if kind == "file":
        runs.write_text("not a folder")
    else:
        runs.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(runs)], check=True)
    try:
        done = run_usmlab("test", "scenario1", *lab_args(tmp_path, "--tracer", "none"))
    finally:
        if kind == "read-only":
            subprocess.run(["umount", str(runs)], check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(runs) in lines[0], done.stderr
    assert "internal error" not in done.stderr


def test_a_sweep_makes_one_run_per_setting_and_a_table(tmp_path):
    done = run_usmlab(
        "test", "scenario1",
        *lab_args(tmp_path, "--tracer", "none", "--count", "3", "--interval", "0",
                  "--sweep", "concurrency=1,3"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert len(runs) == 2
    settings = [
        json.loads((r / "manifest.json").read_text())["parameters"]["concurrency"] for r in runs
    ]
    assert settings == [1, 3]
    table = done.stdout.splitlines()[-3:]
    assert (
        table[0].startswith("concurrency")
        and table[1].startswith("1 ")
        and table[2].startswith("3 ")
    )


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere(tmp_path):
    args = lab_args(tmp_path, "--tracer", "none", "--count", "30", "--interval", "100ms")
    piped = run_usmlab("test", "scenario1", *args)
    assert piped.returncode == 0, piped.stderr
    assert re.search(r"^client: \d+/30 requests$", piped.stderr, flags=re.MULTILINE)
    assert "\x1b[" not in piped.stderr  # CI logs stay readable: no escape sequences
    shown = run_in_a_terminal(usmlab_argv("test", "scenario1", *lab_args(
        tmp_path, "--tracer", "none", "--count", "30", "--interval", "100ms")))  # fmt: skip
    assert "━" in shown and "req/s" in shown  # rich's bar, with the request rate
