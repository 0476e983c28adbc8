"""The VM layer end to end: a real libvirt VM under software emulation (TCG), through Vagrant.

Builds (or reuses) the local test box, creates the VM with the test provisioning profile, reaches
it over plain SSH with the details Vagrant reports, provisions it again, checks that `up` on a
running VM is quick, and destroys it. About 4-5 minutes from scratch (box build included), about
2 minutes with the box cached. Needs root, Vagrant with vagrant-libvirt, libvirt, QEMU and
debootstrap; set USMLAB_REQUIRE_VM_TESTS=1 (CI does) to fail instead of skipping without them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from labrun import run_in_a_terminal, run_usmlab, usmlab_argv
from vm_requirements import missing_tools, require

from usmlab.vm import box, libvirt_host, vagrant
from usmlab.vm.settings import VmSettings, load_settings

pytestmark = [pytest.mark.slow, pytest.mark.root]

QEMU = {"amd64": "qemu-system-x86_64", "arm64": "qemu-system-aarch64"}


@pytest.fixture(scope="module", autouse=True)
def _requirements() -> None:
    arch = box.host_debian_arch()
    require(missing_tools(QEMU.get(arch, "qemu-system-" + arch)), "VM tests")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class LabVm:
    root: Path
    settings: VmSettings
    created: vagrant.UpResult


@pytest.fixture(scope="module")
def lab_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabVm]:
    started = libvirt_host.ensure_libvirt_daemons(_say)
    root = tmp_path_factory.mktemp("usmlab-vm")
    try:
        test_box = box.build_test_box(progress=_say)
        overrides = {**test_box.lab_settings(), "profile": "test", "cpus": 2, "memory": 1024}
        settings = load_settings(root, {}, overrides)
        created = vagrant.up(root, settings, progress=_say, cwd=root)
        yield LabVm(root, settings, created)
    finally:
        try:
            vagrant.destroy(root, progress=_say)
        finally:
            libvirt_host.stop_daemons(started)


def _ssh(details: dict[str, object], command: str) -> subprocess.CompletedProcess[str]:
    """Plain OpenSSH with what ssh_details reports: what any SSH transport would do."""
    argv = [
        "ssh",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null",
        "-o", "IdentitiesOnly=yes",
        "-o", "LogLevel=ERROR",
        "-i", str(details["identity_file"]),
        "-p", str(details["port"]),
        f"{details['user']}@{details['host']}",
        command,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def test_up_creates_and_provisions_with_the_test_profile(lab_vm: LabVm) -> None:
    result = lab_vm.created
    assert (result.action, result.provisioned) == ("created", True)
    lines = result.provision_lines
    for step in ("clang", "kernel-headers", "go", "dda"):
        assert f"[usmlab] skip {step} (test profile)" in lines
    # Not heavy, but the test profile is offline and the test box has no compiler.
    offline = "[usmlab] skip build-tools (test profile is offline; missing: build-essential"
    assert any(line.startswith(offline) for line in lines)
    assert "[usmlab] bpftrace: already installed (bpftrace)" in lines
    assert any(line.startswith("[usmlab] done: ") for line in lines)
    assert vagrant.vm_exists(lab_vm.root)
    assert vagrant.status(lab_vm.root) == "running"


def test_ssh_details_reach_the_vm_on_loopback(lab_vm: LabVm) -> None:
    details = vagrant.ssh_details(lab_vm.root)
    assert details["host"] == "127.0.0.1"
    assert details["user"] == "vagrant"
    assert Path(str(details["identity_file"])).is_file()
    done = _ssh(
        details,
        "uname -a && python3 --version && command -v bpftrace && test -e /sys/kernel/btf/vmlinux",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Linux ")
    assert "Python 3" in done.stdout
    assert "/bpftrace" in done.stdout


def test_scenario1_runs_inside_the_vm_with_the_builtin_tracer(
    lab_vm: LabVm, tmp_path: Path
) -> None:
    """The lab inside the VM over SSH: deploy, tracer, capture, collect, analyze."""
    done = _usmlab(
        lab_vm.root,  # the VM of this folder is the default target
        "test", "scenario1", "--tracer", "builtin", "--count", "5", "--interval", "0.2",
        "--runs-dir", str(tmp_path / "runs"), "--state-dir", str(tmp_path / "state"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["target"]["kind"] == "vagrant"
    assert run_dir.name.endswith("-scenario1-vagrant")  # not the forwarded port on 127.0.0.1
    assert manifest["status"] == "complete"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["outcome"] == "capture-works"
    assert report["requests"]["captured_client"] == 5
    assert report["requests"]["missed"] == 0
    for name in ("trace_pipe.log", "client.jsonl", "server.jsonl", "threads.jsonl"):
        assert manifest["files"][name]["size"] > 0


def test_provisioning_again_changes_only_what_drifted(lab_vm: LabVm) -> None:
    details = vagrant.ssh_details(lab_vm.root)
    unmount = _ssh(details, "sudo umount /sys/kernel/tracing")
    assert unmount.returncode == 0, unmount.stderr

    repaired = vagrant.provision(lab_vm.root, lab_vm.settings, progress=_say, cwd=lab_vm.root)
    assert "[usmlab] tracefs: mounted at /sys/kernel/tracing" in repaired.provision_lines
    assert "[usmlab] done: 1 changed, 3 already in place, 5 skipped" in repaired.provision_lines

    again = vagrant.provision(lab_vm.root, lab_vm.settings, progress=_say, cwd=lab_vm.root)
    assert "[usmlab] tracefs: already mounted at /sys/kernel/tracing" in again.provision_lines
    assert "[usmlab] done: 0 changed, 4 already in place, 5 skipped" in again.provision_lines


def test_up_on_a_running_provisioned_vm_does_nothing(lab_vm: LabVm) -> None:
    """How long that takes is measured by bench/vm_up (target <= 15 s)."""
    result = vagrant.up(lab_vm.root, lab_vm.settings, progress=_say, cwd=lab_vm.root)
    assert result.action == "already-running"
    assert not result.provisioned


def _usmlab(root: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return run_usmlab(*args, cwd=root, timeout=timeout)


def test_the_vm_keeps_its_settings_through_up_halt_and_up_again(lab_vm: LabVm) -> None:
    """Plain `up` on a lab VM, `halt`, `up` again: the same VM, ports and settings every time;
    a flag that would change it is a one-line error naming the way out."""
    port = vagrant.ssh_details(lab_vm.root)["port"]
    plain = _usmlab(lab_vm.root, "up")
    assert plain.returncode == 0, plain.stderr
    assert "its settings kept" in plain.stdout
    assert json.loads(_usmlab(lab_vm.root, "status", "--json").stdout) == {"state": "running"}
    changed = _usmlab(lab_vm.root, "up", "--cpus", "8")
    assert changed.returncode == 2
    assert "`usmlab destroy` first" in changed.stderr and "cpus=8" in changed.stderr
    halted = _usmlab(lab_vm.root, "halt")
    assert halted.returncode == 0, halted.stderr
    assert json.loads(_usmlab(lab_vm.root, "status", "--json").stdout)["state"] != "running"
    # Started again on a terminal: the boot is a rich bar (VM boot, steps, elapsed time).
    again = run_in_a_terminal(usmlab_argv("up"), timeout=900, cwd=lab_vm.root)
    assert "VM boot" in again and "━" in again and "VM started in" in again, again
    assert json.loads(_usmlab(lab_vm.root, "status", "--json").stdout) == {"state": "running"}
    assert vagrant.ssh_details(lab_vm.root)["port"] == port
    shell = _usmlab(lab_vm.root, "ssh", "--", "uname", "-s", timeout=120)
    assert shell.returncode == 0 and "Linux" in shell.stdout, shell.stderr
    # doctor and build default to the VM too, and say what is missing there.
    doctor = _usmlab(lab_vm.root, "doctor", "--json", "--port", "18443")
    assert doctor.returncode in (0, 4) and "Traceback" not in doctor.stderr, doctor.stderr
    checks = {c["name"]: c for c in json.loads(doctor.stdout)}
    kernel = checks["kernel version"]["detail"]
    assert kernel.startswith("Linux 6.1."), kernel  # the VM's Debian 12, not this host
    build = _usmlab(lab_vm.root, "build")
    assert build.returncode == 4
    assert "no datadog-agent checkout at /git/datadog-agent on the target" in build.stderr


def test_destroy_removes_the_vm(lab_vm: LabVm) -> None:
    destroyed = _usmlab(lab_vm.root, "destroy")
    assert destroyed.returncode == 0, destroyed.stderr
    assert not vagrant.vm_exists(lab_vm.root)
    assert vagrant.status(lab_vm.root) == "not_created"
    # The VM is gone: `test` must not fall back to root eBPF on this host.
    after = _usmlab(lab_vm.root, "test", "scenario1", timeout=120)
    assert after.returncode == 2
    assert "the lab VM recorded in .usmlab/ is gone" in after.stderr, after.stderr
