"""The usm-debugger tracer: Datadog's own USM eBPF code, built standalone (docs/tracers.md).

It takes no flags, needs root and BTF (CO-RE only), prints USM's debug messages to trace_pipe
and stops on SIGINT/SIGTERM. It prints nothing when its probes are attached, so attachment is
read from the kernel: the BPF programs and links its process tree holds (`kit/bpf_attached.py`,
what `bpftool prog show` lists under its pid). USM loads many programs over a few seconds, so it
counts as attached once it holds some and the set has not changed for STABLE_SECONDS.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, NamedTuple

from usmlab.arch import AMD64, find_arch
from usmlab.errors import UsmlabError
from usmlab.targets.base import BackgroundProcess, Target
from usmlab.tracers import Tracer, TracerContext

DEFAULT_BINARY = "/git/datadog-agent/bin/usm-debugger"
BTF_PATH = "/sys/kernel/btf/vmlinux"
STABLE_SECONDS = 1.0
# bpf_attached.py's exit statuses: the process is gone; anything else but 0 is a real failure.
_GONE = 1
# Resolve a bare name on PATH, then: exit 3 when missing, 4 when not an executable file.
_CHECK_BINARY = r"""p=$1
case $p in */*) ;; *) p=$(command -v "$p") || exit 3 ;; esac
[ -e "$p" ] || exit 3
[ -f "$p" ] && [ -x "$p" ] || exit 4
printf '%s\n' "$p"
"""
# A line of the agent's logger: `2024-01-01 10:00:00 UTC | USM-DEBUGGER | DEBUG | (...) | msg`.
_LOGGER_LINE = re.compile(r"\|\s*(TRACE|DEBUG|INFO|WARN|ERROR|CRITICAL)\s*\|")
_GO_CRASH = re.compile(r"^(panic: |fatal error: )")


def build_arch(machine: str) -> str:
    """The `--arch` the build task wants for a target's `uname -m`."""
    arch = find_arch(machine)
    return arch.dda if arch else (machine or AMD64.dda)


def build_hint(machine: str) -> str:
    """How to get a usm-debugger binary for this target."""
    return (
        f"build it with `usmlab build` or, in datadog-agent, "
        f"`dda inv system-probe.build-usm-debugger --arch={build_arch(machine)}` "
        f"(or pass --usm-debugger PATH)"
    )


class BinaryStatus(NamedTuple):
    """Whether root can run the tracer's program: its path, else why not."""

    path: str | None
    problem: str | None = None
    missing: bool = False  # absent (build it), as opposed to present but unusable


def find_binary(target: Target, path: str, sudo: bool = True) -> BinaryStatus:
    """Checked as root by default: root runs it, and its folder may be closed to others."""
    found = target.run(["sh", "-c", _CHECK_BINARY, "sh", path], sudo=sudo, check=False)
    if found.exit_code == 3:
        where = f"not found at {path}" if "/" in path else f"{path!r} is not on PATH"
        return BinaryStatus(None, where, missing=True)
    if found.exit_code == 4:
        return BinaryStatus(None, f"{path} is not an executable file (chmod +x {path})")
    if not found.ok:
        tail = (found.stderr or found.stdout).strip().splitlines()
        return BinaryStatus(None, f"cannot check {path}: {tail[-1] if tail else 'failed'}")
    return BinaryStatus(found.stdout.strip() or path)


def check_binary(target: Target, path: str, machine: str = "") -> str:
    """The path to run; a one-line UsmlabError saying how to build it when it is missing."""
    status = find_binary(target, path)
    if status.path is None:
        hint = f": {build_hint(machine)}" if status.missing else ""
        raise UsmlabError(f"usm-debugger {status.problem} on the target{hint}")
    return status.path


def telling_line(log: str) -> str:
    """The line of a usm-debugger log that explains a failure.

    usm-debugger reports a fatal error by writing it to stderr without a newline and exiting
    255, so it is the last line and not a logger line; a Go crash starts with `panic:`.
    Otherwise the last ERROR-level line, else the last line.
    """
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    if not lines:
        return "no output (see tracer.log)"
    crash = [ln for ln in lines if _GO_CRASH.match(ln)]
    if crash:
        return crash[0]
    last = lines[-1]
    if not _LOGGER_LINE.search(last) and "RLIMIT_MEMLOCK" not in last:
        return last
    errors = [
        ln
        for ln in lines
        if re.search(r"\|\s*(ERROR|CRITICAL)\s*\||\bERROR\b", ln) and "RLIMIT_MEMLOCK" not in ln
    ]
    return errors[-1] if errors else last


class UsmDebuggerTracer(Tracer):
    name = "usm-debugger"

    def __init__(self) -> None:
        self.binary: str | None = None
        # What was attached, for the manifest: counts of programs/links by type, who holds them.
        self.attached_summary: dict[str, Any] = {}
        self._signature: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self._since = 0.0
        self._since_mono: float | None = None

    def start(self, target: Target, ctx: TracerContext) -> BackgroundProcess:
        path = ctx.binary or DEFAULT_BINARY
        if target.kind == "local" and "/" in path:
            path = os.path.abspath(path)  # the target runs it from another directory
        machine = str(ctx.facts.get("machine", ""))
        self.binary = check_binary(target, path, machine)
        btf = ctx.facts.get("btf")
        if btf is None:
            btf = target.run(["test", "-e", BTF_PATH], check=False).ok
        if not btf:
            raise UsmlabError(
                f"usm-debugger needs BTF and this kernel has none ({BTF_PATH} is missing): "
                "it is CO-RE only; use a kernel built with CONFIG_DEBUG_INFO_BTF"
            )
        log = target.join(ctx.run_dir, self.log_name)
        # sudo resets the environment: the tags go on the command line, so cleanup finds it.
        argv = ["env", *(f"{k}={v}" for k, v in ctx.env.items()), self.binary]
        return target.start(argv, name="tracer", stdout_path=log, sudo=True)

    def held(self, target: Target, ctx: TracerContext, pid: int) -> dict[str, Any] | None:
        """What the process tree of pid holds (bpf_attached.py's report), None once it is gone."""
        script = target.join(ctx.kit_dir, "bpf_attached.py")
        done = target.run(target.python(script, str(pid)), sudo=True, check=False)
        if done.exit_code == _GONE:
            return None
        if not done.ok:
            tail = (done.stderr or done.stdout).strip().splitlines()
            detail = tail[-1] if tail else f"exit status {done.exit_code}"
            raise UsmlabError(f"cannot read the BPF programs usm-debugger holds: {detail}")
        try:
            report: dict[str, Any] = json.loads(done.stdout)
        except ValueError:
            raise UsmlabError(
                f"bpf_attached.py printed no report: {done.stdout.strip()[:200]}"
            ) from None
        return report

    def attached(self, target: Target, ctx: TracerContext, proc: BackgroundProcess) -> bool:
        report = self.held(target, ctx, proc.pid)
        if report is None:
            return False
        now = time.monotonic()
        signature = (tuple(report["prog_ids"]), tuple(report["link_ids"]))
        if signature != self._signature:
            self._signature, self._since, self._since_mono = signature, now, report.get("mono")
            return False
        if not any(signature) or now - self._since < STABLE_SECONDS:
            return False
        self.attached_mono = self._since_mono
        self.attached_summary = {
            "binary": self.binary,
            "programs": report["programs"],
            "links": report["links"],
            "perf_events": report["perf_events"],
            "prog_types": report["prog_types"],
            "link_types": report["link_types"],
            "holders": report["holders"],
            "bpftool_programs": report["bpftool_programs"],
            "stable_seconds": round(now - self._since, 3),
        }
        return True

    def last_error(self, target: Target, ctx: TracerContext) -> str:
        log = target.run(["cat", "--", target.join(ctx.run_dir, self.log_name)], check=False)
        return telling_line(log.stdout)
