"""`usmlab doctor`: the manual lab's troubleshooting checklist, run on a target in one go.

Each check answers one question a user asks when no eBPF logs appear or TLS fails (is
usm-debugger running, are its probes attached, is trace_pipe readable, does the server listen
and answer TLS, ...) and, when it fails, carries the command a user would type by hand. Doctor
only looks: it never starts, stops or signals anything. A check is PASS (True), FAIL (False) or
SKIP (None: not applicable, or the question cannot be asked here); detail says what was seen.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from usmlab.kit import kit_files
from usmlab.scenarios import check_url
from usmlab.targets.base import Target
from usmlab.tracers.usm_debugger import DEFAULT_BINARY, build_hint, find_binary

PROCESS_NAME = "usm-debugger"
MIN_KERNEL = (4, 14)  # USM's minimum kernel
HANDSHAKE_TIMEOUT = 3.0


# Run as root on the target with the kit dir as argv[1]: where tracefs is, whether trace_pipe
# is busy and who holds it. Never reads trace_pipe (that would consume another reader's data).
@dataclass(frozen=True)
class Check:
    """One line of the doctor's table."""

    name: str
    ok: bool | None  # True PASS, False FAIL, None SKIP
    detail: str
    hint: str = ""


def run_doctor(
    target: Target,
    kit_dir: str | None = None,
    port: int = 8443,
    url: str | None = None,
    usm_debugger_path: str | None = None,
) -> list[Check]:
    """Every check, in the order a user would troubleshoot. Bad `url` raises UsageError."""
    host = "127.0.0.1"
    if url is not None:
        host, port = check_url(url)
    else:
        url = f"https://{host}:{port}"
    kit_dir = kit_dir or target.join(target.work_dir, "kit")
    target.sync(kit_files(), kit_dir)
    facts: dict[str, Any] = json.loads(
        target.run(target.python(target.join(kit_dir, "probe.py"), "info")).stdout
    )
    target.use_python(facts.get("python_executable"))
    root = _can_root(target, facts)
    checks = [
        _root_check(facts, root),
        _kernel_check(str(facts.get("kernel", ""))),
        _btf_check(facts),
        _bpftrace_check(facts),
        _binary_check(target, usm_debugger_path, str(facts.get("machine", "")), root),
    ]
    checks += _usm_debugger_checks(target, kit_dir, root, usm_debugger_path)
    checks.append(_trace_pipe_check(target, kit_dir, root))
    checks.append(_usm_maps_check(target, kit_dir, root))
    checks += _server_checks(target, kit_dir, host, port, url)
    return checks


def _usm_maps_check(target: Target, kit_dir: str, root: bool) -> Check:
    """Can a run read USM's tuple caches (bpftool, and the maps of a running USM)?"""
    name = "USM maps readable"
    hint = "apt-get install bpftool; sudo bpftool map show | grep -E 'conn_tup|pid_fd'"
    if not root:
        return Check(name, None, "skipped: reading BPF maps needs root", hint)
    script = target.join(kit_dir, "usm_maps.py")
    done = target.run(target.python(script, "find"), sudo=True, check=False)
    if done.exit_code == 0:
        roles = sorted({json.loads(line)["role"] for line in done.stdout.splitlines() if line})
        return Check(name, True, f"found {', '.join(roles)}")
    if done.exit_code == 3:
        return Check(
            name, None, "bpftool works, no USM map is loaded (start usm-debugger or system-probe)"
        )
    tail = (done.stderr or done.stdout).strip().splitlines()
    return Check(name, False, tail[-1] if tail else f"exit status {done.exit_code}", hint)


def failed(checks: list[Check]) -> bool:
    """True when any check failed (the CLI's exit status 1)."""
    return any(c.ok is False for c in checks)


def render_checks(checks: list[Check]) -> str:
    """A PASS/FAIL/SKIP table; a failed or skipped check's hint goes on the line below it."""
    width = max(len(c.name) for c in checks) if checks else 0
    lines = []
    for check in checks:
        status = {True: "PASS", False: "FAIL", None: "SKIP"}[check.ok]
        lines.append(f"{status}  {check.name:<{width}}  {check.detail}")
        if check.hint and check.ok is not True:
            lines.append(f"      {'':<{width}}  hint: {check.hint}")
    return "\n".join(lines)


# -- the machine -------------------------------------------------------------------------------


def _can_root(target: Target, facts: dict[str, Any]) -> bool:
    return facts.get("euid") == 0 or target.can_sudo()


