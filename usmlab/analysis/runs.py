"""Runs that add up: a list of run folders, pooled rates per group, and two groups compared.

People compare many runs (before and after a fix, one kernel against another, a day of
traffic spread over runs): `usmlab runs`, `usmlab summary`, `usmlab compare` read the run
folders' manifest.json and report.json, never the traces. Every rate carries its count and a
95% interval (analysis/rates.py); two groups are compared with Fisher's exact test on their
pooled counts. Shapes of the JSON outputs: docs/report-schema.md, "Runs that add up".
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from usmlab.analysis.rates import rate
from usmlab.errors import InputError, UsageError
from usmlab.manifest import Manifest

# Requests judged misattributed by any of the checks (captures, tuples, the model, USM's maps).
MISATTRIBUTED_KEYS = (
    "misattributed", "misattributed_tuple", "misattributed_model", "misattributed_usm_maps",
)  # fmt: skip
GROUPINGS = ("scenario", "tracer", "target", "key")
JUDGED_OUTCOMES = ("capture-works", "misattribution")  # verdicts a pooled rate may count
POOLED_STATUSES = ("complete", "interrupted")  # runs whose requests were all judged


@dataclass(frozen=True)
class RunRow:
    run_dir: str
    started: str
    scenario: str
    target: str
    tracer: str
    key: str  # the usm-model's key, or "-"
    status: str
    outcome: str
    sent: int
    misattributed: int
    missed: int

    def group(self, by: str) -> str:
        return str(getattr(self, by))


def _object(value: Any) -> dict[str, Any]:
    """A section of a manifest or report, or {} when it is missing or not an object (an older
    or hand-edited file): one odd run makes a `?` in its line, not a failed listing."""
    return value if isinstance(value, dict) else {}


def read_run(run_dir: Path) -> RunRow:
    """One run folder's line; InputError when it is no run folder."""
    manifest = Manifest.read(run_dir)
    report: dict[str, Any] = {}
    if (run_dir / "report.json").exists():
        try:
            report = json.loads((run_dir / "report.json").read_text())
        except (OSError, ValueError):
            raise InputError(f"{run_dir / 'report.json'}: not valid JSON") from None
    if not isinstance(report, dict):
        raise InputError(f"{run_dir / 'report.json'}: expected a JSON object")
    requests = _object(report.get("requests"))
    target = manifest.get("target")
    model = _object(report.get("model")) or _object(manifest.get("model"))
    label = target if isinstance(target, str) else _object(target).get("label")
    return RunRow(
        run_dir=str(run_dir),
        started=str(manifest.get("started") or ""),
        scenario=str(manifest.get("scenario") or "?"),
        target=str(label or _object(target).get("spec") or "?"),
        tracer=str(manifest.get("tracer") or "?"),
        key=str(model.get("key") or "-"),
        status=str(manifest.get("status") or "?"),
        outcome=str(report.get("outcome") or manifest.get("outcome") or "-"),
        sent=int(requests.get("sent") or 0),
        misattributed=sum(int(requests.get(k) or 0) for k in MISATTRIBUTED_KEYS),
        missed=int(requests.get("missed") or 0),
    )


def find_runs(paths: Iterable[Path]) -> list[RunRow]:
    """Run folders named directly, or found one level below a folder that holds runs."""
    rows: list[RunRow] = []
    for path in paths:
        if not path.exists():
            raise UsageError(f"{path}: no such run folder")
        if (path / "manifest.json").exists():
            rows.append(read_run(path))
            continue
        if not path.is_dir():
            raise UsageError(f"{path} is not a run folder")
        found = sorted(p.parent for p in path.glob("*/manifest.json"))
        rows.extend(read_run(p) for p in found)
    return sorted(rows, key=lambda r: (r.started, r.run_dir))


def newest_judged(runs_dir: Path) -> Path:
    """The judged run (one with report.json) of `runs_dir` that started last: what `usmlab
    open` shows when no run is named."""
    if not runs_dir.exists():
        raise UsageError(f"{runs_dir}: no such folder (name a run folder, or run `usmlab test`)")
    judged = [r for r in find_runs([runs_dir]) if (Path(r.run_dir) / "report.json").is_file()]
    if not judged:
        raise UsageError(f"{runs_dir} holds no judged run (a run folder with report.json)")
    return Path(judged[-1].run_dir)


