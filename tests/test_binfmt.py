"""Foreign binaries during a box build: binfmt_misc set up for the build and left as found.

The real part runs an arm64 Go binary on this machine through the kernel's binfmt_misc and
qemu-user-static, including two overlapping users (two box builds at once).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from usmlab.arch import ARM64
from usmlab.vm import binfmt

HELLO = 'package main\nimport ("fmt"; "runtime")\nfunc main() { fmt.Println(runtime.GOARCH) }\n'


def test_the_registration_comes_from_qemu_user_static_files(tmp_path: Path) -> None:
    line = r":qemu-aarch64:M::\x7fELF\x02:\xff\xff:/usr/libexec/qemu-binfmt/aarch64-binfmt-P:OPF"
    (tmp_path / "qemu-aarch64.conf").write_text(f"# comment\n{line}\n")
    assert binfmt.registration_line(ARM64, (tmp_path,)) == line
    assert binfmt.entry_name(line) == "qemu-aarch64"
    with pytest.raises(binfmt.BinfmtError, match="apt-get install qemu-user-static"):
        binfmt.registration_line(ARM64, (tmp_path / "none",))


def _can_run_foreign() -> str:
    if os.geteuid() != 0:
        return "needs root"
    if platform.machine() == "aarch64":
        return "this machine is arm64 already"
    if shutil.which("go") is None:
        return "needs go"
    try:
        binfmt.registration_line(ARM64)
    except binfmt.BinfmtError:
        return "needs qemu-user-static"
    return ""


def _binfmt_now() -> tuple[bool, list[str]]:
    mounted = (binfmt.BINFMT_DIR / "register").exists()
    return mounted, sorted(p.name for p in binfmt.BINFMT_DIR.iterdir()) if mounted else []


@pytest.mark.skipif(bool(_can_run_foreign()), reason=_can_run_foreign() or "ok")
def test_arm64_binaries_run_inside_and_binfmt_is_left_as_found(tmp_path: Path) -> None:
    (tmp_path / "main.go").write_text(HELLO)
    (tmp_path / "go.mod").write_text("module hello\n\ngo 1.19\n")
    env = {**os.environ, "GOOS": "linux", "GOARCH": "arm64", "CGO_ENABLED": "0",
           "GOCACHE": str(tmp_path / "cache"), "GOFLAGS": "-mod=mod"}  # fmt: skip
    subprocess.run(["go", "build", "-o", "hello"], cwd=tmp_path, env=env, check=True)
    hello = str(tmp_path / "hello")
    state = tmp_path / "binfmt.json"
    before = _binfmt_now()

    # Another user (a second box build) enters first and leaves last.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from usmlab.arch import ARM64; "
         "from usmlab.vm.binfmt import foreign_binaries\n"
         f"with foreign_binaries(ARM64, state_file=Path({str(state)!r})):\n"
         "    print('in', flush=True); sys.stdin.readline()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "in"
        with binfmt.foreign_binaries(ARM64, state_file=state):
            ran = subprocess.run([hello], capture_output=True, text=True, check=True)
            assert ran.stdout.strip() == "arm64"
        # This process is out, the other still builds: its binaries must keep running.
        still = subprocess.run([hello], capture_output=True, text=True, check=True)
        assert still.stdout.strip() == "arm64"
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=30)
    assert holder.returncode == 0
    assert _binfmt_now() == before
    assert not state.exists()