def _root_check(facts: dict[str, Any], root: bool) -> Check:
    name = "root or passwordless sudo"
    if facts.get("euid") == 0:
        return Check(name, True, "running as root")
    if root:
        return Check(name, True, "passwordless sudo works")
    return Check(
        name,
        False,
        "not root and `sudo -n true` fails",
        "eBPF and trace_pipe need root: run as root or allow passwordless sudo (sudo -n true)",
    )


def kernel_version(release: str) -> tuple[int, int] | None:
    found = re.match(r"(\d+)\.(\d+)", release)
    return (int(found.group(1)), int(found.group(2))) if found else None


def _kernel_check(release: str) -> Check:
    name = "kernel version"
    version = kernel_version(release)
    if version is None:
        return Check(name, None, f"cannot read the version from {release!r}")
    if version < MIN_KERNEL:
        return Check(
            name,
            False,
            f"Linux {release}",
            f"USM needs Linux {MIN_KERNEL[0]}.{MIN_KERNEL[1]} or newer: use a newer kernel/VM",
        )
    return Check(name, True, f"Linux {release}")


def _btf_check(facts: dict[str, Any]) -> Check:
    name = "BTF present"
    if facts.get("btf"):
        return Check(name, True, "/sys/kernel/btf/vmlinux exists")
    return Check(
        name,
        False,
        "/sys/kernel/btf/vmlinux is missing",
        "usm-debugger is CO-RE only: use a kernel built with CONFIG_DEBUG_INFO_BTF "
        "(ls -l /sys/kernel/btf/vmlinux)",
    )


def _bpftrace_check(facts: dict[str, Any]) -> Check:
    name = "bpftrace present"
    if facts.get("bpftrace"):
        return Check(name, True, str(facts["bpftrace"]))
    return Check(
        name,
        False,
        "bpftrace is not installed",
        "the built-in tracer needs it: sudo apt-get install -y bpftrace",
    )


def _binary_check(target: Target, path: str | None, machine: str, root: bool) -> Check:
    name = "usm-debugger built"
    status = find_binary(target, path or DEFAULT_BINARY, sudo=root)
    if status.path is not None:
        return Check(name, True, status.path)
    hint = build_hint(machine) if status.missing else ""
    # Not asked for and not at the default place: only --tracer usm-debugger needs it.
    return Check(name, None if status.missing and not path else False, str(status.problem), hint)


# -- usm-debugger ------------------------------------------------------------------------------


def _usm_debugger_checks(target: Target, kit_dir: str, root: bool, path: str | None) -> list[Check]:
    names = [PROCESS_NAME]
    if path:
        names.append(path.rstrip("/").rsplit("/", 1)[-1])
    argv = target.python(target.join(kit_dir, "bpf_attached.py"))
    for name in dict.fromkeys(n[:15] for n in names):
        argv += ["--name", name]
    done = target.run(argv, sudo=root, check=False)
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        tail = (done.stderr or done.stdout).strip().splitlines()
        detail = tail[-1] if tail else f"exit status {done.exit_code}"
        return [
            Check("usm-debugger running", None, f"cannot scan processes: {detail}"),
            Check("probes attached", None, "skipped: no process scan"),
        ]
    found = report.get("found") or []
    if not found:
        running = Check(
            "usm-debugger running",
            False,
            f"no process named {' or '.join(report.get('names') or names)}",
            "ps aux | grep usm-debugger; start it with `sudo ./bin/usm-debugger` in datadog-agent, "
            "or let usmlab run it: usmlab test scenario1 --tracer usm-debugger",
        )
        return [running, _probes_without_process(target, root)]
    described = ", ".join(f"pid {p['pid']} ({p.get('cmdline') or p['comm']})" for p in found)
    running = Check("usm-debugger running", True, described)
    if not report.get("root"):
        return [running, Check("probes attached", None, "skipped: reading its fds needs root")]
    return [running, _probes_check(found)]


def _probes_check(found: list[dict[str, Any]]) -> Check:
    name = "probes attached"
    programs = sum(p["programs"] for p in found)
    links = sum(p["links"] for p in found)
    types: dict[str, int] = {}
    for proc in found:
        for kind, count in {**proc["prog_types"], **proc["link_types"]}.items():
            types[kind] = types.get(kind, 0) + count
    detail = f"{programs} BPF programs, {links} links held"
    if types:
        detail += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(types.items())) + ")"
    by_bpftool = [p["bpftool_programs"] for p in found if p.get("bpftool_programs") is not None]
    if by_bpftool:
        detail += f"; bpftool lists {sum(by_bpftool)} programs for it"
    if programs or links:
        return Check(name, True, detail)
    return Check(
        name,
        False,
        detail,
        "it runs but holds no BPF program: read its output for load errors; "
        "sudo bpftool prog list | grep usm",
    )


