"""Rates people can trust: every rate with its count and a 95% interval (docs/report-schema.md).

Intervals come from scipy's exact binomial test (Clopper-Pearson). With no event at all, the
two-sided interval is replaced by the one-sided 95% upper bound ("0 of 132,659: < 2.3e-5"),
which is what such a run can claim.
"""

from __future__ import annotations

from typing import Any


def _short(value: float) -> str:
    """2.258e-05 -> 2.3e-5, 0.0125 -> 0.012: two significant digits, no exponent padding."""
    text = f"{value:.2g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def rate(count: int, of: int) -> dict[str, Any]:
    """{count, of, rate, ci95: [low, high], text} for `count` events in `of` trials."""
    if of <= 0:
        return {"count": count, "of": of, "rate": None, "ci95": None, "text": f"{count} of 0"}
    from scipy.stats import binomtest  # a second's import: only for reports that need a rate

    if count == 0:
        high = float(binomtest(0, of, alternative="less").proportion_ci(0.95).high)
        return {
            "count": 0, "of": of, "rate": 0.0, "ci95": [0.0, high],
            "text": f"0 of {of:,}: < {_short(high)}",
        }  # fmt: skip
    ci = binomtest(count, of).proportion_ci(0.95, method="exact")
    low, high = float(ci.low), float(ci.high)
    return {
        "count": count, "of": of, "rate": count / of, "ci95": [low, high],
        "text": f"{count:,} of {of:,}: {_short(count / of)} (95% CI {_short(low)}-{_short(high)})",
    }  # fmt: skip
