"""`usmlab scenarios`: the named scenarios, their goal and defaults."""

from __future__ import annotations

import json

from usmlab.commands import JsonOption, friendly


@friendly
def scenarios_cmd(as_json: JsonOption = False) -> None:
    """List the named scenarios, their goal and defaults."""
    from usmlab.scenarios import SCENARIOS

    if as_json:
        listing = [
            {"name": s.name, "goal": s.goal, "description": s.description,
             "parameters": s.params.as_dict()}
            for s in SCENARIOS.values()
        ]  # fmt: skip
        print(json.dumps(listing, indent=2))
        return

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
