"""`usmlab test SCENARIO --sweep PARAM=V1,V2,...`: one run per setting, then a table of rates.

A hypothesis is settled by how a rate moves with one parameter (address reuse and stale tuples
against the share of bodies left unclosed, say). Each setting is a complete run with its own run
folder, on the same target, one after the other; the table puts their verdicts side by side,
every rate with its count and 95% interval (analysis/rates.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from usmlab.errors import UsageError
from usmlab.run.pipeline import LabRun, RunResult
from usmlab.scenarios import Params, parse_duration


@dataclass
class SweepPoint:
    value: Any
    result: RunResult


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """`skip_close=0,0.1,0.3` (or `skip-close=...`) -> ("skip_close", [0.0, 0.1, 0.3]), each value
    converted to the parameter's type."""
    name, sep, values = text.partition("=")
    field = name.strip().replace("-", "_")
    kinds = {f.name: f for f in dataclasses.fields(Params)}
    if not sep or field not in kinds or field in ("url", "paths", "servers"):
        settable = ", ".join(n for n in kinds if n not in ("url", "paths", "servers"))
        raise UsageError(
            f"malformed --sweep {text!r}: use PARAM=V1,V2 with PARAM one of {settable}"
        )
    default = getattr(Params(), field)
    parsed: list[Any] = []
    for raw in (v.strip() for v in values.split(",") if v.strip()):
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                parsed.append(raw.lower() in ("true", "1"))
            elif isinstance(default, int):
                parsed.append(int(raw))
            elif field in ("interval", "duration", "restart_after", "preexisting"):
                parsed.append(parse_duration(raw, field))
            elif isinstance(default, float):
                parsed.append(float(raw))
            else:
                parsed.append(raw)
        except ValueError:
            raise UsageError(f"malformed --sweep value {raw!r} for {field}") from None
    if len(parsed) < 2:
        raise UsageError(f"--sweep {text!r} needs at least two values")
    return field, parsed


def sweep_params(params: Params, field: str, values: list[Any]) -> list[Params]:
    """The parameters of every run, each validated before any run starts."""
    return [dataclasses.replace(params, **{field: value}).validate() for value in values]


def run_sweep(
    make_run: Callable[[Params], LabRun], params: list[Params], field: str
) -> list[SweepPoint]:
    """Run each setting in turn; an interrupted run ends the sweep (its files are kept)."""
    points = []
    for p in params:
        result = make_run(p).execute()
        points.append(SweepPoint(getattr(p, field), result))
        if result.status == "interrupted":
            break
    return points


def sweep_table(field: str, points: list[SweepPoint]) -> str:
    """One line per setting: outcome, sent, and (usm-model runs) stale tuples and reuse."""
    lines = [f"{field:<14} {'outcome':<15} {'sent':>7}  stale tuples / address reuse (usm-model)"]
    for point in points:
        report = point.result.report
        sent = report.requests.get("sent", 0) if report else 0
        outcome = report.outcome if report else point.result.status
        model = report.model if report else None
        rates = (
            f"{model['requests']['stale_tuple']['text']} / {model['reused_addresses']['text']}"
            if model
            else "-"
        )
        lines.append(f"{point.value!s:<14} {outcome:<15} {sent:>7}  {rates}")
    return "\n".join(lines)
