"""`usmlab collect RUN`: fetch a remote run's files after the connection dropped.

The run's manifest says where it ran and where its files are on the target. Collection is
resumable (files already here with the right sha256 are skipped) and verified (every file's
sha256 computed on the target must match the local copy). The verdict is then recomputed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from usmlab.analysis.html import write_html_later
from usmlab.analysis.report import Report, analyze_run, write_report
from usmlab.errors import UsageError
from usmlab.manifest import Manifest, now_iso
from usmlab.progress import Progress, Reporter, as_reporter, discard
from usmlab.run.cleanup import clean_target
from usmlab.targets import open_target
from usmlab.targets.base import Target


def fetch_run_files(
    target: Target, remote_dir: str, run_dir: Path, reporter: Reporter
) -> list[str]:
    """Every file of the remote run folder, verified, with a "collect" bar: the one way both a run
    and `usmlab collect` bring a run home."""
    with reporter.phase("collect") as phase:
        return target.fetch_dir(remote_dir, run_dir, phase.files)


@dataclass
class Collected:
    run_dir: Path
    fetched: list[str]
    manifest: Manifest
    report: Report | None


def collect_run(
    run_dir: Path,
    identity: Path | None = None,
    work_dir: str | None = None,
    progress: Progress | Reporter = discard,
) -> Collected:
    try:
        manifest = Manifest.read(run_dir)
    except UsageError:
        raise UsageError(f"{run_dir} is not a run folder (no readable manifest.json)") from None
    where = manifest.get("target") or {}
    spec, remote_dir = where.get("spec"), where.get("run_dir")
    if not spec or not remote_dir:
        raise UsageError(f"{run_dir}: the manifest does not say where the run's files are")
    key = identity or (Path(where["identity"]) if where.get("identity") else None)
    target = open_target(spec, key, work_dir or where.get("work_dir"))
    try:
        fetched = fetch_run_files(target, remote_dir, run_dir.resolve(), as_reporter(progress))
        # A run cut off mid-way could not restore tracefs or end its processes itself.
        clean_target(target, run_id=manifest.get("run_id"))
    finally:
        with contextlib.suppress(Exception):
            target.close()
    manifest["collected"] = now_iso()
    manifest.pop("collect_error", None)  # every file is here now, verified
    if manifest.abandoned():
        manifest.mark_abandoned()
    report = None
    if manifest.client_logs:  # every client: client.jsonl, client-1.jsonl, client-r1.jsonl, ...
        report = analyze_run(run_dir)
        write_report(report, run_dir)
        write_html_later(run_dir)
        manifest["outcome"] = report.outcome
    manifest.inventory()
    manifest.save()
    return Collected(run_dir, fetched, manifest, report)
