"""What every bpftrace program of usmlab shares: the attached mark, the line size, rendering.

The built-in tracer's OpenSSL probes (`builtin.py`) and its Go probes (`go_tls.py`) are two
templates of one program; both take these from here. See docs/tracers.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jinja2

from usmlab.manifest import run_tag

TEMPLATE_DIR = Path(__file__).resolve().parent
LINE_MAX = 160  # bytes of the first plaintext line kept; a lab request line is under 100
# Printed by BEGIN with CLOCK_MONOTONIC in ns: BEGIN runs once every probe is attached.
ATTACHED_MARK = "USMLAB_TRACER_ATTACHED"
# bpftrace's default string size is 64 bytes: enough for a whole request line, with margin.
STRLEN_ENV = {"BPFTRACE_STRLEN": str(LINE_MAX + 8)}

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


def render_template(name: str, **values: Any) -> str:
    """One of this folder's `.bt.j2` templates, rendered (a missing value is an error)."""
    if "run_id" in values:
        values.setdefault("run_tag", run_tag(str(values["run_id"])))
    return _ENV.get_template(name).render(**values)


def with_end(program: str) -> str:
    """program plus the one END probe bpftrace allows, clearing every map the parts use.

    The templates (OpenSSL, Go, the USM model) are pieces of one program and cannot each have
    an END; without one, bpftrace prints every map left at exit into the tracer's log.
    """
    maps = sorted(set(re.findall(r"@usmlab_\w+", program)))
    if not maps:
        return program
    clears = "".join(f"  clear({name});\n" for name in maps)
    return f"{program}\nEND\n{{\n{clears}}}\n"
