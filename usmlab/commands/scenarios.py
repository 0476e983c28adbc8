"""`usmlab scenarios`: the named scenarios, their goal and defaults."""

from __future__ import annotations

from usmlab.commands import friendly


@friendly
def scenarios_cmd() -> None:
    """List the named scenarios, their goal and defaults."""
    from usmlab.scenarios import SCENARIOS

    for s in SCENARIOS.values():
        p = s.params
        count = "until stopped" if p.count == 0 else f"{p.count} requests"
        if p.duration:
            count += f" for {p.duration:g}s"
        ports = ",".join(str(port) for port in p.ports)
        print(f"{s.name}")
        print(f"    {s.description}")
        print(f"    hypothesis/goal: {s.goal}")
        print(
            f"    defaults: {count}, interval {p.interval:g}s, {p.client} client x{p.clients}, "
            f"server port(s) {ports}"
        )
