#!/usr/bin/env python3
"""DNAT a loopback virtual address to the lab server, and take it away again (root, on the target).

The `nat` scenario asks whether traffic to a service VIP (a Kubernetes ClusterIP, DNAT'ed to a
pod) confuses attribution. The lab imitates it on loopback only: both the virtual address and the
real server must be inside 127.0.0.0/8, so no rule made here can touch traffic leaving the host.

`add --state FILE --run-id ID --vip 127.0.0.42 --vport 443 --to 127.0.0.1:8443 [--owner-pid N]`
writes FILE first (what is about to be added), then adds the rule: with nftables, a table of its
own, `ip usmlab_<run id>`, whose `output` nat chain holds the one DNAT rule (locally generated
traffic never passes prerouting); without nft, one commented rule in iptables' nat OUTPUT chain.
`remove --state FILE` deletes exactly what FILE names and nothing else; it is a no-op when FILE
is gone, so teardown may call it twice. `list` prints every usmlab NAT entry on the machine and
`purge [--keep ID ...]` removes those of runs that crashed: each rule carries the comment
`usmlab run=<id> owner=<pid>`, and an entry whose owner process is dead is a leftover.

No sysctl is changed: DNAT from one 127.x address to another in the output hook works with
`net.ipv4.conf.*.route_localnet=0` (that setting only matters when loopback addresses would
leave `lo`, or arrive through prerouting). Every command prints JSON lines; errors are one line
on stderr.
"""

import argparse
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import Any, Dict, List, NoReturn, Optional, Tuple

if __package__:  # imported on the controller as usmlab.kit.nat
    from .labkit import pid_alive
else:  # run on the target, where labkit.py is deployed beside this script
    from labkit import pid_alive

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_TOOL = 3
EXIT_NOT_ROOT = 4

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
TABLE_PREFIX = "usmlab_"
TABLE = re.compile(r"^usmlab_[A-Za-z0-9_]{1,100}$")
COMMENT = re.compile(r"usmlab run=([A-Za-z0-9_.-]+)(?: owner=(\d+))?")
# dstnat priority of the output hook; srcnat for postrouting.
NFT_TABLE_TEMPLATE = """create table ip {table}
table ip {table} {{
  chain output {{
    type nat hook output priority -100; policy accept;
    ip daddr {vip} tcp dport {vport} dnat to {to_host}:{to_port} comment "{comment}"
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
  }}
}}
"""
# The empty postrouting chain is for kernels before 4.18, whose NAT engine only handles the
# reply direction when a nat chain is registered on that hook too.


