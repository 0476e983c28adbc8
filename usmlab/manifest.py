"""Run folders and their manifest.

Every run gets `<runs-dir>/<UTC timestamp>-<scenario>-<target>/`. The manifest is rewritten at
each milestone, so a run that crashes or is interrupted still says what it was and what it holds.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from pathlib import Path
from typing import Any

from usmlab.targets.base import sha256_file

MANIFEST = "manifest.json"


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


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    """Write atomically: a reader never sees half a manifest."""
    tmp = run_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, run_dir / MANIFEST)


def read_manifest(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / MANIFEST).read_text())
