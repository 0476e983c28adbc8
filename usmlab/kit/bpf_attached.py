#!/usr/bin/env python3
"""Which BPF programs and links a process holds, read from /proc (runs as root on the target).

A tracer's probes are live while it holds their program and link file descriptors, so this is
what `bpftool prog show` lists under `pids NAME(PID)`, without needing bpftool: every fd of the
process and of its descendants (a tracer started through sudo or a wrapper has its BPF fds in a
child) whose /proc/PID/fdinfo has a `prog_id:` (a program) or a `link_id:` (a link, which also
names its program). Uprobes attached the older way show as perf_event fds, counted too. When
bpftool is installed its `prog show --json` pids are counted as a cross-check.

`bpf_attached.py PID` prints one JSON object for PID's process tree (exit 1 if PID is gone);
`bpf_attached.py --name NAME [--name NAME ...]` prints `{"mono": ..., "root": ..., "found": [...]}`
with one such object per running process whose comm is NAME (a match inside a matched tree is
folded into it); without root it still finds them, but BPF counts of other users' processes read
as zero, so `root` says whether the counts are complete. Read-only: it never signals anything.
"""

import json
import os
import shutil
import subprocess
import sys
import time

# enum bpf_prog_type of the kernel's uapi (include/uapi/linux/bpf.h), by value.
PROG_TYPES = (
    "unspec", "socket_filter", "kprobe", "sched_cls", "sched_act", "tracepoint", "xdp",
    "perf_event", "cgroup_skb", "cgroup_sock", "lwt_in", "lwt_out", "lwt_xmit", "sock_ops",
    "sk_skb", "cgroup_device", "sk_msg", "raw_tracepoint", "cgroup_sock_addr", "lwt_seg6local",
    "lirc_mode2", "sk_reuseport", "flow_dissector", "cgroup_sysctl", "raw_tracepoint_writable",
    "cgroup_sockopt", "tracing", "struct_ops", "ext", "lsm", "sk_lookup", "syscall", "netfilter",
)  # fmt: skip
EXIT_GONE = 1
EXIT_USAGE = 2
EXIT_NOT_ROOT = 4


def _stat(pid):
    """(comm, state, ppid) from /proc/PID/stat, or None when the process is gone."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            text = handle.read()
    except OSError:
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return comm, fields[0], int(fields[1])


def _all_processes():
    """{pid: (comm, state, ppid)} of every live process."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[1] != "Z":
                table[int(entry)] = stat
    return table


def process_tree(root, table):
    """root and all its descendants, root first."""
    children = {}
    for pid, (_comm, _state, ppid) in table.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        tree.append(pid)
        todo.extend(sorted(children.get(pid, [])))
    return tree


def parse_fdinfo(text):
    """The `key: value` pairs of one fdinfo file."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key and " " not in key:
            fields[key] = value.strip()
    return fields


def bpf_fds(pid):
    """Programs, links and perf_event count held by one process's fds."""
    programs, links, perf_events = [], [], 0
    fd_dir = "/proc/%d/fd" % pid
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return programs, links, perf_events
    for fd in fds:
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if not target.startswith("anon_inode:"):
            continue
        if "perf_event" in target:
            perf_events += 1
            continue
        if "bpf" not in target:
            continue
        try:
            with open("/proc/%d/fdinfo/%s" % (pid, fd)) as handle:
                info = parse_fdinfo(handle.read())
        except OSError:
            continue
        if "link_id" in info:
            links.append(
                {
                    "id": int(info["link_id"]),
                    "type": info.get("link_type", "unknown"),
                    "prog_id": int(info["prog_id"]) if info.get("prog_id", "").isdigit() else None,
                    "attach_type": info.get("attach_type"),
                    "pid": pid,
                }
            )
        elif "prog_id" in info:
            kind = info.get("prog_type", "")
            if kind.isdigit():
                kind = PROG_TYPES[int(kind)] if int(kind) < len(PROG_TYPES) else "type_" + kind
            programs.append(
                {
                    "id": int(info["prog_id"]),
                    "type": kind or "unknown",
                    "attach_type": info.get("attach_type"),
                    "pid": pid,
                }
            )
    return programs, links, perf_events