def runs_table(rows: list[RunRow]) -> str:
    lines = [
        f"{'started':<24} {'scenario':<22} {'target':<14} {'tracer':<20} {'outcome':<15} "
        f"{'sent':>8} {'misattr':>8} {'missed':>7}"
    ]
    for r in rows:
        # A run that did not complete shows its status: its counts cover only part of it.
        outcome = r.outcome if r.status == "complete" else r.status
        lines.append(
            f"{r.started[:23]:<24} {r.scenario:<22} {r.target:<14} {r.tracer:<20} "
            f"{outcome:<15} {r.sent:>8} {r.misattributed:>8} {r.missed:>7}"
        )
    return "\n".join(lines)


def summarize(rows: list[RunRow], by: str | None) -> list[dict[str, Any]]:
    """Pooled counts and rates per group (all runs in one group without `by`)."""
    if by is not None and by not in GROUPINGS:
        raise UsageError(f"--by {by!r}: use one of {', '.join(GROUPINGS)}")
    groups: dict[str, list[RunRow]] = {}
    for row in rows:
        groups.setdefault(row.group(by) if by else "all", []).append(row)
    return [pool(name, members) for name, members in groups.items()]


def left_out_because(row: RunRow) -> str | None:
    """Why a run's counts must not enter a pooled rate, or None when they may.

    A run with a traced verdict that completed, or that was stopped by Ctrl-C (how a `--count 0`
    run of a day ends; every request it made was judged), measured what its counts claim. A
    failed run may not have (its tracer or target may be what failed, its requests may never
    have reached a server), an abandoned one never finished, an untraced one cannot
    misattribute, a no-captures one saw nothing: pooling them would move the rate without a
    measurement behind it.
    """
    if row.status not in POOLED_STATUSES:
        return row.status
    if row.outcome not in JUDGED_OUTCOMES:
        return row.outcome
    return None


def pool(name: str, members: list[RunRow]) -> dict[str, Any]:
    counted: list[RunRow] = []
    left_out: dict[str, int] = {}
    for row in members:
        reason = left_out_because(row)
        if reason is None:
            counted.append(row)
        else:
            left_out[reason] = left_out.get(reason, 0) + 1
    sent = sum(r.sent for r in counted)
    wrong = sum(r.misattributed for r in counted)
    missed = sum(r.missed for r in counted)
    return {
        "group": name,
        "runs": len(counted),
        "left_out": dict(sorted(left_out.items())),
        "sent": sent,
        "misattributed": rate(wrong, sent),
        "missed": rate(missed, sent),
    }


def left_out_text(group: dict[str, Any]) -> str:
    return ", ".join(f"{n} {why}" for why, n in group["left_out"].items()) or "none"


def summary_table(groups: list[dict[str, Any]]) -> str:
    lines = [f"{'group':<24} {'runs':>5} {'sent':>9}  misattributed / missed  (left out)"]
    for g in groups:
        lines.append(
            f"{g['group']:<24} {g['runs']:>5} {g['sent']:>9}  {g['misattributed']['text']} / "
            f"{g['missed']['text']}  ({left_out_text(g)})"
        )
    return "\n".join(lines)


def compare(a: list[RunRow], b: list[RunRow]) -> dict[str, Any]:
    """Whether two groups' misattribution rates differ: Fisher's exact test, two-sided."""
    from scipy.stats import fisher_exact

    if not a or not b:
        raise UsageError("compare needs runs on both sides: A... -- B...")
    left, right = pool("A", a), pool("B", b)
    for side in (left, right):
        if not side["runs"]:
            raise UsageError(
                f"compare: group {side['group']} has no traced run to count "
                f"(left out: {left_out_text(side)})"
            )
    table = [
        [left["misattributed"]["count"], left["sent"] - left["misattributed"]["count"]],
        [right["misattributed"]["count"], right["sent"] - right["misattributed"]["count"]],
    ]
    _, p_value = fisher_exact(table, alternative="two-sided")
    return {"a": left, "b": right, "test": "Fisher's exact, two-sided", "p_value": float(p_value),
            "differ": bool(p_value < 0.05)}  # fmt: skip


def compare_text(result: dict[str, Any]) -> str:
    a, b = result["a"], result["b"]
    verdict = "they differ" if result["differ"] else "no significant difference"
    return (
        f"A ({a['runs']} runs; left out: {left_out_text(a)}): misattributed "
        f"{a['misattributed']['text']}\n"
        f"B ({b['runs']} runs; left out: {left_out_text(b)}): misattributed "
        f"{b['misattributed']['text']}\n"
        f"{result['test']}: p = {result['p_value']:.3g}: {verdict} (at 0.05)"
    )


def rows_json(rows: list[RunRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
