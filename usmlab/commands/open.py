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
    from usmlab.analysis.runs import newest_judged

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
