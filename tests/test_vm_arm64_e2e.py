"""The user's architecture for real: an arm64 lab VM on this x86_64 machine, end to end.

`usmlab up --lab --arch arm64` builds the arm64 test box through qemu-user (binfmt_misc, left as
found), boots it under qemu-system-aarch64 (TCG), and the OpenSSL and Go scenarios then run in it
with the built-in tracer: libssl's aarch64 build and the Go probes' arm64 register ABI, each
request attributed to its client. Box build about 6 min cold (cached after), boot about 1 min.
Needs what test_vm_e2e needs plus qemu-user-static and qemu-system-arm; USMLAB_REQUIRE_VM_TESTS=1
(CI) fails instead of skipping without them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from labrun import run_usmlab
from vm_requirements import missing_tools, require

from usmlab.arch import ARM64
from usmlab.vm import binfmt, libvirt_host, vagrant

pytestmark = [pytest.mark.slow, pytest.mark.root]


@pytest.fixture(scope="module", autouse=True)
def _requirements() -> None:
    missing = missing_tools("qemu-system-aarch64", "go")
    try:
        binfmt.registration_line(ARM64)
    except binfmt.BinfmtError:
        missing.append("qemu-user-static")
    require(missing, "arm64 VM tests")


def _usmlab(root: Path, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return run_usmlab(*args, cwd=root, timeout=timeout)


@pytest.fixture(scope="module")
def arm64_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    started = libvirt_host.ensure_libvirt_daemons(lambda m: print(m, file=sys.stderr))
    root = tmp_path_factory.mktemp("usmlab-arm64")
    try:
        binfmt_before = sorted(p.name for p in binfmt.BINFMT_DIR.iterdir())
        up = _usmlab(root, "up", "--lab", "--arch", "arm64", "--cpus", "2", "--memory", "1536")
        assert up.returncode == 0, up.stderr[-3000:]
        # binfmt_misc is left as it was found (mounted or not, the entry there or not).
        assert sorted(p.name for p in binfmt.BINFMT_DIR.iterdir()) == binfmt_before
        yield root
    finally:
        try:
            vagrant.destroy(root, progress=lambda m: print(m, file=sys.stderr))
        finally:
            libvirt_host.stop_daemons(started)


def test_the_lab_vm_is_arm64_with_aarch64_libssl(arm64_vm: Path) -> None:
    shell = _usmlab(
        arm64_vm, "ssh", "--", "uname -m; python3 -c 'import ssl; print(ssl.OPENSSL_VERSION)'"
    )
    assert shell.returncode == 0, shell.stderr
    machine, openssl = shell.stdout.split("\n")[:2]
    assert machine == "aarch64"
    assert openssl.startswith("OpenSSL 3.")
    settings = json.loads((arm64_vm / ".usmlab" / "vm.json").read_text())
    assert settings["lab"]["arch"] == "aarch64"


def _run(arm64_vm: Path, runs: Path, scenario: str, *args: str) -> tuple[dict, dict]:
    done = _usmlab(
        arm64_vm, "test", scenario, "--tracer", "builtin", "--runs-dir", str(runs),
        "--state-dir", str(runs.parent / "state"), *args,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = [d for d in runs.iterdir() if d.name.endswith(f"-{scenario}-vagrant")]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    report = json.loads((run_dir / "report.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["target"]["machine"] == "aarch64"
    assert "/aarch64-linux-gnu/" in manifest["target"]["libssl"][0]
    return manifest, report


def test_openssl_requests_are_attributed_to_the_client_on_arm64(
    arm64_vm: Path, tmp_path: Path
) -> None:
    """scenario3 (Python/OpenSSL client): the SSL_read/SSL_write uprobes on aarch64 libssl."""
    _, report = _run(arm64_vm, tmp_path / "runs", "scenario3", "--count", "40")
    assert report["outcome"] == "capture-works"
    assert report["requests"]["captured_client"] == 40
    assert report["requests"]["missed"] == 0


def test_go_requests_are_attributed_to_the_client_on_arm64(arm64_vm: Path, tmp_path: Path) -> None:
    """churn (Go crypto/tls client, built on this machine for arm64): the Go probes read the
    connection and buffer from X0..X2, the arm64 register ABI."""
    manifest, report = _run(arm64_vm, tmp_path / "runs", "churn", "--count", "100")
    assert manifest["go_client"]["goarch"] == "arm64"
    assert manifest["go_client"]["built_on"] == "controller"  # the test box has no Go
    assert report["outcome"] == "capture-works"
    assert report["requests"]["captured_client"] == 100
    assert report["requests"]["missed"] == 0
    # collect again and analyze from the controller's copy: the same verdict.
    run_dir = next((tmp_path / "runs").iterdir())
    again = _usmlab(arm64_vm, "analyze", str(run_dir), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["requests"]["captured_client"] == 100
