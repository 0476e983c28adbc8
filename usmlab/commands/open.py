"""`usmlab open [RUN]`: a run's report.html in a browser, or its path when there is none.

RUN is a run folder, or a folder of runs (default `./runs`, where `usmlab test` puts them) whose
newest judged run is meant: right after `usmlab test`, `usmlab open` shows that run.
"""

from __future__ import annotations

import os
import shutil
import webbrowser
from pathlib import Path
from typing import Annotated

import typer

from usmlab.commands import friendly
from usmlab.errors import UsageError


def newest_judged(runs_dir: Path) -> Path:
    """The run folder under `runs_dir` (or `runs_dir` itself) with the newest report.json."""
    from usmlab.analysis.runs import find_runs

    if not runs_dir.exists():
        raise UsageError(f"{runs_dir}: no such folder (name a run folder, or run `usmlab test`)")
    judged = [r for r in find_runs([runs_dir]) if (Path(r.run_dir) / "report.json").is_file()]
    if not judged:
        raise UsageError(f"{runs_dir} holds no judged run (a run folder with report.json)")
    return Path(judged[-1].run_dir)


@friendly
def open_cmd(
    run_dir: Annotated[
        Path,
        typer.Argument(help="A run folder, or a folder of runs (its newest). Default: ./runs."),
    ] = Path("runs"),
    no_browser: Annotated[
        bool, typer.Option("--no-browser", help="Print the page's path, open nothing.")
    ] = False,
) -> None:
    """Open a run's report.html (written now if it is missing or older than report.json)."""
    from usmlab.analysis.html import write_html

    if not (run_dir / "manifest.json").exists():
        run_dir = newest_judged(run_dir)
    report = run_dir / "report.json"
    if not report.is_file():
        raise UsageError(f"{run_dir} has no report.json: not a judged run folder")
    page = run_dir / "report.html"
    if not page.exists() or page.stat().st_mtime < report.stat().st_mtime:
        page = write_html(run_dir)
    shown = False
    has_display = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    if not no_browser and (has_display or shutil.which("open") or os.environ.get("BROWSER")):
        shown = webbrowser.open(page.resolve().as_uri())
    print(page.resolve() if not shown else f"opened {page.resolve()}")
