"""`usmlab test` over SSH against a real sshd on 127.0.0.1: same interface, same verdict."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from labrun import (
    free_port,
    needs_tracer,
    only_run_dir,
    processes_of_run,
    read_jsonl,
    run_in_a_terminal,
    run_usmlab,
    usmlab_argv,
)

from usmlab.targets.base import sha256_file


def ssh_args(server, tmp_path, *extra: str, port: int | None = None) -> list[str]:
    return [
        "--target", server.spec,
        "--identity", str(server.key_path),
        "--runs-dir", str(tmp_path / "runs"),
        "--state-dir", str(tmp_path / "state"),
        "--url", f"https://127.0.0.1:{port or free_port()}",
        *extra,
    ]  # fmt: skip


def wait_for_file(runs: Path, name: str, timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for manifest in runs.glob("*/manifest.json"):
            try:
                remote = json.loads(manifest.read_text())["target"].get("run_dir")
            except (ValueError, KeyError):
                continue
            if remote and (Path(remote) / name).is_file() and (Path(remote) / name).stat().st_size:
                return Path(remote)
        time.sleep(0.05)
    raise AssertionError(f"{name} never appeared on the target")


@needs_tracer
def test_scenario1_over_ssh_with_the_builtin_tracer_gives_the_full_verdict(sshd_server, tmp_path):
    done = run_usmlab(
        "test", "scenario1",
        *ssh_args(sshd_server, tmp_path, "--tracer", "builtin", "--interval", "50ms"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    assert run_dir.name.endswith(f"-scenario1-127.0.0.1_{sshd_server.port}")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["target"]["kind"] == "ssh"
    remote_dir = Path(manifest["target"]["run_dir"])
    assert remote_dir != run_dir and str(remote_dir).startswith(str(sshd_server.home))
    # Every file came home intact.
    for name, info in manifest["files"].items():
        if (remote_dir / name).exists():
            assert sha256_file(remote_dir / name) == info["sha256"], name
    report = json.loads((run_dir / "report.json").read_text())
    assert report["outcome"] == "capture-works"
    assert report["requests"]["captured_client"] == 10
    assert report["requests"]["missed"] == 0
    assert processes_of_run(manifest["run_id"]) == []


def test_a_killed_connection_leaves_nothing_running_and_collect_recovers_everything(
    sshd_server, tmp_path
):
    proc = subprocess.Popen(
        usmlab_argv("test", "scenario2", *ssh_args(sshd_server, tmp_path, "--tracer", "none")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        remote_dir = wait_for_file(tmp_path / "runs", "client.jsonl")
        run_id = remote_dir.name
        client_pid = read_jsonl(remote_dir / "client.jsonl")[0]["pid"]
        assert sshd_server.kill_connection_of(client_pid) or sshd_server.kill_connections()
        # The lease sees its channel close and stops every process group of the run.
        deadline = time.monotonic() + 20
        while processes_of_run(run_id) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_of_run(run_id) == []
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err
    run_dir = only_run_dir(tmp_path / "runs")
    # Lose some local files, as if the collection had been cut short, then collect again.
    for name in ("client.jsonl", "server.jsonl"):
        (run_dir / name).unlink(missing_ok=True)
    done = run_usmlab("collect", str(run_dir), "--identity", str(sshd_server.key_path))
    assert done.returncode == 0, done.stderr
    assert "verified" in done.stdout
    for name in ("client.jsonl", "server.jsonl", "client.log", "server.log"):
        assert sha256_file(run_dir / name) == sha256_file(remote_dir / name)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["collected"]
    assert processes_of_run(run_id) == []


def test_hostile_arguments_reach_the_remote_unchanged_and_run_nothing(sshd_server, tmp_path):
    marker = tmp_path / "pwned"
    work_dir = f"{tmp_path}/work dir 'q' \"dq\"; $(touch {marker})"
    paths = [
        '/api/v1/persistentvolumes/pv;$(touch$IFS"pwned1")',
        "/api/v1/persistentvolumes/`touch$IFS'pwned2'`'z'\"q\"",
    ]
    done = run_usmlab(
        "test", "scenario1",
        *ssh_args(
            sshd_server, tmp_path, "--tracer", "none", "--count", "2", "--interval", "0",
            "--work-dir", work_dir, "--paths", ",".join(paths),
        ),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    for where in (sshd_server.home, Path.cwd(), tmp_path):
        assert not list(where.glob("pwned*")), where
    run_dir = only_run_dir(tmp_path / "runs")
    assert [r["path"] for r in read_jsonl(run_dir / "server.jsonl")] == paths
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["target"]["work_dir"] == work_dir
    assert Path(work_dir, "kit", "server.py").is_file()


def test_two_targets_run_in_parallel_with_one_folder_each(sshd_server, tmp_path):
    second = sshd_server.start_another()
    # One key for both, as a user with one identity would have.
    with (second.root / "authorized_keys").open("a") as keys:
        keys.write(Path(f"{sshd_server.key_path}.pub").read_text())
    done = run_usmlab(
        "test", "scenario1",
        *ssh_args(sshd_server, tmp_path, "--tracer", "none", "--interval", "50ms"),
        "--target", second.spec,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 2
    assert folders[0].endswith(f"127.0.0.1_{sshd_server.port}") or folders[1].endswith(
        f"127.0.0.1_{sshd_server.port}"
    )
    assert any(f.endswith(f"127.0.0.1_{second.port}") for f in folders)
    for folder in folders:
        manifest = json.loads((tmp_path / "runs" / folder / "manifest.json").read_text())
        assert manifest["status"] == "complete"
        assert manifest["client_summary"]["ok"] == 10
    assert second.spec in done.stdout and sshd_server.spec in done.stdout


@pytest.mark.parametrize("spec", ["ssh://", "ssh://root@", "ssh://root@127.0.0.1:notaport"])
def test_malformed_ssh_targets_are_usage_errors(spec, tmp_path):
    done = run_usmlab("test", "scenario1", "--target", spec, "--runs-dir", str(tmp_path))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_collect_of_a_multi_client_run_gives_the_same_report_as_the_run(sshd_server, tmp_path):
    done = run_usmlab(
        "test", "multi-client",
        *ssh_args(sshd_server, tmp_path, "--tracer", "none", "--count", "4", "--interval", "0"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    sent = json.loads((run_dir / "report.json").read_text())["requests"]["sent"]
    assert sent == 3 * 4  # three clients, none of them named client.jsonl
    assert not (run_dir / "client.jsonl").exists()
    (run_dir / "report.json").unlink()
    (run_dir / "client-2.jsonl").unlink()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["collect_error"] = "connection lost"  # as a cut collection leaves it
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    done = run_usmlab("collect", str(run_dir), "--identity", str(sshd_server.key_path))
    assert done.returncode == 0, done.stderr
    assert sha256_file(run_dir / "client-2.jsonl")  # fetched again
    report = json.loads((run_dir / "report.json").read_text())
    assert report["requests"]["sent"] == sent
    assert f"requests sent    {sent}" in done.stdout
    assert "collect_error" not in json.loads((run_dir / "manifest.json").read_text())
    # Not a terminal: the collect phase is plain lines naming each file fetched (CI logs).
    assert re.search(r"^\[collect +\d+s\] \d+/\d+ client-2\.jsonl$", done.stderr, re.MULTILINE)
    assert "\x1b[" not in done.stderr
    # On a terminal: a rich bar.
    (run_dir / "client-2.jsonl").unlink()
    shown = run_in_a_terminal(
        usmlab_argv("collect", str(run_dir), "--identity", str(sshd_server.key_path))
    )
    assert "━" in shown and "collect" in shown, shown
    assert sha256_file(run_dir / "client-2.jsonl")
