"""Target network set-up for two hypothesis scenarios: a NAT'ed service VIP, an ephemeral port.

`nat`: the client calls a loopback virtual address DNAT'ed to the real server, like a Kubernetes
service IP. The rule is added and removed on the target by kit/nat.py (root); this is the
controller's side. A run's rule is named after its run id and records its owner (the run's
lifeline pid), so teardown removes exactly it and `usmlab cleanup` can find those of crashed
runs. `ephemeral-port-server`: kit/ports.py asks the target's kernel for a free port inside its
ephemeral range.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from usmlab.errors import UsageError, UsmlabError
from usmlab.jsonlines import parse_json_lines
from usmlab.targets.base import CommandResult, Target

STATE_NAME = ".nat-state.json"  # in the run folder on the target; dot files are not inventoried
LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")


def check_loopback(host: str, what: str) -> str:
    """Refuse, before anything runs on the target, any address outside 127.0.0.0/8."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"{what} {host!r} is not an IPv4 address") from None
    if address.version != 4 or address not in LOOPBACK_V4:
        raise UsageError(f"{what} {host} is outside 127.0.0.0/8: the lab only NATs loopback")
    return str(address)


def _kit_failure(what: str, result: CommandResult) -> UsmlabError:
    lines = (result.stderr or result.stdout).strip().splitlines()
    detail = lines[-1].removeprefix("error: ") if lines else f"exit status {result.exit_code}"
    return UsmlabError(f"{what}: {detail}")


def default_kit_dir(target: Target) -> str:
    return target.join(target.work_dir, "kit")


@dataclass
class NatRule:
    """One run's DNAT rule on a target; `remove()` may be called any number of times."""

    target: Target
    kit_dir: str
    state_path: str
    details: dict[str, Any] = field(default_factory=dict)
    removed: bool = False

    @classmethod
    def add(
        cls,
        target: Target,
        kit_dir: str,
        run_dir: str,
        run_id: str,
        vip: str,
        vport: int,
        to_host: str,
        to_port: int,
        *,
        owner_pid: int | None = None,
        tool: str = "auto",
    ) -> NatRule:
        """DNAT vip:vport to to_host:to_port for locally generated TCP traffic.

        run_dir is the run folder on the target (the state file goes there). owner_pid defaults
        to the target's lifeline for this controller: while it lives the rule is not a leftover.
        """
        vip = check_loopback(vip, "virtual address")
        to_host = check_loopback(to_host, "server address")
        state_path = target.join(run_dir, STATE_NAME)
        owner = owner_pid if owner_pid is not None else target.lifeline_pid()
        argv = [
            *target.python(),
            target.join(kit_dir, "nat.py"),
            "add",
            "--state",
            state_path,
            "--run-id",
            run_id,
            "--vip",
            vip,
            "--vport",
            str(vport),
            "--to",
            f"{to_host}:{to_port}",
            "--tool",
            tool,
        ]
        if owner is not None:
            argv += ["--owner-pid", str(owner)]
        result = target.run(argv, sudo=True, check=False)
        if not result.ok:
            raise _kit_failure(f"cannot DNAT {vip}:{vport} to {to_host}:{to_port}", result)
        details = parse_json_lines(result.stdout)
        return cls(target, kit_dir, state_path, details[0] if details else {})

    @property
    def vip(self) -> str:
        return f"{self.details.get('vip')}:{self.details.get('vport')}"

    def remove(self) -> bool:
        """Delete the rule; True if this call deleted it, False if it was already gone."""
        if self.removed:
            return False
        argv = self.target.python(self.target.join(self.kit_dir, "nat.py"), "remove")
        result = self.target.run([*argv, "--state", self.state_path], sudo=True, check=False)
        if not result.ok:
            raise _kit_failure(f"cannot remove the NAT rule for {self.vip}", result)
        self.removed = True
        done = parse_json_lines(result.stdout)
        return bool(done and done[0].get("removed"))


@dataclass(frozen=True)
class NatLeftover:
    """A usmlab NAT entry found on a target (an nft table, or an iptables rule)."""

    tool: str
    run_id: str | None
    owner_pid: int | None
    owner_alive: bool
    table: str | None = None  # nft
    rule: tuple[str, ...] = ()  # iptables, as arguments after -A


def _entry(data: dict[str, Any]) -> NatLeftover:
    return NatLeftover(
        tool=data["tool"],
        run_id=data.get("run_id"),
        owner_pid=data.get("owner_pid"),
        owner_alive=bool(data.get("owner_alive")),
        table=data.get("table"),
        rule=tuple(data.get("iptables") or ()),
    )


def leftover_tables(target: Target, kit_dir: str | None = None) -> list[NatLeftover]:
    """Every usmlab NAT entry on the target, live or not (the kit must be deployed)."""
    kit = kit_dir or default_kit_dir(target)
    result = target.run(target.python(target.join(kit, "nat.py"), "list"), sudo=True, check=False)
    if not result.ok:
        raise _kit_failure("cannot list NAT rules", result)
    return [_entry(item) for item in parse_json_lines(result.stdout)]


def remove_leftovers(
    target: Target, live_run_ids: Iterable[str], kit_dir: str | None = None
) -> list[NatLeftover]:
    """Delete the NAT entries of crashed runs; returns what was deleted.

    An entry is kept when its run id is in live_run_ids or its owner process still lives (a run
    of another work dir, or one started after the caller listed its live runs).
    """
    kit = kit_dir or default_kit_dir(target)
    argv = target.python(target.join(kit, "nat.py"), "purge")
    for run_id in sorted(set(live_run_ids)):
        argv += ["--keep", run_id]
    result = target.run(argv, sudo=True, check=False)
    if not result.ok:
        raise _kit_failure("cannot remove leftover NAT rules", result)
    return [_entry(item) for item in parse_json_lines(result.stdout)]


def ephemeral_ports(target: Target, kit_dir: str, count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free TCP ports on the target's loopback, inside its ephemeral range."""
    argv = target.python(target.join(kit_dir, "ports.py"), "ephemeral", "--host", host)
    result = target.run([*argv, "--count", str(count)], check=False)
    if not result.ok:
        raise _kit_failure("cannot pick a port in the ephemeral range", result)
    found = parse_json_lines(result.stdout)
    if not found:
        raise UsmlabError("ports.py printed no ports")
    return [int(port) for port in found[0]["ports"]]


def ephemeral_port(target: Target, kit_dir: str) -> int:
    """A free TCP port on the target's 127.0.0.1 inside net.ipv4.ip_local_port_range."""
    return ephemeral_ports(target, kit_dir, 1)[0]
