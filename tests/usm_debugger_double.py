#!/usr/bin/env python3
"""usm-debugger TEST DOUBLE: a stand-in for Datadog's usm-debugger, for usmlab's tests only.

It is NOT the real tracer and says so in every line it prints. It behaves like the real one
where usmlab depends on it (docs/tracers.md, docs/trace_pipe.md): no flags, needs root, holds
real BPF programs (a bpftrace child with uprobes on the libssl Python maps), prints USM's
pathless debug messages (`http_process: type=%d method=%d`, `http event enqueued: cpu: %d
batch_idx: %d len: %d`) to trace_pipe for every TLS write that starts like HTTP, in the writing
process's thread, runs until SIGINT/SIGTERM (then exits 0), shows as `usm-debugger` in comm, and
on an error prints it to stderr without a newline and exits 255. It writes USM-format lines into
trace_marker when it starts and a last line when it stops, so a test can see that the trace was
still read after the tracer stopped.

Set USMLAB_DOUBLE_FAIL="message" to make it fail at start like the real one does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

BANNER = "usm-debugger TEST DOUBLE (not the real tracer)"
USAGE = (
    "usage: usm_debugger_double.py  (usm-debugger TEST DOUBLE, not the real tracer: no flags;\n"
    "run as root; stops on SIGINT/SIGTERM; USMLAB_DOUBLE_FAIL=MESSAGE makes it fail at start)"
)
TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
PROGRAM = """\
// usm-debugger TEST DOUBLE program (not the real tracer)
{probes}
{{
  $b = (uint8 *)arg1;
  $c0 = *$b;
  $c1 = *($b + 1);
  if ((int64)arg2 > 3 && (($c0 == 71 && $c1 == 69) || ($c0 == 72 && $c1 == 84))) {{
    $method = $c0 == 71 ? 1 : 0;
    debugf("http_process: type=%d method=%d", $c0 == 71 ? 1 : 2, $method);
    debugf("http event enqueued: cpu: %d batch_idx: %d len: %d", cpu, @batch[cpu], 1);
    @batch[cpu] = @batch[cpu] + 1;
  }}
}}

BEGIN
{{
  printf("probes attached\\n");
}}

END
{{
  clear(@batch);
}}
"""


def fail(message: str) -> int:
    """The real usm-debugger's checkError: the error on stderr, no newline, exit status 255."""
    sys.stdout.flush()
    sys.stderr.write(message)
    sys.stderr.flush()
    return 255


def say(message: str) -> None:
    print(f"usm-debugger TEST DOUBLE: {message}", flush=True)


def libssl_paths() -> list[str]:
    """The libssl files Python maps once `ssl` is imported (what the lab's workloads use)."""
    import ssl  # noqa: F401 - loads libssl so /proc/self/maps shows it

    found: list[str] = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(None, 5)
            if len(parts) == 6 and re.search(r"/libssl[^/]*\.so", parts[5]):
                path = parts[5].strip()
                if path not in found:
                    found.append(path)
    return found


def mark(lines: list[str]) -> None:
    """Write lines into trace_marker (they show as `tracing_mark_write:` in trace_pipe)."""
    for base in TRACEFS:
        path = os.path.join(base, "trace_marker")
        if os.path.exists(path):
            for line in lines:
                with open(path, "w") as marker:
                    marker.write(line + "\n")
            return


def take_real_name() -> None:
    """Show as `usm-debugger` in comm, as the real binary does (ps, doctor's scan, trace lines);
    the shebang made this process `python3`. Its cmdline still names the double."""
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write("usm-debugger")
    except OSError:
        pass


def main(argv: list[str]) -> int:
    print(BANNER, flush=True)
    take_real_name()
    if argv in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if argv:
        print(USAGE, file=sys.stderr)
        return 2
    message = os.environ.get("USMLAB_DOUBLE_FAIL")
    if message:
        return fail(message)
    if os.geteuid() != 0:
        return fail("usm-debugger TEST DOUBLE: needs root (it loads BPF programs)")
    bpftrace = shutil.which("bpftrace")
    if bpftrace is None:
        return fail("usm-debugger TEST DOUBLE: bpftrace is not installed")
    libraries = libssl_paths()
    if not libraries:
        return fail("usm-debugger TEST DOUBLE: no libssl in python3's maps")
    probes = ",\n".join(f"uprobe:{lib}:SSL_write*" for lib in libraries)
    with tempfile.NamedTemporaryFile(
        "w", prefix="usm-debugger-double-", suffix=".bt", delete=False
    ) as handle:
        handle.write(PROGRAM.format(probes=probes))
        program = handle.name

    stopping: list[int] = []
    children: list[subprocess.Popen[str]] = []

    def on_signal(signum: int, frame: object) -> None:
        stopping.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGINT)  # bpftrace obeys SIGINT (docs/tracers.md)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    mark(
        [
            f"usm-debugger TEST DOUBLE (pid {os.getpid()}): starting",
            "http batch flushed: cpu: 0 idx: 0",
            "http2 batch flushed: cpu: 0 idx: 0",
        ]
    )
    say(f"loading BPF programs for {', '.join(libraries)}")
    maps = None
    config = os.environ.get("USMLAB_DOUBLE_MAPS")
    if config:  # USM's tuple caches too (usm_maps_double.py), held by this process
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from usm_maps_double import MapsDouble

        settings = json.loads(config)
        maps = MapsDouble(
            Path(settings["watch"]), conn_every=settings.get("conn_every", 0),
            fd_every=settings.get("fd_every", 0),
        ).start()  # fmt: skip
        say(f"USM maps created; planted stale entries go to {maps.planted}")
        with open(settings["planted_at"], "w") as note:
            note.write(str(maps.planted))
    try:
        child = subprocess.Popen(
            [bpftrace, program],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        children.append(child)
        if stopping:  # signalled while starting it
            child.send_signal(signal.SIGINT)
        assert child.stdout is not None
        for line in child.stdout:  # bpftrace's own lines, labelled as the double's
            if line.strip():
                say(f"bpftrace: {line.rstrip()}")
        code = child.wait()
    finally:
        os.unlink(program)
        if maps is not None:
            maps.stop()
    if not stopping:
        return fail(f"usm-debugger TEST DOUBLE: its bpftrace exited with status {code}")
    name = signal.Signals(stopping[0]).name
    mark([f"usm-debugger TEST DOUBLE (pid {os.getpid()}): stopped on {name}"])
    say(f"stopped on {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
