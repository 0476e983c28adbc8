"""The built-in tracer: a bpftrace program with uprobes on the libssl the workloads map.

It makes the whole capture-and-verdict pipeline real on any machine with BPF, and is the
independent second opinion next to usm-debugger. The program is rendered with jinja2 for the
libraries found on the target and the SSL functions each one exports (bpftrace refuses to start
when a probed symbol is missing, and Python 3.11 uses the `_ex` family while curl uses the plain
one; see docs/tracers.md).
"""

from __future__ import annotations

import re
from pathlib import Path

from usmlab.errors import UsmlabError
from usmlab.targets.base import BackgroundProcess, Target
from usmlab.tracers import Tracer, TracerContext
from usmlab.tracers.bpftrace import (
    ATTACHED_MARK,
    LINE_MAX,
    STRLEN_ENV,
    render_template,
    with_end,
)
from usmlab.tracers.go_tls import check_go_binary, render_go_probes

SSL_FUNCTIONS = ("SSL_write", "SSL_write_ex", "SSL_read", "SSL_read_ex")
# Where an SSL object gets its socket: the fd whose socket each capture's tuple is read from.
SET_FD = "SSL_set_fd"
# Where USM deletes an SSL object's entry (the usm-model tracer models it).
SHUTDOWN = "SSL_shutdown"
PROGRAM_NAME = "tracer.bt"


def render_program(run_id: str, functions: dict[str, list[str]], line_max: int = LINE_MAX) -> str:
    """The bpftrace program for these libraries and the functions each exports."""
    return render_template(
        "builtin.bt.j2",
        run_id=run_id, libraries=sorted(functions), functions=functions, line_max=line_max,
    )  # fmt: skip


def exported_functions(
    target: Target, library: str, wanted: tuple[str, ...] = SSL_FUNCTIONS
) -> list[str]:
    """Which of the `wanted` SSL functions `library` exports, as bpftrace itself lists them."""
    listing = target.run(["bpftrace", "-l", f"uprobe:{library}:SSL_*"], sudo=True, check=False)
    names = set(re.findall(r":(SSL_\w+)\s*$", listing.stdout, flags=re.MULTILINE))
    return [f for f in wanted if f in names]


class BuiltinTracer(Tracer):
    name = "builtin"
    # Each probe hit prints at once; bpftrace's exit is ~0.1 s of kernel uprobe teardown per
    # probe (6.18, bpftrace 0.17), worth overlapping with the rest of the teardown.
    stops_early = True
    # Uprobes on the libssl file: a server started during the attach is traced too. Reading
    # the log is cheap (a file read, or the lease over SSH).
    traces_running_processes = True
    attach_poll_seconds = 0.02

    def start(self, target: Target, ctx: TracerContext) -> BackgroundProcess:
        libraries = ctx.facts.get("libssl") or []
        if not ctx.facts.get("bpftrace"):
            raise UsmlabError("bpftrace is not installed on the target (apt-get install bpftrace)")
        if not libraries:
            raise UsmlabError("no libssl found in the target's python3 process maps")
        known = ctx.facts.get("libssl_functions") or {}
        wanted = (*SSL_FUNCTIONS, SET_FD, SHUTDOWN)
        functions = {
            lib: [f for f in wanted if f in known[lib]]
            if isinstance(known.get(lib), list)
            else exported_functions(target, lib, wanted)  # not readable ELF
            for lib in libraries
        }
        functions = {
            lib: names for lib, names in functions.items() if set(names) - {SET_FD, SHUTDOWN}
        }
        if not functions:
            raise UsmlabError(f"none of {', '.join(SSL_FUNCTIONS)} found in {libraries[0]}")
        program = with_end(
            render_program(ctx.run_id, functions) + self.extra_probes(ctx, target, functions)
        )
        local_copy = Path(ctx.facts["local_run_dir"]) / PROGRAM_NAME
        local_copy.write_text(program)
        remote_program = target.join(ctx.run_dir, PROGRAM_NAME)
        target.put(local_copy, remote_program)
        log = target.join(ctx.run_dir, self.log_name)
        argv = [
            "env",
            *(f"{k}={v}" for k, v in ctx.env.items()),
            *(f"{k}={v}" for k, v in STRLEN_ENV.items()),
            "bpftrace",
            remote_program,
        ]
        return target.start(argv, name="tracer", stdout_path=log, sudo=True)

    def extra_probes(
        self, ctx: TracerContext, target: Target, functions: dict[str, list[str]]
    ) -> str:
        """Probes appended to the OpenSSL program: the run's Go binaries'."""
        if not ctx.go_binaries:
            return ""
        for binary in ctx.go_binaries:
            check_go_binary(target, binary)
        return render_go_probes(ctx.run_id, ctx.go_binaries, str(ctx.facts["machine"]))

    def attached(self, target: Target, ctx: TracerContext, proc: BackgroundProcess) -> bool:
        try:
            log = target.read_text(proc.stdout_path)
        except UsmlabError:  # not written yet
            return False
        match = re.search(ATTACHED_MARK + r"(?: (\d+))?", log)
        if match and match.group(1):
            # BEGIN runs once every probe is attached; nsecs is CLOCK_MONOTONIC in ns.
            self.attached_mono = int(match.group(1)) / 1e9
        return match is not None
