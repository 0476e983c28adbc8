"""bpftrace probes on Go's crypto/tls, next to the built-in tracer's OpenSSL probes.

The misattribution seen in production was Go-TLS traffic (docs/background.md), which a libssl probe
never sees. These probes hook `crypto/tls.(*Conn).Write` and `.Read` at function entry in a Go
binary and print the built-in tracer's own line format, so one analysis reads both. Go passes
arguments in registers (ABIInternal: amd64 since Go 1.17, arm64 since Go 1.18), not where C code
has them, and a uretprobe on Go code breaks when the runtime moves a goroutine's stack: entry
only, with registers named per architecture.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from usmlab.arch import AMD64, ARM64, require_arch
from usmlab.errors import UsmlabError
from usmlab.targets.base import Target
from usmlab.tracers.bpftrace import ATTACHED_MARK, LINE_MAX, render_template

GO_WRITE = "crypto/tls.(*Conn).Write"
GO_READ = "crypto/tls.(*Conn).Read"
# The probe spec is `uprobe:PATH:"symbol"`: a path with quotes, spaces or colons cannot be written.
SAFE_PATH = re.compile(r"/[A-Za-z0-9._+/-]+")


@dataclass(frozen=True)
class GoRegisters:
    """bpftrace `reg()` names of the first three integer arguments of a Go method."""

    conn: str  # the *tls.Conn receiver
    buf: str  # b's data pointer
    len: str  # len(b)


REGISTERS = {
    AMD64.go: GoRegisters(conn="ax", buf="bx", len="cx"),  # RAX, RBX, RCX
    ARM64.go: GoRegisters(conn="r0", buf="r1", len="r2"),  # X0, X1, X2
}


def go_arch(machine: str) -> str:
    """`amd64`/`arm64` from `uname -m` or GOARCH spelling; UsmlabError for anything else."""
    arch = require_arch(machine, "architecture for the Go TLS probes").go
    if arch not in REGISTERS:
        raise UsmlabError(f"no Go TLS probes for architecture {machine!r}")
    return arch


def _check_paths(binaries: list[str]) -> None:
    if not binaries:
        raise UsmlabError("no Go binary given for the Go TLS probes")
    for binary in binaries:
        if not SAFE_PATH.fullmatch(binary):
            raise UsmlabError(
                f"cannot probe {binary!r}: use an absolute path of letters, digits and ._+-/"
            )


def _render(
    run_id: str,
    binaries: list[str],
    arch: str,
    *,
    with_begin: bool,
    read_calls: bool,
    line_max: int,
) -> str:
    _check_paths(binaries)
    goarch = go_arch(arch)
    return render_template(
        "go_tls.bt.j2",
        run_id=run_id,
        binaries=list(dict.fromkeys(binaries)),
        arch=goarch,
        regs=REGISTERS[goarch],
        line_max=line_max,
        read_calls=read_calls,
        with_begin=with_begin,
        attached_mark=ATTACHED_MARK,
    )


def render_go_probes(
    run_id: str,
    binaries: list[str],
    arch: str,
    *,
    with_begin: bool = False,
    read_calls: bool = True,
    line_max: int = LINE_MAX,
) -> str:
    """The Go probe blocks, to append to the built-in OpenSSL program; `with_begin` makes them
    a complete program of their own, with the tracer's attached mark."""
    return _render(
        run_id, binaries, arch, with_begin=with_begin, read_calls=read_calls, line_max=line_max
    )


def go_tls_functions(target: Target, binary: str) -> list[str]:
    """Which of the probed crypto/tls methods `binary` has, as bpftrace itself lists them.

    A stripped binary (`-ldflags=-s`) or one that does not use crypto/tls has none, and bpftrace
    refuses to start when a probed symbol is missing.
    """
    _check_paths([binary])
    listing = target.run(
        ["bpftrace", "-l", f"uprobe:{binary}:crypto/tls.*"], sudo=True, check=False
    )
    found = {line.rsplit(":", 1)[-1].strip() for line in listing.stdout.splitlines()}
    return [name for name in (GO_WRITE, GO_READ) if name in found]


def check_go_binary(target: Target, binary: str) -> None:
    """Fail with one clear line unless both probed methods are in `binary`'s symbol table."""
    found = go_tls_functions(target, binary)
    missing = [name for name in (GO_WRITE, GO_READ) if name not in found]
    if missing:
        raise UsmlabError(
            f"{binary} has no symbol {missing[0]} (not a Go crypto/tls program, or stripped)"
        )
