#!/usr/bin/env python3
"""Read USM's connection-tuple caches from the kernel while the real tracer runs.

Its controller half: usmlab/run/stages.py `_start_usm_maps`, judged in analysis/usm_maps.py;
the layouts: docs/usm-maps.md. Standard library plus `bpftool`, Python 3.8+.

    usm_maps.py find [--pids P,P]
        one JSON line per USM map found: {"id", "name", "role", "key_size", "value_size"};
        with --pids, only the maps those processes hold (their fds), else every map on the
        machine; exit 3 when none is found.
    usm_maps.py dump --out FILE [--every MS] [--pids P,P]
        until SIGTERM/SIGINT: every MS milliseconds, every map once (one bpftool process a
        round), one JSON line per map: {"mono", "map", "id", "entries": [decoded entries]}.

Kernel map names are cut to 15 characters: maps are found by that prefix AND by their key and
value sizes, so another program's map of the same name is not taken for USM's.
"""

import json
import os
import socket
import struct
import subprocess
import sys
import time

if __package__:  # imported on the controller as usmlab.kit.usm_maps
    from . import labkit
else:  # run on the target, where labkit.py is deployed beside this script
    import labkit

CONN_TUPLE = 48  # conn_tuple_t: 4 x u64 addresses, u16 sport, u16 dport, u32 netns, pid, metadata
PID_FD = 8  # pid_fd_t: u32 pid, u32 fd
# role: (kernel name prefix, key sizes, value sizes)
MAPS = {
    "conn_tup_by_go_tls_conn": ("conn_tup_by_go_", (8, 16), (CONN_TUPLE,)),
    "tuple_by_pid_fd": ("tuple_by_pid_fd", (PID_FD,), (CONN_TUPLE,)),
    "pid_fd_by_tuple": ("pid_fd_by_tuple", (CONN_TUPLE,), (PID_FD,)),
    "go_tls_conn_by_tuple": ("go_tls_conn_by_", (CONN_TUPLE,), (8, 16)),
}
EXIT_NONE_FOUND = 3
STOP = labkit.StopFlag()


def decode_tuple(raw):
    """conn_tuple_t from its 48 bytes (little-endian host): addresses, ports, netns, pid, and
    the metadata bits (1: TCP, 2: IPv6)."""
    saddr_h, saddr_l, daddr_h, daddr_l, sport, dport, netns, pid, meta = struct.unpack(
        "<QQQQHHIII", raw
    )
    if meta & 2:
        saddr = socket.inet_ntop(socket.AF_INET6, struct.pack("<QQ", saddr_h, saddr_l))
        daddr = socket.inet_ntop(socket.AF_INET6, struct.pack("<QQ", daddr_h, daddr_l))
    else:
        saddr = socket.inet_ntoa(struct.pack("<I", saddr_l & 0xFFFFFFFF))
        daddr = socket.inet_ntoa(struct.pack("<I", daddr_l & 0xFFFFFFFF))
    return {"saddr": saddr, "sport": sport, "daddr": daddr, "dport": dport, "netns": netns,
            "pid": pid, "tcp": bool(meta & 1), "v6": bool(meta & 2)}  # fmt: skip


def decode(raw):
    """Any key or value of the USM maps, by its size."""
    if len(raw) == CONN_TUPLE:
        return decode_tuple(raw)
    if len(raw) == PID_FD:
        pid, fd = struct.unpack("<II", raw)
        return {"pid": pid, "fd": fd, "ptr": "0x%x" % struct.unpack("<Q", raw)[0]}
    if len(raw) == 16:
        conn, netfd = struct.unpack("<QQ", raw)
        return {"ptr": "0x%x" % conn, "netfd": "0x%x" % netfd}
    return {"hex": raw.hex()}


def role_of(info):
    for role, (prefix, keys, values) in MAPS.items():
        if (
            info.get("name") == prefix
            and info.get("bytes_key") in keys
            and info.get("bytes_value") in values
        ):
            return role
    return None


def held_map_ids(pids):
    """ids of the BPF maps the processes hold open (fdinfo's map_id)."""
    ids = set()
    for pid in pids:
        folder = "/proc/%d/fdinfo" % pid
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            try:
                with open(os.path.join(folder, name)) as handle:
                    for line in handle:
                        if line.startswith("map_id:"):
                            ids.add(int(line.split()[1]))
            except (OSError, ValueError):
                continue
    return ids


