"""Run folders and their manifest (docs/formats.md).

Every run gets `<runs-dir>/<UTC timestamp>-<scenario>-<target>/`. The manifest is rewritten at
each milestone, so a run that crashes or is interrupted still says what it was and what it holds.
`Manifest` is the one type for it: the run writes it, `collect` and the analysis read it, and it
alone decides which files are a role's logs (every client of a multi-client or restarted run).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import re
import tempfile
from pathlib import Path
from typing import Any

from usmlab.errors import InputError, UsageError
from usmlab.targets.base import sha256_file

MANIFEST = "manifest.json"


class Manifest(dict[str, Any]):
    """manifest.json of one run folder: a JSON object, saved atomically."""

    def __init__(self, run_dir: Path, data: dict[str, Any] | None = None) -> None:
        super().__init__(data or {})
        self.run_dir = run_dir

    @classmethod
    def read(cls, run_dir: Path, missing_ok: bool = False) -> Manifest:
        """The run folder's manifest; InputError when it is missing (unless `missing_ok`: {}),
        unreadable or not a JSON object."""
        path = run_dir / MANIFEST
        if not path.exists():
            if missing_ok:
                return cls(run_dir)
            raise InputError(f"{run_dir} is not a run folder (no {MANIFEST})")
        try:
            data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror})") from None
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a JSON object")
        return cls(run_dir, data)

    def save(self) -> None:
        """Write atomically: a reader never sees half a manifest."""
        tmp = self.run_dir / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(self, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, self.run_dir / MANIFEST)

    def names(self, role: str) -> list[str]:
        """Names of the processes of a role, in start order."""
        return [
            p["name"]
            for p in self.get("processes") or []
            if isinstance(p, dict) and p.get("role") == role and isinstance(p.get("name"), str)
        ]

    def logs(self, role: str) -> list[Path]:
        """The JSON-lines logs of every process of a role: `<name>.jsonl` for each process the
        manifest lists (respawned and extra processes included), else `<role>*.jsonl`."""
        found = [self.run_dir / f"{n}.jsonl" for n in dict.fromkeys(self.names(role))]
        found = [p for p in found if p.is_file()]
        return found or sorted(self.run_dir.glob(f"{role}*.jsonl"))

    @property
    def client_logs(self) -> list[Path]:
        return self.logs("client")

    def abandoned(self) -> bool:
        """Whether the run never ended: still `starting`, and the usmlab that ran it (on this
        machine) is gone, e.g. killed with SIGKILL. A run on another controller is not judged."""
        controller = self.get("controller") or {}
        if self.get("status") != "starting" or controller.get("host") != platform.node():
            return False
        pid, start = controller.get("pid"), controller.get("start")
        return not (isinstance(pid, int) and process_start(pid) == start)

    def mark_abandoned(self) -> None:
        self.update(
            status="abandoned",
            error="usmlab stopped before the run ended (killed?); its processes were ended",
        )
        self.save()

    def inventory(self) -> None:
        """Record sha256 and size of every file of the run folder."""
        self["files"] = file_inventory(self.run_dir)


def run_tag(run_id: str) -> str:
    """The short tag every line of a run's tracer carries (`run=`), so a capture can tell its
    own tracer's lines from another usmlab run's."""
    return hashlib.sha256(run_id.encode()).hexdigest()[:8]


def process_start(pid: int) -> str | None:
    """A process's start time (clock ticks since boot), or None when there is no such process:
    with the pid, it names one process for good (pids are reused)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]


def abandoned_runs(runs_dir: Path) -> list[Manifest]:
    """Run folders under runs_dir whose usmlab died mid-run (see Manifest.abandoned)."""
    found = []
    for path in sorted(runs_dir.glob(f"*/{MANIFEST}")):
        try:
            manifest = Manifest.read(path.parent)
        except InputError:
            continue
        if manifest.abandoned():
            found.append(manifest)
    return found


def check_runs_dir(runs_dir: Path) -> None:
    """A folder that can receive run folders, checked before anything is deployed: a one-line
    usage error for a file, or a folder that cannot be written (read-only, no permission)."""
    if runs_dir.exists() and not runs_dir.is_dir():
        raise UsageError(f"--runs-dir {runs_dir} is a file, not a folder")
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=runs_dir):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UsageError(f"--runs-dir {runs_dir} cannot hold run folders: {reason}") from None


def new_run_dir(runs_dir: Path, scenario: str, target_label: str) -> tuple[str, Path]:
    """Create a fresh run folder; returns (run id, path)."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", target_label)
    base = f"{stamp}-{scenario}-{label}"
    runs_dir.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        run_id = base if n == 1 else f"{base}-{n}"
        path = runs_dir / run_id
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return run_id, path.resolve()
    raise RuntimeError(f"cannot create a run folder under {runs_dir}")


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def file_inventory(run_dir: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in the run folder except the manifest itself."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and path.name != MANIFEST and not path.name.startswith("."):
            rel = path.relative_to(run_dir).as_posix()
            files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return files
