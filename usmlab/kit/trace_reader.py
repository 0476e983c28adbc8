#!/usr/bin/env python3
"""The run's single trace_pipe reader (runs as root on the target).

Unlike `cat`, it drains what is still buffered when asked to stop, so the last lines a tracer
wrote before it detached are kept, and it says at once, with its own exit status, when another
reader already holds trace_pipe (EBUSY): only one may have it open (field notes §2).
"""

import argparse
import errno
import os
import select
import signal
import sys

EXIT_BUSY = 16
_stop = False


def _on_signal(signum, frame):
    global _stop
    _stop = True


def main(argv):
    parser = argparse.ArgumentParser(prog="trace_reader.py")
    parser.add_argument("trace_pipe")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        fd = os.open(args.trace_pipe, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.EBUSY:
            print(
                "error: %s is busy: another reader has it open (only one may)" % args.trace_pipe,
                file=sys.stderr,
            )
            return EXIT_BUSY
        print("error: cannot open %s: %s" % (args.trace_pipe, err.strerror), file=sys.stderr)
        return 1
    print("reading", flush=True)
    with open(args.out, "ab", buffering=0) as out:
        while True:
            if not _stop:
                select.select([fd], [], [], 0.2)
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                if _stop:
                    break  # drained: nothing left in the ring buffer
                continue
            if chunk:
                out.write(chunk)
            elif _stop:
                break
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