def bpftool_programs():
    """{prog id: [pids]} from `bpftool prog show --json`, or None without a usable bpftool."""
    if shutil.which("bpftool") is None:
        return None
    try:
        done = subprocess.run(
            ["bpftool", "prog", "show", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            universal_newlines=True,
            timeout=20,
        )
        listing = json.loads(done.stdout) if done.returncode == 0 else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    if not isinstance(listing, list):
        return None
    return {
        prog.get("id"): [p.get("pid") for p in prog.get("pids") or [] if isinstance(p, dict)]
        for prog in listing
        if isinstance(prog, dict)
    }


def _tally(items):
    counts = {}
    for item in items:
        counts[item["type"]] = counts.get(item["type"], 0) + 1
    return dict(sorted(counts.items()))


def holdings(root, table, bpftool):
    """What the process tree of root holds, as one JSON-ready object."""
    tree = process_tree(root, table)
    programs, links, perf_events = {}, {}, 0
    holders = []
    for pid in tree:
        progs, lnks, perfs = bpf_fds(pid)
        for prog in progs:
            programs.setdefault(prog["id"], prog)
        for link in lnks:
            links.setdefault(link["id"], link)
        perf_events += perfs
        if progs or lnks or perfs:
            holders.append({"pid": pid, "comm": table[pid][0]})
    summary = {
        "pid": root,
        "comm": table[root][0],
        "tree": tree,
        "holders": holders,
        "programs": len(programs),
        "links": len(links),
        "perf_events": perf_events,
        "prog_ids": sorted(programs),
        "link_ids": sorted(links),
        "prog_types": _tally(programs.values()),
        "link_types": _tally(links.values()),
        "bpftool_programs": None,
    }
    if bpftool is not None:
        wanted = set(tree)
        summary["bpftool_programs"] = sum(
            1 for pids in bpftool.values() if wanted.intersection(pids)
        )
    return summary


def by_pid(pid):
    table = _all_processes()
    if pid not in table:
        print("error: no process %d" % pid, file=sys.stderr)
        return EXIT_GONE
    report = holdings(pid, table, bpftool_programs())
    report["mono"] = time.monotonic()
    print(json.dumps(report))
    return 0


def by_name(names):
    table = _all_processes()
    me = os.getpid()
    matched = {pid for pid, (comm, _s, _p) in table.items() if comm in names and pid != me}
    roots = []
    for pid in sorted(matched):
        parent, inside = table[pid][2], False
        while parent in table and parent > 1:
            if parent in matched:
                inside = True
                break
            parent = table[parent][2]
        if not inside:
            roots.append(pid)
    bpftool = bpftool_programs() if roots else None
    found = []
    for pid in roots:
        report = holdings(pid, table, bpftool)
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as handle:
                argv = handle.read().split(b"\0")
            report["cmdline"] = " ".join(a.decode("utf-8", "replace") for a in argv if a)
        except OSError:
            report["cmdline"] = ""
        found.append(report)
    report = {"mono": time.monotonic(), "names": sorted(names), "root": os.geteuid() == 0}
    report["found"] = found
    print(json.dumps(report))
    return 0


def main(argv):
    usage = "usage: bpf_attached.py PID | --name NAME [--name NAME ...]"
    if len(argv) == 1 and argv[0].isdigit():
        if os.geteuid() != 0:
            print("error: bpf_attached.py needs root (other processes' fdinfo)", file=sys.stderr)
            return EXIT_NOT_ROOT
        return by_pid(int(argv[0]))
    if argv and len(argv) % 2 == 0 and all(a == "--name" for a in argv[::2]):
        return by_name({n[:15] for n in argv[1::2]})  # comm is at most 15 characters
    print(usage, file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
