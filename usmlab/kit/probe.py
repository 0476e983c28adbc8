#!/usr/bin/env python3
"""Facts about the target, gathered in one round trip: versions, libssl, BTF, a port's holder.

`probe.py info [--port P]` prints one JSON object (with `port_in_use` when P is given);
`probe.py port PORT` exits 0 when the TCP port is free and otherwise prints the process holding
it (found through /proc, no ss/lsof needed) and exits 1.
"""

import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def mapped_libraries(pid="self", pattern=r"/libssl[^/]*\.so"):
    """Distinct files matching pattern in a process's memory map."""
    found = []
    try:
        with open("/proc/%s/maps" % pid) as maps:
            for line in maps:
                parts = line.split(None, 5)
                if len(parts) == 6:
                    path = parts[5].strip()
                    if re.search(pattern, path) and path not in found:
                        found.append(path)
    except OSError:
        pass
    return found


def elf_functions(path, pattern=r"SSL_(read|write)(_ex)?|SSL_set_fd|SSL_shutdown"):
    """Names matching pattern that an ELF shared library defines as functions in its dynamic
    symbol table (what a uprobe can attach to by name); None when the file is not readable
    ELF. Read here rather than with `bpftrace -l`, which costs a process start as root."""
    import struct

    try:
        with open(path, "rb") as handle:
            data = handle.read()
        if data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
            return None
        end = "<" if data[5] == 1 else ">"
        if data[4] == 2:
            (shoff,) = struct.unpack_from(end + "Q", data, 0x28)
            shentsize, shnum = struct.unpack_from(end + "HH", data, 0x3A)
            section, symbol = end + "IIQQQQIIQQ", end + "IBBHQQ"
            name_info_shndx = (0, 1, 3)
        else:
            (shoff,) = struct.unpack_from(end + "I", data, 0x20)
            shentsize, shnum = struct.unpack_from(end + "HH", data, 0x2E)
            section, symbol = end + "IIIIIIIIII", end + "IIIBBH"
            name_info_shndx = (0, 3, 5)
        headers = [struct.unpack_from(section, data, shoff + i * shentsize) for i in range(shnum)]
        found = set()
        for header in headers:
            if header[1] != 11:  # SHT_DYNSYM
                continue
            offset, size, link, entsize = header[4], header[5], header[6], header[9]
            strings = headers[link][4]
            for at in range(offset, offset + size, entsize or struct.calcsize(symbol)):
                fields = struct.unpack_from(symbol, data, at)
                name_at, info, shndx = (fields[i] for i in name_info_shndx)
                if shndx == 0 or (info & 0xF) not in (2, 10):  # undefined; not FUNC/IFUNC
                    continue
                start = strings + name_at
                name = data[start : data.index(b"\0", start)].decode("ascii", "replace")
                if re.fullmatch(pattern, name):
                    found.add(name)
        return sorted(found)
    except (OSError, struct.error, IndexError, ValueError):
        return None


def start_tool_version(argv):
    """Start `argv` (a `--version` call) in the background: None when the tool is missing.
    It runs while the rest of the probe reads the machine; `tool_version` collects it."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        return subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True
        )
    except OSError:
        return None


def tool_version(started):
    """The first line a `start_tool_version` process printed, or None."""
    if started is None:
        return None
    try:
        out = started.communicate(timeout=10)[0]
    except subprocess.SubprocessError:
        started.kill()
        started.wait()
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def info(args):
    bpftrace = start_tool_version(["bpftrace", "--version"])
    import ssl  # loads libssl into this process, so its maps show which one

    libssl = mapped_libraries()

    tracefs = None
    for path in TRACEFS_CANDIDATES:
        if os.path.exists(os.path.join(path, "trace_pipe")):
            tracefs = path
            break
    data = {
        "hostname": socket.gethostname(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "openssl": ssl.OPENSSL_VERSION,
        "libssl": libssl,
        "libssl_functions": {lib: elf_functions(lib) for lib in libssl},
        "euid": os.geteuid(),
        "btf": os.path.exists("/sys/kernel/btf/vmlinux"),
        "tracefs": tracefs,
        "bpftrace": tool_version(bpftrace),
        "sudo": shutil.which("sudo") is not None,
        "mono": __import__("time").monotonic(),
    }
    if args[:1] == ["--port"] and len(args) == 2 and args[1].isdigit():
        data["port_in_use"] = describe_holder(int(args[1]))
    print(json.dumps(data))
    return 0


def _listening_inodes(port):
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                next(handle, None)
                for line in handle:
                    fields = line.split()
                    if len(fields) < 10:
                        continue
                    local, state, inode = fields[1], fields[3], fields[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(inode)
        except OSError:
            continue
    return inodes


def port_holder(port):
    """(pid, comm) of a process listening on port, (None, None) if unknown, or False if free."""
    inodes = _listening_inodes(port)
    if not inodes:
        return False
    wanted = {"socket:[%s]" % i for i in inodes}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fd_dir = "/proc/%s/fd" % entry
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(os.path.join(fd_dir, fd)) in wanted:
                    with open("/proc/%s/comm" % entry) as comm:
                        return int(entry), comm.read().strip()
            except OSError:
                continue
    return None, None


def describe_holder(number):
    """None when the port is free, else a one-line description of who holds it."""
    holder = port_holder(number)
    if holder is False:
        return None
    pid, comm = holder
    if pid is None:
        return "port %d is in use (holder not visible to this user)" % number
    return "port %d is in use by pid %d (%s)" % (number, pid, comm)


def port(args):
    try:
        number = int(args[0])
    except (IndexError, ValueError):
        print("usage: probe.py port PORT", file=sys.stderr)
        return 2
    message = describe_holder(number)
    if message is None:
        return 0
    print(message)
    return 1


def main(argv):
    if argv[:1] == ["info"]:
        return info(argv[1:])
    if argv[:1] == ["port"]:
        return port(argv[1:])
    print("usage: probe.py info [--port PORT] | port PORT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
