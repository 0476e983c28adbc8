"""Build the Go workloads (kit/go_client, kit/go_server) on the target, with its own Go toolchain.

A workload must run, and be probed, where the traffic is, and a binary built elsewhere may not
match the target's architecture. Go is often not on PATH in a non-interactive SSH command (it was
installed with gimme under the user's home, docs/tracers.md), so it is looked up in a login shell
first, then in the usual install folders. A failed build is shown verbatim, never summarised.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import TypedDict

from usmlab.arch import AMD64, ARM64, find_arch
from usmlab.errors import UsmlabError
from usmlab.kit import GO_CLIENT_DIR, GO_SERVER_DIR
from usmlab.targets.base import Target, sha256_file
from usmlab.targets.local import LocalTarget

SOURCE_DIR = GO_CLIENT_DIR
SOURCE_FILES = ("main.go", "go.mod")
GO_FALLBACK_DIRS = ("/usr/local/go/bin", "/usr/lib/go/bin")
# Go's register ABI, which the Go TLS probes read arguments from, starts at these versions.
MIN_GO = {AMD64.go: (1, 17), ARM64.go: (1, 18)}  # the register ABI on each
BUILD_TIMEOUT_S = 900.0  # a first build under TCG emulation compiles half the standard library
# Static (no cgo: no C compiler needed on the target), offline, symbols kept: uprobes are placed
# by symbol name, so no -ldflags=-s and no stripping.
BUILD_ENV = {"CGO_ENABLED": "0", "GOPROXY": "off", "GOTOOLCHAIN": "local"}


class GoBuild(TypedDict):
    go_version: str  # e.g. go1.19.8, for the manifest
    goarch: str  # amd64 or arm64: selects the probes' registers
    sha256: str  # of the built binary, for the manifest
    path: str  # the binary on the target
    built_on: str  # "target" (its own toolchain) or "controller" (cross-built, uploaded)


class GoBuildError(UsmlabError):
    """`go build` failed; the message carries the compiler output verbatim."""


def _login_shell(target: Target, script: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run a shell snippet in a login shell (bash if present), as the user's SSH login would."""
    try:
        result = target.run(["bash", "-lc", script], check=False, timeout=timeout)
    except UsmlabError:  # no bash on this target
        result = None
    if result is None or (result.exit_code == 127 and not result.stdout):
        result = target.run(["sh", "-lc", script], check=False, timeout=timeout)
    return result.exit_code, result.stdout, result.stderr


def find_go(target: Target) -> str:
    """Absolute path of the `go` command on the target; UsmlabError when there is none."""
    dirs = " ".join(shlex.quote(d) for d in GO_FALLBACK_DIRS)
    # Every candidate, best first: the login PATH, the usual folders, then gimme's installs.
    script = (
        'p=$(command -v go 2>/dev/null); case $p in /*) echo "USMLAB_GO=$p";; esac; '
        f'for d in {dirs} "$HOME"/.gimme/versions/go*/bin; do '
        '[ -x "$d/go" ] && echo "USMLAB_GO=$d/go"; done; exit 0'
    )
    _, stdout, _ = _login_shell(target, script)
    found = re.findall(r"^USMLAB_GO=(/.+)$", stdout, flags=re.MULTILINE)
    if not found:
        where = ", ".join((*GO_FALLBACK_DIRS, "~/.gimme/versions"))
        raise UsmlabError(
            f"Go is not installed on the target (not on a login shell's PATH, nor in {where}): "
            "install it (Debian: apt-get install golang)"
        )
    return found[0]


def _go_version(target: Target, go: str) -> tuple[str, str]:
    """(GOVERSION, GOARCH) of the toolchain; UsmlabError if too old for the probes' ABI."""
    result = target.run([go, "env", "GOVERSION", "GOARCH"], check=False, env=BUILD_ENV)
    lines = result.stdout.split()
    if not result.ok or len(lines) != 2:
        detail = (result.stderr or result.stdout).strip() or f"exit status {result.exit_code}"
        raise UsmlabError(f"{go} env failed on the target: {detail}")
    version, goarch = lines
    match = re.match(r"go(\d+)\.(\d+)", version)
    minimum = MIN_GO.get(goarch)
    if minimum is None:
        raise UsmlabError(f"the Go TLS probes do not support GOARCH={goarch} (amd64, arm64 only)")
    if match is None or (int(match.group(1)), int(match.group(2))) < minimum:
        need = "go{}.{}".format(*minimum)
        raise UsmlabError(f"{version} on the target is too old for the Go TLS probes: need {need}")
    return version, goarch


