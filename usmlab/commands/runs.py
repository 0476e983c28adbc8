"""`usmlab runs`, `usmlab summary`, `usmlab compare`: runs that add up (analysis/runs.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand

from usmlab.commands import JsonOption, friendly, say
from usmlab.errors import UsageError


class KeepsSeparator(TyperCommand):
    """`compare A... -- B...`: the parser drops `--`; the command needs to know where it was."""

    def parse_args(self, ctx, args):  # type: ignore[no-untyped-def]
        ctx.meta["raw_args"] = list(args)
        return super().parse_args(ctx, args)


@friendly
def runs_cmd(
    runs_dir: Annotated[Path, typer.Argument(help="A folder of run folders.")] = Path("runs"),
    as_json: JsonOption = False,
) -> None:
    """One line per run: when, scenario, target, tracer, outcome, sent, misattributed, missed."""
    from usmlab.analysis.runs import find_runs, rows_json, runs_table

    rows = find_runs([runs_dir])
    print(json.dumps(rows_json(rows), indent=2) if as_json else runs_table(rows))


@friendly
def summary_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Run folders, or folders of them.")],
    by: Annotated[
        str | None, typer.Option(help="Group by scenario, tracer, target or key (usm-model).")
    ] = None,
    as_json: JsonOption = False,
    html: Annotated[
        Path, typer.Option(help="Also write the table and a plot of the rates here.")
    ] = Path("summary.html"),
) -> None:
    """Pooled counts and rates, with 95% intervals, over many runs (per group with --by)."""
    from usmlab.analysis.html import summary_html
    from usmlab.analysis.runs import find_runs, summarize, summary_table

    groups = summarize(find_runs(runs), by)
    print(json.dumps(groups, indent=2) if as_json else summary_table(groups))
    html.write_text(summary_html(groups, f"by {by}" if by else "all runs"), encoding="utf-8")
    say(f"summary page: {html}")


@friendly
def compare_cmd(
    ctx: typer.Context,
    runs: Annotated[list[Path], typer.Argument(help="A... -- B...: run folders of each group.")],
    as_json: JsonOption = False,
) -> None:
    """Whether two groups of runs differ in misattribution (Fisher's exact test)."""
    from usmlab.analysis.runs import compare, compare_text, find_runs

    raw = [a for a in ctx.meta.get("raw_args", []) if a != "--json"]
    if "--" not in raw:
        raise UsageError("compare takes two groups: usmlab compare A... -- B...")
    cut = raw.index("--")
    result = compare(find_runs(map(Path, raw[:cut])), find_runs(map(Path, raw[cut + 1 :])))
    print(json.dumps(result, indent=2) if as_json else compare_text(result))
