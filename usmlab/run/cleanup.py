"""Ending what crashed runs left behind on a target (`usmlab cleanup`, and before every run).

The work happens on the target in kit/cleanup.py; this is the controller's half of it.
"""

from __future__ import annotations

from typing import Any

from usmlab.jsonlines import parse_json_lines
from usmlab.kit import kit_files
from usmlab.targets.base import Target


def clean_target(
    target: Target, run_id: str | None = None, deploy: bool = True, ending: bool = False
) -> list[Any]:
    """End processes of runs that are no longer alive; returns what was ended or restored.

    `ending`: the run `run_id` itself is ending and asks for everything that still carries its
    id to be ended (its own marker is still live, so cleanup would otherwise spare it).
    """
    kit_dir = target.join(target.work_dir, "kit")
    if deploy and not ending:
        target.sync(kit_files(), kit_dir)
    argv = target.python(target.join(kit_dir, "cleanup.py"), "--work-dir", target.work_dir)
    if run_id:
        argv += ["--run-id", run_id, *(["--ending"] if ending else [])]
    result = target.run(argv, sudo=target.can_sudo(), check=False)
    return parse_json_lines(result.stdout)
