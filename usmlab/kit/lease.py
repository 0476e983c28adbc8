#!/usr/bin/env python3
"""Stop a controller's remote processes when its SSH connection dies.

The SSH target runs this on its own channel (`python3 -c <source> LIST_FILE`), reads the line
`ready <pid> <LIST_FILE>` and keeps the channel open. Every process group the target starts is
appended to LIST_FILE as `<pgid> <start time of the group leader>`. On the stdin line `release`
the controller closed cleanly: exit and leave the processes alone. On EOF (connection lost,
controller killed) or SIGTERM, every listed group that still has live members gets SIGINT, then
SIGTERM, then SIGKILL, with short grace periods. Closing an SSH channel signals nothing on its
own, so without this a dropped connection leaves tracers and workloads running forever.

While it waits it also answers small requests, one JSON object per stdin line, one JSON line
back: `{"op": "poll", "procs": [[exit_file, pgid], ...]}` (each: the exit file's text, "running"
or "gone"), `{"op": "kill", "sig": N, "pgids": [...]}` and `{"op": "read", "path": P}`. A
command over SSH costs a session (tens of milliseconds); a teardown polls every 20 ms.

Standard library only, Python 3.8+.
"""

import contextlib
import json
import os
import signal
import sys
import time

ESCALATION = ((signal.SIGINT, 3.0), (signal.SIGTERM, 2.0), (signal.SIGKILL, 1.0))


class ConnectionLost(Exception):
    """Raised from the SIGTERM handler: behave as if the connection had dropped."""


def read_stat(pid):
    """(state, pgrp, start time) of a process, or None once it is gone."""
    try:
        with open("/proc/%s/stat" % pid) as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[2]), fields[19]


def live_groups():
    """Process group ids that still have a member that is not a zombie."""
    groups = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = read_stat(name)
            if stat is not None and stat[0] not in "ZXx":
                groups.add(stat[1])
    return groups


def owned_groups(list_path):
    """Listed groups that are still ours.

    A pid number is not reused while a group still uses it as its id, so a group without its
    leader is still ours; a leader with another start time is an unrelated new process.
    """
    try:
        with open(list_path) as handle:
            lines = handle.read().split("\n")
    except OSError:
        return []
    owned = []
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            continue
        pgid = int(parts[0])
        leader = read_stat(pgid)
        if leader is None or leader[2] == parts[1]:
            owned.append(pgid)
    return owned


def stop_groups(pgids, ladder=ESCALATION):
    """The target side's one stop ladder (kit/cleanup.py uses it too): signal every group with
    each step in turn, waiting up to the step's grace until no group has a live member left.

    It lives here because this file is sent with `python3 -c` before anything is deployed, so
    it must stand alone; deployed scripts import it from here.
    """
    for sig, grace in ladder:
        alive = live_groups().intersection(pgids)
        if not alive:
            return
        for pgid in alive:
            with contextlib.suppress(OSError):
                os.killpg(pgid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and live_groups().intersection(alive):
            time.sleep(0.05)


def remove(path):
    with contextlib.suppress(OSError):
        os.remove(path)


def _exit_status(exit_file):
    """The exit file's text, or None while it is not written."""
    try:
        with open(exit_file) as handle:
            return handle.read().strip()
    except OSError:
        return None


def poll(exit_file, pgid):
    """Like the SSH target's poll script: the exit status once written, else whether the
    group leader still runs (read again after a dead leader: it may have just written it)."""
    status = _exit_status(exit_file)
    if status is not None:
        return status
    leader = read_stat(pgid)
    if leader is not None and leader[0] not in "ZXx":
        return "running"
    status = _exit_status(exit_file)
    return "gone" if status is None else status


def serve(request):
    """The answer to one request line (see the module docstring)."""
    op = request.get("op")
    if op == "poll":
        return [poll(str(exit_file), int(pgid)) for exit_file, pgid in request["procs"]]
    if op == "kill":
        failed = []
        for pgid in request["pgids"]:
            try:
                os.killpg(int(pgid), int(request["sig"]))
            except OSError as err:
                failed.append([pgid, err.strerror])
        return {"failed": failed}
    if op == "read":
        try:
            with open(request["path"], "rb") as handle:
                return {"text": handle.read().decode("utf-8", "replace")}
        except OSError as err:
            return {"error": err.strerror or str(err)}
    return {"error": "unknown request"}


def on_sigterm(signum, frame):
    raise ConnectionLost()


def main(list_path):
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        sys.stdout.buffer.write(b"ready %d " % os.getpid() + os.fsencode(list_path) + b"\n")
        sys.stdout.flush()
        for line in iter(sys.stdin.buffer.readline, b""):
            if line.strip() == b"release":
                remove(list_path)
                return 0
            if line.startswith(b"{"):
                try:
                    answer = serve(json.loads(line.decode("utf-8", "replace")))
                except (ValueError, KeyError, TypeError) as err:
                    answer = {"error": "bad request: %s" % err}
                sys.stdout.write(json.dumps(answer) + "\n")
                sys.stdout.flush()
    except (ConnectionLost, KeyboardInterrupt, OSError):
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stop_groups(owned_groups(list_path))
    remove(list_path)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write("usage: lease.py LIST_FILE\n")
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