def bpftool(*args, stdin=None):
    done = subprocess.run(["bpftool", "-j", *args], input=stdin, capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(done.stderr.strip() or "bpftool %s failed" % " ".join(args))
    return json.loads(done.stdout or "null")


def find(pids):
    listing = bpftool("map", "show") or []
    held = held_map_ids(pids) if pids else None
    found = []
    for info in listing:
        role = role_of(info)
        if role is None or (held is not None and info.get("id") not in held):
            continue
        found.append({
            "id": info["id"], "name": info["name"], "role": role,
            "key_size": info["bytes_key"], "value_size": info["bytes_value"],
        })  # fmt: skip
    return found


def entry_bytes(items):
    return bytes(int(x, 16) for x in items)


def dump_round(maps, out):
    """Every map once, through one bpftool process; one line per map."""
    script = "".join("map dump id %d\n" % m["id"] for m in maps)
    mono = time.monotonic()
    results = bpftool("batch", "file", "-", stdin=script) or []
    for index, info in enumerate(maps):
        result = results[index] if index < len(results) else {}
        entries = []
        for item in result.get("output") or []:
            if "key" in item and "value" in item:
                entries.append({"key": decode(entry_bytes(item["key"])),
                                "value": decode(entry_bytes(item["value"]))})  # fmt: skip
        line = {"mono": mono, "map": info["role"], "id": info["id"], "entries": entries}
        out.write(json.dumps(line) + "\n")
    out.flush()


LOOK_AGAIN_S = 10.0  # after the first map is found, how long others are looked for


def joined(maps, pids):
    """Maps of roles not yet dumped that exist now (said when they join)."""
    have = {m["role"] for m in maps}
    try:
        new = [m for m in find(pids) if m["role"] not in have]
    except (OSError, ValueError):
        return []
    for role in sorted({m["role"] for m in new}):
        print("dumping %s too" % role, flush=True)
    return new


def main(argv):
    parser = labkit.OneLineArgumentParser(prog="usm_maps.py")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("find", "dump"):
        command = sub.add_parser(name)
        command.add_argument("--pids", default="", help="only the maps these processes hold")
        if name == "dump":
            command.add_argument("--out", required=True)
            command.add_argument("--every", type=int, default=50, help="milliseconds")
    args = parser.parse_args(argv)
    pids = [int(p) for p in args.pids.split(",") if p.strip().isdigit()]
    try:
        maps = find(pids)
    except (OSError, ValueError) as exc:
        print("error: cannot list BPF maps: %s" % labkit.one_line(exc), file=sys.stderr)
        return 1
    if args.command == "find":
        for info in maps:
            print(json.dumps(info))
        return 0 if maps else EXIT_NONE_FOUND
    STOP.install()
    if not maps:
        # The tracer creates its maps while it loads, after this starts: look until it has.
        print("waiting for USM's maps (%s)" % ", ".join(MAPS), flush=True)
    while not maps and not STOP.set:
        time.sleep(args.every / 1000.0)
        try:
            maps = find(pids)
        except (OSError, ValueError):
            continue
    if not maps:
        print("error: no USM map found (%s)" % ", ".join(MAPS), file=sys.stderr)
        return EXIT_NONE_FOUND
    print("dumping %s every %d ms" % (", ".join(m["role"] for m in maps), args.every), flush=True)
    rounds = 0
    # A tracer creates its maps one after another: the others may come after the first was
    # found. Look again once a second, for a while, until every role is there.
    look_until = time.monotonic() + LOOK_AGAIN_S
    next_look = time.monotonic() + 1.0
    with open(args.out, "a") as out:
        while not STOP.set:
            started = time.monotonic()
            missing = set(MAPS) - {m["role"] for m in maps}
            if missing and next_look <= started < look_until:
                next_look = started + 1.0
                maps = maps + joined(maps, pids)
            try:
                dump_round(maps, out)
                rounds += 1
            except (OSError, ValueError) as exc:  # a map gone with its tracer: say so, go on
                print("warning: %s" % labkit.one_line(exc), flush=True)
            time.sleep(max(0.0, args.every / 1000.0 - (time.monotonic() - started)))
    print("stopped after %d rounds" % rounds, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
