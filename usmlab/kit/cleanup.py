#!/usr/bin/env python3
"""End the leftovers of crashed runs, and only those.

Every process usmlab starts carries USMLAB_RUN_ID in its environment, and every live run keeps a
marker `<work_dir>/active/<run_id>` (JSON: pid, run_dir) naming the process whose life is the
run's life (the local controller, or the SSH lease), written before the run starts anything and
removed when it ends cleanly. A process of a run whose marker names a dead lifeline is a
leftover: its process group gets SIGTERM, then SIGKILL (lease.stop_groups). Processes of runs
without a marker here (another work dir's) and processes without the variable are never touched.
tracefs settings and NAT rules a crashed run left are undone from the state files it wrote.
"""

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys

if __package__:  # imported on the controller as usmlab.kit.cleanup
    from .labkit import pid_alive
    from .lease import stop_groups
else:  # run on the target, where labkit.py is deployed beside this script
    from labkit import pid_alive
    from lease import stop_groups

# Crash-like: SIGTERM, then SIGKILL.
CRASH_LADDER = ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0))


def run_id_of(pid):
    try:
        with open("/proc/%s/environ" % pid, "rb") as handle:
            for item in handle.read().split(b"\0"):
                if item.startswith(b"USMLAB_RUN_ID="):
                    return item.split(b"=", 1)[1].decode("utf-8", "replace")
    except OSError:
        pass
    return None


def read_markers(work_dir):
    """run_id -> (pid, run_dir, live) for every run marker."""
    markers = {}
    folder = os.path.join(work_dir, "active")
    try:
        names = os.listdir(folder)
    except OSError:
        return markers
    for name in names:
        try:
            with open(os.path.join(folder, name)) as handle:
                data = json.load(handle)
            pid = int(data["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            markers[name] = (None, None, False)
            continue
        markers[name] = (pid, data.get("run_dir"), pid_alive(pid))
    return markers


def leftovers(dead_runs):
    """(run_id, pid, pgid) of processes belonging to the given dead runs."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        run_id = run_id_of(entry)
        if run_id is None or run_id not in dead_runs:
            continue
        try:
            found.append((run_id, int(entry), os.getpgid(int(entry))))
        except ProcessLookupError:
            continue
    return found


def main(argv):
    parser = argparse.ArgumentParser(prog="cleanup.py")
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--run-id", help="only this run's leftovers")
    parser.add_argument(
        "--ending", action="store_true", help="the run --run-id is ending: its marker is dead"
    )
    args = parser.parse_args(argv)
    markers = read_markers(args.work_dir)
    if args.ending and args.run_id:
        pid, run_dir, _ = markers.get(args.run_id, (None, None, False))
        markers[args.run_id] = (pid, run_dir, False)
    # Only runs of this work dir whose lifeline died: another work dir's runs, or processes
    # with no marker at all, are not ours to end.
    dead = {
        run_id
        for run_id, (_, _, is_live) in markers.items()
        if not is_live and (not args.run_id or run_id == args.run_id)
    }
    found = leftovers(dead)
    stop_groups({pgid for _, _, pgid in found}, CRASH_LADDER)

    for run_id, pid, pgid in found:
        print(json.dumps({"run_id": run_id, "pid": pid, "pgid": pgid}))
    here = os.path.dirname(os.path.abspath(__file__))
    for run_id, (_, run_dir, is_live) in markers.items():
        if is_live or (args.run_id and run_id != args.run_id):
            continue
        state = os.path.join(run_dir or "", ".tracefs-state.json")
        if run_dir and os.path.exists(state):
            tracefs = os.path.join(here, "tracefs.py")
            subprocess.run([sys.executable, tracefs, "restore", "--state", state])
            print(json.dumps({"run_id": run_id, "tracefs": "restored"}))
        nat_state = os.path.join(run_dir or "", ".nat-state.json")
        if run_dir and os.path.exists(nat_state):
            nat = os.path.join(here, "nat.py")
            subprocess.run(
                [sys.executable, nat, "remove", "--state", nat_state], stdout=subprocess.DEVNULL
            )
            print(json.dumps({"run_id": run_id, "nat": "removed"}))
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(args.work_dir, "active", run_id))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
