"""`usmlab build`: build usm-debugger in the lab VM with dda, and record what was built.

The build runs `dda inv system-probe.build-usm-debugger --arch=ARCH` in the agent checkout on the
target, in a login shell (docs/tracers.md: Go lives under the user's home and is not on PATH for
plain SSH commands). Its output streams to the terminal and to build.log; a failure is shown
verbatim (an upstream revision once did not compile), never swallowed. `--clean` removes the
eBPF objects a branch switch leaves behind, since a plain build embeds whatever lies there.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from usmlab.arch import find_arch
from usmlab.errors import UsageError, UsmlabError
from usmlab.manifest import now_iso
from usmlab.targets.base import Target

AGENT_DIR = "/git/datadog-agent"
LOG_TAIL = 25


@dataclass
class BuildRecord:
    """What `usmlab build` produced: enough to tell two builds apart later."""

    binary: str
    sha256: str
    size: int
    arch: str
    agent_commit: str | None
    go_version: str | None
    clang_version: str | None
    duration_s: float
    finished: str
    clean: bool


def normalize_arch(arch: str) -> str:
    """dda's spelling of any spelling of an architecture."""
    found = find_arch(arch)
    if found is None:
        raise UsageError(f"unknown arch {arch!r}: use arm64 or x86_64")
    return found.dda


def build_script(agent_dir: str, arch: str, clean: bool) -> str:
    """The shell script run on the target; every value in it is quoted."""
    steps = [f"cd {shlex.quote(agent_dir)}"]
    if clean:
        stale = shlex.quote(f"pkg/ebpf/bytecode/build/{arch}")
        steps.append(f"echo '[usmlab] --clean: removing stale eBPF objects' && rm -rf -- {stale}")
    steps.append(f"dda inv system-probe.build-usm-debugger --arch={shlex.quote(arch)}")
    return " && ".join(steps)


def _first_line(target: Target, script: str) -> str | None:
    result = target.run(["bash", "-lc", script], check=False)
    lines = result.stdout.strip().splitlines()
    return lines[0] if result.ok and lines else None


# What `dda inv system-probe.build-usm-debugger` needs on the target's login PATH, and the way
# to get each (the lab VM's test profile skips both; docs/vm.md).
BUILD_TOOLS = {
    "dda": "the full provisioning profile installs it (`usmlab up --profile full`; a test-profile "
    "VM: `usmlab destroy` first), or `pipx install dda` on the target",
    "go": "the full provisioning profile installs the checkout's .go-version (`usmlab up "
    "--profile full`; a test-profile VM: `usmlab destroy` first)",
}


def _require_build_tools(target: Target) -> None:
    for tool, remedy in BUILD_TOOLS.items():
        if _first_line(target, f"command -v {shlex.quote(tool)}") is None:
            raise UsmlabError(f"{tool} is not installed on the target: {remedy}")


def build_usm_debugger(
    target: Target,
    *,
    agent_dir: str = AGENT_DIR,
    arch: str | None = None,
    clean: bool = False,
    record_path: Path,
    progress: Callable[[str], None] = print,
    timeout: float = 3600.0,
) -> BuildRecord:
    """Build on the target, stream its output, write the build record; raise on failure."""
    if target.run(["test", "-d", agent_dir], check=False).exit_code != 0:
        raise UsmlabError(
            f"no datadog-agent checkout at {agent_dir} on the target "
            "(set agent_path in usmlab.toml and run `usmlab up`)"
        )
    _require_build_tools(target)
    machine = target.run(["uname", "-m"]).stdout.strip()
    arch = normalize_arch(arch or machine)
    log = target.join(target.work_dir, "build.log")
    target.run(["mkdir", "-p", "--", target.work_dir])
    target.run(["rm", "-f", "--", log])
    progress(f"build: dda inv system-probe.build-usm-debugger --arch={arch} in {agent_dir}")
    start = time.monotonic()
    proc = target.start(
        ["bash", "-lc", build_script(agent_dir, arch, clean)], name="build", stdout_path=log
    )
    shown = 0
    try:
        while True:
            code = target.poll(proc)
            text = target.run(["cat", "--", log], check=False).stdout
            lines = text.splitlines()
            complete = lines if code is not None else lines[:-1]  # last line may be partial
            for line in complete[shown:]:
                progress(f"  {line}")
            shown = max(shown, len(complete))
            if code is not None:
                break
            if time.monotonic() - start > timeout:
                raise UsmlabError(f"build did not finish within {timeout:.0f} s (see {log})")
            time.sleep(0.5)
    except BaseException:
        target.stop(proc)
        raise
    duration = time.monotonic() - start
    if code != 0:
        tail = "\n".join(lines[-LOG_TAIL:])
        raise UsmlabError(f"build failed (exit {code}); last lines of {log}:\n{tail}")
    binary = target.join(agent_dir, "bin", "usm-debugger")
    digest = target.run(["sha256sum", "--", binary], check=False)
    if not digest.ok:
        raise UsmlabError(f"the build reported success but {binary} is missing")
    size = int(target.run(["stat", "-c", "%s", "--", binary]).stdout.strip())
    quoted = shlex.quote(agent_dir)
    record = BuildRecord(
        binary=binary,
        sha256=digest.stdout.split()[0],
        size=size,
        arch=arch,
        agent_commit=_first_line(target, f"git -C {quoted} rev-parse HEAD"),
        go_version=_first_line(target, f"cd {quoted} && go version"),
        clang_version=_first_line(target, "clang --version"),
        duration_s=round(duration, 1),
        finished=now_iso(),
        clean=clean,
    )
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(asdict(record), indent=2) + "\n")
    return record
