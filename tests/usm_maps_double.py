"""USM maps TEST DOUBLE: BPF hash maps with USM's names and key/value sizes, for usmlab's tests.

It is NOT USM. It creates, with bpftool, the three maps USM gives a Go TLS write its tuple from
(`conn_tup_by_go_tls_conn`: `*tls.Conn` -> conn_tuple_t; `tuple_by_pid_fd`: pid_fd_t ->
conn_tuple_t; `pid_fd_by_tuple`: the reverse), holds them open (so they show among the maps of
the process that runs it), and fills them as a real Go client's connections open, read from the
client's `conns-*.jsonl` (docs/formats.md): the right tuple, except that every Nth connection
gets the previous connection's tuple in a chosen map (planted stale entries, recorded in
`planted.jsonl`, so a test knows exactly which requests must be judged stale). A closed
connection's entries are deleted, as USM deletes them, DELETE_AFTER later.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

NAMES = {  # map: (key size, value size)
    "conn_tup_by_go_tls_conn": (8, 48),
    "tuple_by_pid_fd": (8, 48),
    "pid_fd_by_tuple": (48, 8),
}
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_OBJ_GET = 7
NR_BPF = {"x86_64": 321, "aarch64": 280}


def conn_tuple(saddr: str, sport: int, daddr: str, dport: int, pid: int) -> bytes:
    """conn_tuple_t of a TCP IPv4 connection, as USM lays it out (docs/usm-maps.md)."""
    s = struct.unpack("<I", socket.inet_aton(saddr))[0]
    d = struct.unpack("<I", socket.inet_aton(daddr))[0]
    return struct.pack("<QQQQHHIII", 0, s, 0, d, sport, dport, 0, pid, 1)


# How long after a connection's close its entries go (longer than the dumps' 50 ms, shorter
# than the tests' 100 ms between connections that may reuse a key).
DELETE_AFTER = 0.07


class MapsDouble:
    def __init__(self, watch: Path, *, conn_every: int = 0, fd_every: int = 0) -> None:
        self.watch = watch
        self.conn_every, self.fd_every = conn_every, fd_every
        self.dir = Path(tempfile.mkdtemp(prefix="usm-maps-double-"))
        self.planted = self.dir / "planted.jsonl"
        self.fds: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True)
        self._offsets: dict[Path, int] = {}
        self._previous: bytes | None = None
        self._count = 0
        # USM deletes a connection's entries when it closes; the double does too, a little
        # later, so that its 50 ms dumps still see entries of requests shorter than that.
        self._keys: dict[str, list[tuple[str, bytes]]] = {}
        self._owner: dict[tuple[str, bytes], str] = {}
        self._closing: list[tuple[float, str]] = []

    def _path(self, name: str) -> str:
        return str(self.dir / "bpffs" / name)

    def start(self) -> MapsDouble:
        (self.dir / "bpffs").mkdir()
        subprocess.run(["mount", "-t", "bpf", "bpf", str(self.dir / "bpffs")], check=True)
        libc = ctypes.CDLL(None, use_errno=True)
        for name, (key, value) in NAMES.items():
            subprocess.run(
                ["bpftool", "map", "create", self._path(name), "type", "hash", "key", str(key),
                 "value", str(value), "entries", "65536", "name", name],
                check=True,
            )  # fmt: skip
            path = ctypes.create_string_buffer(self._path(name).encode())
            attr = struct.pack("<QII", ctypes.addressof(path), 0, 0).ljust(64, b"\0")
            buf = ctypes.create_string_buffer(attr, len(attr))
            fd = libc.syscall(NR_BPF[platform.machine()], BPF_OBJ_GET, buf, len(attr))
            if fd < 0:
                raise OSError(ctypes.get_errno(), f"BPF_OBJ_GET {name}")
            self.fds.append(fd)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for fd in self.fds:
            os.close(fd)
        subprocess.run(["umount", str(self.dir / "bpffs")], check=False)

    def _update(self, updates: list[tuple[str, bytes, bytes | None]]) -> None:
        """A round's updates (value None: a delete), by the bpf syscall on the maps' fds: a
        process per round (bpftool) fell behind a churning client on a busy machine, and a late
        entry reads as stale."""
        libc = ctypes.CDLL(None, use_errno=True)
        for name, key, value in updates:
            fd = self.fds[list(NAMES).index(name)]
            key_buf = ctypes.create_string_buffer(key, len(key))
            if value is None:
                attr = struct.pack("<IIQ", fd, 0, ctypes.addressof(key_buf)).ljust(64, b"\0")
                command = BPF_MAP_DELETE_ELEM
            else:
                value_buf = ctypes.create_string_buffer(value, len(value))
                attr = struct.pack(
                    "<IIQQQ", fd, 0, ctypes.addressof(key_buf), ctypes.addressof(value_buf), 0
                ).ljust(64, b"\0")
                command = BPF_MAP_UPDATE_ELEM
            buf = ctypes.create_string_buffer(attr, len(attr))
            if libc.syscall(NR_BPF[platform.machine()], command, buf, len(attr)) < 0:
                err = ctypes.get_errno()
                if not (value is None and err == errno.ENOENT):
                    raise OSError(err, f"bpf map update {name}")

    def _fill(self) -> None:
        while not self._stop.wait(0.002):
            updates: list[tuple[str, bytes, bytes | None]] = []
            for log in sorted(self.watch.glob("**/conns-*.jsonl")):
                with log.open() as handle:
                    handle.seek(self._offsets.get(log, 0))
                    lines = handle.readlines()
                    if lines and not lines[-1].endswith("\n"):
                        lines.pop()
                    self._offsets[log] = self._offsets.get(log, 0) + sum(len(x) for x in lines)
                for event in map(json.loads, lines):
                    if event.get("event") == "open":
                        updates.extend(self._opened(event))
                    elif event.get("event") == "close":
                        self._closing.append((time.monotonic() + DELETE_AFTER, event["conn_id"]))
            updates.extend(self._due_deletes())
            if updates:
                self._update(updates)

    def _due_deletes(self) -> list[tuple[str, bytes, bytes | None]]:
        """Entries of connections closed DELETE_AFTER ago, unless a newer connection took the
        key meanwhile."""
        due = []
        now = time.monotonic()
        while self._closing and self._closing[0][0] <= now:
            conn_id = self._closing.pop(0)[1]
            for name, key in self._keys.pop(conn_id, []):
                if self._owner.get((name, key)) == conn_id:
                    del self._owner[(name, key)]
                    due.append((name, key, None))
        return due

    def _opened(self, event: dict[str, Any]) -> list[tuple[str, bytes, bytes | None]]:
        """The map updates for a connection just opened (planted ones recorded as such)."""
        self._count += 1
        host, port = event["remote"].rsplit(":", 1)
        right = conn_tuple("127.0.0.1", event["local_port"], host, int(port), event["pid"])
        stale = self._previous if self._previous is not None else right
        self._previous = right
        plant_conn = self.conn_every and self._count % self.conn_every == 0
        plant_fd = self.fd_every and self._count % self.fd_every == 0 and not plant_conn
        pid_fd = struct.pack("<II", event["pid"], event["fd"])
        key = struct.pack("<Q", int(event["tls_conn"], 16))
        updates: list[tuple[str, bytes, bytes | None]] = [
            ("tuple_by_pid_fd", pid_fd, stale if plant_fd else right),
            ("pid_fd_by_tuple", right, pid_fd),
            ("conn_tup_by_go_tls_conn", key, stale if plant_conn else right),
        ]
        self._keys[event["conn_id"]] = [(name, k) for name, k, _ in updates]
        for name, k, _ in updates:
            self._owner[(name, k)] = event["conn_id"]
        if (plant_conn or plant_fd) and stale != right:
            with self.planted.open("a") as out:
                which = "conn_tup_by_go_tls_conn" if plant_conn else "tuple_by_pid_fd"
                out.write(json.dumps({"conn_id": event["conn_id"], "pid": event["pid"],
                                      "map": which}) + "\n")  # fmt: skip
        return updates
