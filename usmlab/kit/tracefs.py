#!/usr/bin/env python3
"""Prepare tracefs for one run and put it back afterwards (runs as root on the target).

`prepare --state FILE [--buffer-kb N] [--clock mono]` finds tracefs (mounting it when missing),
records the settings it changes in FILE, enlarges the per-CPU buffer so bursts are not lost, sets
trace_clock to `mono` so trace timestamps share the workloads' time.monotonic() clock, and empties
the buffer so old lines do not leak into this run. It prints the state as JSON.
`restore --state FILE` undoes exactly what prepare changed.
"""

import argparse
import contextlib
import errno
import json
import os
import subprocess
import sys

CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def _read(path):
    with open(path) as handle:
        return handle.read().strip()


def _write(path, value):
    with open(path, "w") as handle:
        handle.write(value)


def find_tracefs():
    for path in CANDIDATES:
        if os.path.exists(os.path.join(path, "trace_pipe")):
            return path, False
    for path in CANDIDATES:
        if os.path.isdir(path):
            done = subprocess.run(
                ["mount", "-t", "tracefs", "nodev", path],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                universal_newlines=True,
            )
            if done.returncode == 0 and os.path.exists(os.path.join(path, "trace_pipe")):
                return path, True
    return None, False


def current_clock(path):
    """The selected clock is the bracketed word in trace_clock."""
    for word in _read(os.path.join(path, "trace_clock")).split():
        if word.startswith("["):
            return word.strip("[]")
    return None


def trace_pipe_busy(path):
    """True when another reader holds trace_pipe (only one may have it open)."""
    try:
        fd = os.open(os.path.join(path, "trace_pipe"), os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.EBUSY:
            return True
        raise
    os.close(fd)
    return False


def prepare(state_file, buffer_kb, clock):
    if os.geteuid() != 0:
        print("error: tracefs setup needs root", file=sys.stderr)
        return 4
    path, mounted = find_tracefs()
    if path is None:
        print("error: tracefs is not available and could not be mounted", file=sys.stderr)
        return 5
    if trace_pipe_busy(path):
        print(
            "error: %s/trace_pipe is busy: another reader has it open (only one may)" % path,
            file=sys.stderr,
        )
        return 16
    state = {
        "path": path,
        "trace_pipe": os.path.join(path, "trace_pipe"),
        "mounted": mounted,
        "buffer_size_kb": _read(os.path.join(path, "buffer_size_kb")).split()[0],
        "trace_clock": current_clock(path),
    }
    with open(state_file, "w") as handle:
        json.dump(state, handle)
    if buffer_kb and int(state["buffer_size_kb"]) < buffer_kb:
        _write(os.path.join(path, "buffer_size_kb"), str(buffer_kb))
    emptied = False
    if clock and state["trace_clock"] != clock:
        # An old kernel may lack this clock: the manifest records the clock in use.
        with contextlib.suppress(OSError):
            _write(os.path.join(path, "trace_clock"), clock)
            emptied = True  # a new clock resets the buffer (each tracefs write costs ~20 ms)
    if not emptied:
        _write(os.path.join(path, "trace"), "")
    state["clock_in_use"] = current_clock(path)
    state["buffer_in_use_kb"] = _read(os.path.join(path, "buffer_size_kb")).split()[0]
    print(json.dumps(state))
    return 0


def restore(state_file, unmount=True):
    """Put back what prepare() changed. `unmount=False` leaves a tracefs the run mounted in
    place (a tracer may still be detaching its probes through it) and keeps a state file that
    says only that, for a later restore to unmount."""
    try:
        with open(state_file) as handle:
            state = json.load(handle)
    except (OSError, ValueError):
        return 0  # nothing was changed
    path = state["path"]
    problems = []
    for name, value in (
        ("buffer_size_kb", state["buffer_size_kb"]),
        ("trace_clock", state["trace_clock"]),
    ):
        if value:
            try:
                _write(os.path.join(path, name), str(value))
            except OSError as err:
                problems.append("%s: %s" % (name, err))
    if state.get("mounted") and not unmount:
        pending = {"path": path, "mounted": True, "buffer_size_kb": "", "trace_clock": ""}
        with open(state_file, "w") as handle:
            json.dump(pending, handle)
    else:
        if state.get("mounted"):
            subprocess.run(["umount", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.unlink(state_file)
    if problems:
        print("error: could not restore " + "; ".join(problems), file=sys.stderr)
        return 1
    return 0


def status():
    """Where trace_pipe is, whether a reader holds it (and who), whether tracefs can be mounted;
    one JSON line, for `usmlab doctor`."""
    path = next((p for p in CANDIDATES if os.path.exists(os.path.join(p, "trace_pipe"))), None)
    out = {"path": path, "busy": False, "holders": [], "mountable": False}
    if path is None:
        with open("/proc/filesystems") as handle:
            out["mountable"] = any(line.split()[-1:] == ["tracefs"] for line in handle)
    else:
        out["busy"] = trace_pipe_busy(path)
    if out["busy"]:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                fds = os.listdir("/proc/%s/fd" % pid)
                if any(
                    os.readlink("/proc/%s/fd/%s" % (pid, fd)).endswith("/trace_pipe") for fd in fds
                ):
                    with open("/proc/%s/comm" % pid) as comm:
                        out["holders"].append("%s (%s)" % (pid, comm.read().strip()))
            except OSError:
                continue
    print(json.dumps(out))
    return 0


def main(argv):
    parser = argparse.ArgumentParser(prog="tracefs.py")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare")
    prep.add_argument("--state", required=True)
    prep.add_argument("--buffer-kb", type=int, default=0)
    prep.add_argument("--clock", default="mono")
    rest = sub.add_parser("restore")
    rest.add_argument("--state", required=True)
    sub.add_parser("status")
    args = parser.parse_args(argv)
    if args.command == "status":
        return status()
    if args.command == "prepare":
        return prepare(args.state, args.buffer_kb, args.clock)
    return restore(args.state)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
