"""report.html: one self-contained page per run folder, the verdict first (docs/report-schema.md).

A timeline (matplotlib, SVG inlined: the page loads nothing from anywhere) puts each request on
its client's lane and each served request on its server's lane, coloured by what the verdict
says of it (captured, misattributed, missed, failed), with the tracer's attach and respawned
processes marked; then the per-server table, the misattributed and missed requests with their
evidence, the extra checks (tuples, the model, USM's maps) and the manifest's facts.

Drawing takes matplotlib's half-second import, so a run writes its page in a process of its own
after it returns (`write_html_later`); `usmlab open` writes it at once when it is not there yet.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jinja2

from usmlab.analysis.report import status_note
from usmlab.jsonlines import read_jsonl
from usmlab.manifest import Manifest

TEMPLATE_DIR = Path(__file__).resolve().parent
COLORS = {
    "captured": "#2a9d8f", "misattributed": "#d62828", "missed": "#f4a261", "failed": "#6c757d",
    "served": "#457b9d",
}  # fmt: skip
OK_POINTS = 3000  # at most this many unremarkable marks are drawn; every bad one always is


def _status(record: dict[str, Any], misattributed: set[int], missed: set[int]) -> str:
    if record.get("error") is not None:
        return "failed"
    if record.get("seq") in misattributed:
        return "misattributed"
    if record.get("seq") in missed:
        return "missed"
    return "captured"


def _pyplot() -> Any:
    """matplotlib's pyplot, drawing SVG (imported here: half a second, only for pages)."""
    import matplotlib

    matplotlib.use("svg")
    import matplotlib.pyplot as plt

    return plt


def _svg(plt: Any, fig: Any) -> str:
    """The figure as an <svg> element to inline in a page."""
    fig.tight_layout()
    out = io.StringIO()
    fig.savefig(out, format="svg")
    plt.close(fig)
    svg = out.getvalue()
    return svg[svg.index("<svg") :]


def timeline_svg(run_dir: Path, manifest: Manifest, report: dict[str, Any]) -> str:
    """The run's timeline as an SVG document (a string)."""
    plt = _pyplot()

    misattributed = {m.get("seq") for m in report.get("misattributed_requests") or []}
    for section in (report.get("model") or {}).get("requests") or {}, report.get("usm_maps") or {}:
        misattributed |= {e.get("seq") for e in section.get("examples") or []}
    missed = set(report.get("missed_requests") or [])
    lanes: list[tuple[str, list[tuple[float, str]]]] = []
    for role in ("client", "server"):
        for log in manifest.logs(role):
            points = [
                (float(r.get("start_mono") or r.get("mono") or 0.0),
                 _status(r, misattributed, missed) if role == "client" else "served")
                for r in read_jsonl(log)
            ]  # fmt: skip
            lanes.append((log.stem, points))
    starts = [t for _, points in lanes for t, _ in points if t]
    t0 = min(starts) if starts else 0.0
    fig, ax = plt.subplots(figsize=(11, 0.55 * max(2, len(lanes)) + 1.2))
    for y, (_, points) in enumerate(lanes):
        by_status: dict[str, list[float]] = {}
        for t, status in points:
            by_status.setdefault(status, []).append(t - t0)
        for status, xs in by_status.items():
            if status in ("captured", "served") and len(xs) > OK_POINTS:
                xs = xs[:: len(xs) // OK_POINTS + 1]
            ax.scatter(xs, [y] * len(xs), s=9 if status in ("captured", "served") else 28,
                       c=COLORS[status], label=status, marker="|" if status == "served" else "o",
                       linewidths=1)  # fmt: skip
    attached = manifest.get("tracer_attached_mono")
    if isinstance(attached, int | float) and starts:
        ax.axvline(
            attached - t0, color="#222", linestyle="--", linewidth=1, label="tracer attached"
        )
    for name, points in lanes:
        if "-r" in name and points:  # a respawned process: where it started
            ax.axvline(points[0][0] - t0, color="#9d4edd", linewidth=0.8, label="restart")
    ax.set_yticks(range(len(lanes)), [name for name, _ in lanes])
    ax.set_xlabel("seconds since the first request")
    lost = report.get("lost_events") or 0
    ax.set_title(f"{manifest.get('scenario', '')}: {report.get('outcome', '')}"
                 + (f"  ({lost} trace events LOST)" if lost else ""))  # fmt: skip
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=False))
    ax.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.0, 1.0),
              fontsize=8)  # fmt: skip
    ax.grid(axis="x", alpha=0.3)
    return _svg(plt, fig)


def render_html(run_dir: Path) -> str:
    manifest = Manifest.read(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    env = jinja2.Environment(
        # Reports of older versions lack newer sections: a missing one is simply not shown.
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True,
        undefined=jinja2.ChainableUndefined,
    )  # fmt: skip
    facts = {
        k: manifest.get(k)
        for k in ("run_id", "scenario", "goal", "status", "started", "ended", "tracer",
                  "trace_clock", "start_order", "usmlab_version")
    }  # fmt: skip
    return env.get_template("report.html.j2").render(
        report=report, manifest=manifest, facts=facts, target=manifest.get("target") or {},
        timeline=timeline_svg(run_dir, manifest, report), colors=COLORS,
        parameters=manifest.get("parameters") or {},
        status_note=status_note(manifest.get("status")),
        run_error=manifest.get("error"),
    )  # fmt: skip


def write_html(run_dir: Path) -> Path:
    path = run_dir / "report.html"
    tmp = run_dir / ".report.html.tmp"
    tmp.write_text(render_html(run_dir), encoding="utf-8")
    os.replace(tmp, path)
    return path


def summary_html(groups: list[dict[str, Any]], title: str) -> str:
    """summary.html: the pooled misattribution rate of each group with its 95% interval."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(8, 0.5 * max(2, len(groups)) + 1.2))
    for y, group in enumerate(groups):
        wrong = group["misattributed"]
        if wrong["ci95"] is None:
            continue
        low, high = wrong["ci95"]
        ax.errorbar([wrong["rate"]], [y], xerr=[[wrong["rate"] - low], [high - wrong["rate"]]],
                    fmt="o", color=COLORS["misattributed"], capsize=4)  # fmt: skip
    ax.set_yticks(range(len(groups)), [g["group"] for g in groups])
    ax.set_xlabel("misattributed requests (rate, 95% interval)")
    ax.set_xlim(left=0)
    ax.grid(axis="x", alpha=0.3)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True)
    return env.get_template("summary.html.j2").render(
        groups=groups, plot=_svg(plt, fig), title=title
    )


HTML_WRITER_PID = ".report-html.pid"


def write_html_later(run_dir: Path) -> None:
    """Write report.html in a process of its own: the run returns without waiting for it. Its
    pid is kept in the run folder, for whoever must wait for it (`html_written`)."""
    with open(run_dir / ".report-html.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "usmlab.analysis.html", str(run_dir)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
    (run_dir / HTML_WRITER_PID).write_text(f"{proc.pid}\n")


def html_written(run_dir: Path, timeout: float = 30.0) -> bool:
    """Wait until the run's report.html writer has ended (benchmarks and tests: it takes a
    core for a second or two, which the next measurement should not share)."""
    try:
        pid = int((run_dir / HTML_WRITER_PID).read_text())
    except (OSError, ValueError):
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:  # a zombie has an empty command line; another process may have taken the pid
            if b"usmlab.analysis.html" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


if __name__ == "__main__":
    write_html(Path(sys.argv[1]))