def _probes_without_process(target: Target, root: bool) -> Check:
    """No usm-debugger: another USM (system-probe) may still have programs loaded."""
    name = "probes attached"
    if not root:
        return Check(name, None, "skipped: usm-debugger is not running")
    listing = target.run(
        ["sh", "-c", "command -v bpftool >/dev/null && bpftool prog list"], sudo=True, check=False
    )
    if not listing.ok:
        return Check(name, None, "skipped: usm-debugger is not running")
    usm = [line for line in listing.stdout.splitlines() if "usm" in line.lower()]
    if usm:
        return Check(
            name, True, f"bpftool lists {len(usm)} lines mentioning usm (another USM process?)"
        )
    return Check(
        name,
        None,
        "skipped: usm-debugger is not running (bpftool lists no usm program)",
        "sudo bpftool prog list | grep usm",
    )


# -- trace_pipe --------------------------------------------------------------------------------


def _trace_pipe_check(target: Target, kit_dir: str, root: bool) -> Check:
    name = "trace_pipe readable"
    hint = "sudo cat /sys/kernel/tracing/trace_pipe"
    if not root:
        return Check(name, None, "skipped: reading trace_pipe needs root", hint)
    tracefs = target.join(kit_dir, "tracefs.py")
    done = target.run(target.python(tracefs, "status"), sudo=True, check=False)
    try:
        state: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        tail = (done.stderr or done.stdout).strip().splitlines()
        return Check(name, False, tail[-1] if tail else f"exit status {done.exit_code}", hint)
    if state["path"] is None:
        if state["mountable"]:
            return Check(name, True, "tracefs is not mounted; usmlab mounts it for a run")
        return Check(
            name,
            False,
            "no tracefs, and the kernel cannot mount one",
            "the kernel needs CONFIG_FTRACE; mount -t tracefs nodev /sys/kernel/tracing",
        )
    pipe = f"{state['path']}/trace_pipe"
    if state["busy"]:
        holders = ", ".join(state["holders"]) or "a process this user cannot see"
        return Check(
            name,
            False,
            f"{pipe} is busy: held by {holders} (only one reader may have it open)",
            f"stop that reader; sudo lsof {pipe}",
        )
    return Check(name, True, f"{pipe} is free to read")


# -- the server --------------------------------------------------------------------------------


def _server_checks(target: Target, kit_dir: str, host: str, port: int, url: str) -> list[Check]:
    """Listening, TLS and free port: one question seen from both sides. A manual lab wants a
    server on the port; `usmlab test` wants it free. Whichever holds passes, the other is SKIP
    with the remedy, so neither state shows as a failure of the machine."""
    probe_py = target.join(kit_dir, "probe.py")
    probe = target.run(target.python(probe_py, "port", str(port)), check=False)
    listening = f"server listening on port {port}"
    free = f"port {port} free"
    if probe.exit_code == 0:
        return [
            Check(
                listening,
                None,
                f"nothing listens on port {port} (start the server for a manual lab)",
                f"netstat -tulpn | grep {port}; ps -p <SERVER_PID>",
            ),
            Check("TLS handshake", None, f"skipped: nothing listens at {url}"),
            Check(free, True, "free for usmlab test's own server"),
        ]
    holder = probe.stdout.strip() or f"port {port} is in use"
    handshake = target.run(
        [*target.python(target.join(kit_dir, "client.py")), "--check", "-url", url,
         "--timeout", f"{HANDSHAKE_TIMEOUT:g}"],
        check=False,
        timeout=HANDSHAKE_TIMEOUT + 30,
    )  # fmt: skip
    if handshake.ok:
        tls = Check("TLS handshake", True, f"completed with {url}")
    else:
        tail = (handshake.stderr or handshake.stdout).strip().splitlines()
        tls = Check(
            "TLS handshake",
            False,
            tail[-1] if tail else f"exit status {handshake.exit_code}",
            f"the server accepts TCP but not TLS: check its certificate and key; "
            f"openssl s_client -connect {_host_port(host, port)} </dev/null",
        )
    return [
        Check(listening, True, holder),
        tls,
        Check(
            free,
            None,
            f"{holder}: usmlab test starts its own server there",
            f"sudo lsof -i :{port}; stop that process, or pass --url with another port",
        ),
    ]


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