def build_go_client(target: Target, kit_dir: str, out_path: str) -> GoBuild:
    """Upload the client's sources under kit_dir and `go build` them into out_path."""
    return build_go_program(target, kit_dir, SOURCE_DIR, "go_client", out_path)


def build_go_server(target: Target, kit_dir: str, out_path: str) -> GoBuild:
    """The Go server (kit/go_server), built the same way."""
    return build_go_program(target, kit_dir, GO_SERVER_DIR, "go_server", out_path)


def build_go_program(
    target: Target, kit_dir: str, source: Path, name: str, out_path: str, machine: str = ""
) -> GoBuild:
    """Build a Go program for the target into out_path: with the target's own Go toolchain
    (its sources uploaded to kit_dir/name), or, when the target has none (the lab's test box,
    a bare staging host), on this controller for the target's architecture (`machine`, its
    `uname -m`), static, then uploaded."""
    try:
        go = find_go(target)
    except UsmlabError as missing:
        if not machine or isinstance(target, LocalTarget):
            raise
        return _cross_build(target, source, name, out_path, machine, missing)
    src_dir = target.join(kit_dir, name)
    target.sync({f: source / f for f in SOURCE_FILES}, src_dir)
    version, goarch = _go_version(target, go)
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in BUILD_ENV.items())
    script = (
        f"cd {shlex.quote(src_dir)} && export {exports} && "
        f"{shlex.quote(go)} build -o {shlex.quote(out_path)} . 2>&1"
    )
    code, stdout, stderr = _login_shell(target, script, timeout=BUILD_TIMEOUT_S)
    if code != 0:
        output = (stdout + stderr).rstrip() or f"exit status {code}"
        what = name.replace("go_", "Go ")
        raise GoBuildError(f"go build of the {what} failed on the target:\n{output}")
    digest = target.run(["sha256sum", "--", out_path]).stdout.split()[0]
    return GoBuild(
        go_version=version, goarch=goarch, sha256=digest, path=out_path, built_on="target"
    )


def _cross_build(
    target: Target, source: Path, name: str, out_path: str, machine: str, missing: Exception
) -> GoBuild:
    """`go build` here for the target's GOARCH (CGO_ENABLED=0: static), then upload."""
    arch = find_arch(machine)
    local = LocalTarget()
    try:
        go = find_go(local)
    except UsmlabError:
        raise UsmlabError(
            f"{missing}; nor is it on this machine, to build for the target "
            "(install Go here or there: apt-get install golang)"
        ) from None
    if arch is None or arch.go not in MIN_GO:
        raise UsmlabError(f"no Go build for the target's architecture {machine!r}")
    env = {**BUILD_ENV, "GOOS": "linux", "GOARCH": arch.go}
    version, _ = _go_version(local, go)
    with tempfile.TemporaryDirectory(prefix="usmlab-go-") as work:
        binary = Path(work) / name
        done = subprocess.run(
            [go, "build", "-o", str(binary), "."], cwd=source, capture_output=True, text=True,
            timeout=BUILD_TIMEOUT_S, check=False,
            env={**os.environ, **env, "GOCACHE": str(Path(work) / "cache")},
        )  # fmt: skip
        if done.returncode != 0:
            output = (done.stdout + done.stderr).rstrip() or f"exit status {done.returncode}"
            raise GoBuildError(
                f"go build of the {name.replace('go_', 'Go ')} failed here:\n{output}"
            )
        target.put(binary, out_path, mode=0o755)
        digest = sha256_file(binary)
    return GoBuild(
        go_version=version, goarch=arch.go, sha256=digest, path=out_path, built_on="controller"
    )
