#!/usr/bin/env python3
"""Record every thread of the run's processes, so trace_pipe's `comm-TID` headers resolve to a pid.

trace_pipe names threads, not processes, and prints `<...>` for names the kernel forgot. Every
process usmlab starts carries USMLAB_RUN_ID, USMLAB_NAME and USMLAB_ROLE in its environment; this
sampler scans /proc for them every interval (so respawned processes are found too) and appends one
JSON line per (pid, tid) the first time it is seen. It stops on SIGINT/SIGTERM after a last scan.
"""

import argparse
import json
import os
import signal
import sys
import time

_stop = False


def _on_signal(signum, frame):
    global _stop
    _stop = True


def run_tags(pid, run_id):
    """(name, role) when the process belongs to this run, else None."""
    try:
        with open("/proc/%s/environ" % pid, "rb") as handle:
            environ = handle.read().split(b"\0")
    except OSError:
        return None
    tags = {}
    for item in environ:
        key, _, value = item.partition(b"=")
        if key in (b"USMLAB_RUN_ID", b"USMLAB_NAME", b"USMLAB_ROLE"):
            tags[key] = value.decode("utf-8", "replace")
    if tags.get(b"USMLAB_RUN_ID") != run_id:
        return None
    return tags.get(b"USMLAB_NAME", "unknown"), tags.get(b"USMLAB_ROLE", "unknown")


def comm_of(pid, tid):
    try:
        with open("/proc/%s/task/%s/comm" % (pid, tid)) as handle:
            return handle.read().strip()
    except OSError:
        return None


def scan(run_id, seen, known, out):
    """One pass over /proc; `known` caches pid -> tags so environ is read once per process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        if entry not in known:
            known[entry] = run_tags(entry, run_id)
        tags = known[entry]
        if tags is None:
            continue
        try:
            tids = os.listdir("/proc/%s/task" % entry)
        except OSError:
            continue
        for tid in tids:
            key = (entry, tid)
            if key in seen:
                continue
            seen.add(key)
            record = {
                "mono": round(time.monotonic(), 6),
                "name": tags[0],
                "role": tags[1],
                "pid": int(entry),
                "tid": int(tid),
                "comm": comm_of(entry, tid),
            }
            out.write(json.dumps(record) + "\n")
    out.flush()


def main(argv):
    parser = argparse.ArgumentParser(prog="thread_sampler.py")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--interval", type=float, default=0.1)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    seen = set()
    known = {}
    with open(args.out, "a") as out:
        while not _stop:
            scan(args.run_id, seen, known, out)
            # Forget pids that are gone so a recycled pid is read afresh.
            for pid in [p for p in known if not os.path.exists("/proc/" + p)]:
                del known[pid]
            time.sleep(args.interval)
        scan(args.run_id, seen, known, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