class NatError(Exception):
    """A failure to report as one line, with its exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


class OneLineArgumentParser(argparse.ArgumentParser):
    """Usage errors as one `error: ...` line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print("error: {}".format(message), file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _run(argv: List[str], stdin: Optional[str] = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv,
        input=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=True,
    )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def loopback_address(text: str, what: str) -> str:
    """The address, normalised, if it is IPv4 loopback; refuses anything else."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise NatError("{} {!r} is not an IPv4 address".format(what, text), EXIT_USAGE) from None
    if address.version != 4 or address not in LOOPBACK:
        raise NatError(
            "{} {} is outside 127.0.0.0/8: the lab only rewrites loopback traffic".format(
                what, text
            ),
            EXIT_USAGE,
        )
    return str(address)


def tcp_port(text: str, what: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise NatError("{} {!r} is not a port number".format(what, text), EXIT_USAGE) from None
    if not 0 < port < 65536:
        raise NatError("{} {} is not between 1 and 65535".format(what, port), EXIT_USAGE)
    return port


def destination(text: str) -> Tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise NatError("--to {!r} must be HOST:PORT, e.g. 127.0.0.1:8443".format(text), EXIT_USAGE)
    return loopback_address(host, "destination"), tcp_port(port, "destination port")


def table_name(run_id: str) -> str:
    """nft table of a run: the run id with every character nft might reject made `_`."""
    return TABLE_PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", run_id)


def comment_for(run_id: str, owner_pid: Optional[int]) -> str:
    text = "usmlab run={}".format(run_id)
    return text if owner_pid is None else "{} owner={}".format(text, owner_pid)


def nft_works() -> bool:
    """nft is installed and the kernel has nf_tables."""
    if shutil.which("nft") is None:
        return False
    return _run(["nft", "list", "tables"]).returncode == 0


def iptables_works() -> bool:
    if shutil.which("iptables") is None or shutil.which("iptables-save") is None:
        return False
    return _run(["iptables-save", "-t", "nat"]).returncode == 0


def choose_tool(wanted: str) -> str:
    if wanted in ("auto", "nft") and nft_works():
        return "nft"
    if wanted in ("auto", "iptables") and iptables_works():
        return "iptables"
    needs = {"auto": "nft (package nftables) or iptables", "nft": "nft", "iptables": "iptables"}
    raise NatError("{} is not usable on this machine".format(needs[wanted]), EXIT_NO_TOOL)


def nft_table_exists(table: str) -> bool:
    return _run(["nft", "list", "table", "ip", table]).returncode == 0


def iptables_spec(vip: str, vport: int, to_host: str, to_port: int, comment: str) -> List[str]:
    """The rule as iptables arguments after `-A`/`-C`/`-D`."""
    return [
        "OUTPUT",
        "-d",
        "{}/32".format(vip),
        "-p",
        "tcp",
        "-m",
        "tcp",
        "--dport",
        str(vport),
        "-m",
        "comment",
        "--comment",
        comment,
        "-j",
        "DNAT",
        "--to-destination",
        "{}:{}".format(to_host, to_port),
    ]


def iptables(action: str, spec: List[str]) -> subprocess.CompletedProcess:
    return _run(["iptables", "-w", "-t", "nat", action, *spec])


def add(args: argparse.Namespace) -> Dict[str, Any]:
    vip = loopback_address(args.vip, "--vip")
    vport = tcp_port(args.vport, "--vport")
    to_host, to_port = destination(args.to)
    if vip == to_host:
        raise NatError(
            "--vip {} is the server's own address: pick another 127.x address".format(vip),
            EXIT_USAGE,
        )
    if not RUN_ID.match(args.run_id):
        raise NatError("--run-id may only hold letters, digits, '_', '.' and '-'", EXIT_USAGE)
    if os.geteuid() != 0:
        raise NatError("adding NAT rules needs root", EXIT_NOT_ROOT)
    if os.path.exists(args.state):
        raise NatError(
            "{} exists: this run already added a rule (remove it first)".format(args.state)
        )
    tool = choose_tool(args.tool)
    comment = comment_for(args.run_id, args.owner_pid)
    state: Dict[str, Any] = {
        "tool": tool,
        "run_id": args.run_id,
        "owner_pid": args.owner_pid,
        "vip": vip,
        "vport": vport,
        "to_host": to_host,
        "to_port": to_port,
        "comment": comment,
    }
    if tool == "nft":
        table = table_name(args.run_id)
        if nft_table_exists(table):
            raise NatError("nft table ip {} already exists".format(table))
        state["table"] = table
    else:
        state["iptables"] = iptables_spec(vip, vport, to_host, to_port, comment)
    # Written before the rule exists, so a crash in between still leaves a record to clean up.
    with open(args.state, "w") as handle:
        json.dump(state, handle)
    if tool == "nft":
        script = NFT_TABLE_TEMPLATE.format(
            table=state["table"],
            vip=vip,
            vport=vport,
            to_host=to_host,
            to_port=to_port,
            comment=comment,
        )
        done = _run(["nft", "-f", "-"], stdin=script)
    else:
        done = iptables("-A", state["iptables"])
    if done.returncode != 0:
        os.unlink(args.state)
        raise NatError("{} could not add the rule: {}".format(tool, _last_line(done.stderr)))
    return dict(state, action="added", state=os.path.abspath(args.state))


def delete_entry(tool: str, table: Optional[str] = None, spec: Optional[List[str]] = None) -> bool:
    """Delete one usmlab entry; False when it was already gone."""
    if tool == "nft":
        if table is None or not TABLE.match(table):
            raise NatError("refusing to delete nft table {!r}: not a usmlab table".format(table))
        if not nft_table_exists(table):
            return False
        done = _run(["nft", "delete", "table", "ip", table])
    elif tool == "iptables":
        if not spec or not any(COMMENT.match(word) for word in spec):
            raise NatError("refusing to delete an iptables rule without a usmlab comment")
        if iptables("-C", spec).returncode != 0:
            return False
        done = iptables("-D", spec)
    else:
        raise NatError("unknown NAT tool {!r} in the state file".format(tool))
    if done.returncode != 0:
        raise NatError("{} could not delete the rule: {}".format(tool, _last_line(done.stderr)))
    return True


def remove(state_file: str) -> Dict[str, Any]:
    try:
        with open(state_file) as handle:
            state = json.load(handle)
    except FileNotFoundError:
        return {"action": "remove", "removed": False, "reason": "no state file"}
    except (OSError, ValueError) as exc:
        raise NatError("cannot read {}: {}".format(state_file, exc)) from None
    if os.geteuid() != 0:
        raise NatError("removing NAT rules needs root", EXIT_NOT_ROOT)
    removed = delete_entry(state.get("tool"), state.get("table"), state.get("iptables"))
    os.unlink(state_file)
    return dict(state, action="remove", removed=removed)


def nft_entries() -> List[Dict[str, Any]]:
    listing = _run(["nft", "list", "tables"])
    found = []
    for line in listing.stdout.splitlines():
        words = line.split()
        if len(words) != 3 or words[:2] != ["table", "ip"] or not TABLE.match(words[2]):
            continue
        body = _run(["nft", "list", "table", "ip", words[2]]).stdout
        match = COMMENT.search(body)
        found.append(
            {
                "tool": "nft",
                "table": words[2],
                "run_id": match.group(1) if match else None,
                "owner_pid": int(match.group(2)) if match and match.group(2) else None,
            }
        )
    return found


def iptables_entries() -> List[Dict[str, Any]]:
    # iptables-save, unlike `iptables -S`, does not create an empty nat table as it looks.
    listing = _run(["iptables-save", "-t", "nat"])
    found = []
    for line in listing.stdout.splitlines():
        if not line.startswith("-A OUTPUT ") or "usmlab run=" not in line:
            continue
        spec = shlex.split(line)[1:]
        match = next((m for m in (COMMENT.fullmatch(w) for w in spec) if m), None)
        if match is None:
            continue
        found.append(
            {
                "tool": "iptables",
                "iptables": spec,
                "run_id": match.group(1),
                "owner_pid": int(match.group(2)) if match.group(2) else None,
            }
        )
    return found


def entries() -> List[Dict[str, Any]]:
    """Every usmlab NAT entry on this machine, whichever tool made it."""
    if os.geteuid() != 0:
        raise NatError("listing NAT rules needs root", EXIT_NOT_ROOT)
    found: List[Dict[str, Any]] = []
    if nft_works():
        found.extend(nft_entries())
    if iptables_works():
        found.extend(iptables_entries())
    for entry in found:
        owner = entry["owner_pid"]
        entry["owner_alive"] = isinstance(owner, int) and pid_alive(owner)
    return found


def purge(keep: List[str]) -> List[Dict[str, Any]]:
    """Remove the entries of runs that are not kept and whose owner process is dead."""
    removed = []
    for entry in entries():
        if entry["run_id"] in keep or entry["owner_alive"]:
            continue
        if delete_entry(entry["tool"], entry.get("table"), entry.get("iptables")):
            removed.append(dict(entry, action="purged"))
    return removed


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="nat.py", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    add_cmd = sub.add_parser("add", allow_abbrev=False)
    add_cmd.add_argument("--state", required=True, help="state file (written before the rule)")
    add_cmd.add_argument("--run-id", required=True)
    add_cmd.add_argument("--vip", required=True, help="virtual address, inside 127.0.0.0/8")
    add_cmd.add_argument("--vport", required=True)
    add_cmd.add_argument("--to", required=True, help="real server, 127.x.y.z:PORT")
    add_cmd.add_argument("--owner-pid", type=int, default=None, help="the run's lifeline")
    add_cmd.add_argument("--tool", choices=("auto", "nft", "iptables"), default="auto")
    remove_cmd = sub.add_parser("remove", allow_abbrev=False)
    remove_cmd.add_argument("--state", required=True)
    sub.add_parser("list", allow_abbrev=False)
    purge_cmd = sub.add_parser("purge", allow_abbrev=False)
    purge_cmd.add_argument("--keep", action="append", default=[], help="run id still alive")
    return parser


def main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "add":
            results = [add(args)]
        elif args.command == "remove":
            results = [remove(args.state)]
        elif args.command == "list":
            results = entries()
        else:
            results = purge(args.keep)
    except NatError as exc:
        print("error: {}".format(exc), file=sys.stderr)
        return exc.code
    for result in results:
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
