#!/usr/bin/env python3
"""The run's single trace_pipe reader (runs as root on the target).

Unlike `cat`, it drains what is still buffered when asked to stop, so the last lines a tracer
wrote before it detached are kept, and it says at once, with its own exit status, when another
reader already holds trace_pipe (EBUSY): only one may have it open (docs/trace_pipe.md).

With `--prepare STATE` it first prepares tracefs (tracefs.py: buffer, clock, emptied; the state
as one JSON line on stdout) and puts it back when it ends, drained or interrupted: one process
start instead of three, which over SSH is a round trip and an interpreter start each. Exit
status 0 means tracefs is restored too.
"""

import argparse
import errno
import json
import os
import select
import signal
import sys

if __package__:  # imported on the controller as usmlab.kit.trace_reader
    from . import labkit
else:  # run on the target, where labkit.py is deployed beside this script
    import labkit

EXIT_BUSY = 16
STOP = labkit.StopFlag()  # SIGINT/SIGTERM: finish the step in progress, then end


def main(argv):
    parser = argparse.ArgumentParser(prog="trace_reader.py")
    parser.add_argument("trace_pipe", nargs="?", help="default: the prepared tracefs's")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prepare", metavar="STATE", help="prepare tracefs, restore it at exit")
    parser.add_argument("--buffer-kb", type=int, default=0)
    parser.add_argument("--clock", default="mono")
    args = parser.parse_args(argv)
    STOP.install()
    if not args.prepare:
        if not args.trace_pipe:
            parser.error("give trace_pipe or --prepare")
        return read(args.trace_pipe, args.out)
    import tracefs  # the kit's sibling module

    sys.stdout.flush()
    code = tracefs.prepare(args.prepare, args.buffer_kb, args.clock)
    sys.stdout.flush()
    if code != 0:
        return code
    try:
        with open(args.prepare) as handle:
            trace_pipe = json.load(handle)["trace_pipe"]
        code = read(args.trace_pipe or trace_pipe, args.out)
    finally:
        # The tracer may still be detaching through tracefs: the mount stays until the
        # controller has seen it exit (run/trace_reader.py).
        restored = tracefs.restore(args.prepare, unmount=False)
    if restored == 0:
        print("restored", flush=True)
    return code or restored


def read(trace_pipe, out_path):
    """Copy trace_pipe to out_path until asked to stop, then drain what is left."""
    try:
        fd = os.open(trace_pipe, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.EBUSY:
            print(
                "error: %s is busy: another reader has it open (only one may)" % trace_pipe,
                file=sys.stderr,
            )
            return EXIT_BUSY
        print("error: cannot open %s: %s" % (trace_pipe, err.strerror), file=sys.stderr)
        return 1
    # A signal wakes the select at once through this pipe (select itself resumes after a
    # handler returns, PEP 475, and would sleep out its timeout before the drain).
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    print("reading", flush=True)
    with open(out_path, "ab", buffering=0) as out:
        while True:
            if not STOP.set:
                select.select([fd, wake_r], [], [], 0.2)
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                if STOP.set:
                    break  # drained: nothing left in the ring buffer
                continue
            if chunk:
                out.write(chunk)
            elif STOP.set:
                break
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
