#!/usr/bin/env python3
"""Free loopback TCP ports inside the ephemeral range (runs on the target, no root needed).

The `ephemeral-port-server` scenario puts the lab server on a port the kernel could also hand to
a client socket, to test USM's guess of which side of a connection is the server. The port must
be one the kernel really treats as ephemeral, so it is asked for one: binding port 0 draws from
net.ipv4.ip_local_port_range (skipping ip_local_reserved_ports and ports in use).

`ephemeral [--host 127.0.0.1] [--count N]` prints one JSON line:
`{"ports": [40123], "low": 32768, "high": 60999}`. With --count the ports are distinct: all
sockets stay bound until every port is drawn. The ports are free when printed; the server must
bind them soon after.
"""

import argparse
import json
import socket
import sys
from typing import List, NoReturn, Tuple

EXIT_FAILED = 1
EXIT_USAGE = 2
RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
LOOPBACK_HOSTS = {"127.0.0.1": socket.AF_INET, "::1": socket.AF_INET6}
MAX_COUNT = 64


class OneLineArgumentParser(argparse.ArgumentParser):
    """Usage errors as one `error: ...` line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print("error: {}".format(message), file=sys.stderr)
        sys.exit(EXIT_USAGE)


def ephemeral_range(path: str = RANGE_FILE) -> Tuple[int, int]:
    """(low, high) of the ephemeral range; the file holds two numbers."""
    with open(path) as handle:
        low, high = (int(word) for word in handle.read().split())
    return low, high


def draw_ports(host: str, count: int, low: int, high: int) -> List[int]:
    """`count` distinct free ports the kernel picked, each inside [low, high]."""
    held = []
    try:
        for _ in range(count):
            sock = socket.socket(LOOPBACK_HOSTS[host], socket.SOCK_STREAM)
            held.append(sock)
            sock.bind((host, 0))
        ports = [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()
    outside = [port for port in ports if not low <= port <= high]
    if outside:
        raise OSError("the kernel picked {} outside {}-{}".format(outside, low, high))
    return ports


def main(argv: List[str]) -> int:
    parser = OneLineArgumentParser(prog="ports.py", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    eph = sub.add_parser("ephemeral", allow_abbrev=False)
    eph.add_argument("--host", default="127.0.0.1", choices=sorted(LOOPBACK_HOSTS))
    eph.add_argument("--count", type=int, default=1)
    args = parser.parse_args(argv)
    if not 0 < args.count <= MAX_COUNT:
        parser.error("--count must be between 1 and {}".format(MAX_COUNT))
    try:
        low, high = ephemeral_range()
        ports = draw_ports(args.host, args.count, low, high)
    except (OSError, ValueError) as exc:
        print("error: no free ephemeral port on {}: {}".format(args.host, exc), file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps({"ports": ports, "low": low, "high": high}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
