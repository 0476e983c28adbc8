"""`--tracer usm-model[:KEY[:read-socket]]`: the built-in tracer plus a MODEL of USM's Go-TLS
tuple caches, in bpftrace, on real Go runtime memory (docs/usm-model.md).

The model is not USM: it follows, on the lab's own Go client, the logic USM's eBPF code applies
to give a Go TLS write its connection tuple: a cache keyed by the `*tls.Conn` (KEY: `pointer`,
USM before the fix; `pointer-fd`, the fix's composite key with the `*netFD`; `pid-pointer`, a
key with the pid), filled on a miss from a `(pid, fd)` cache (or, `read-socket`, from the socket
itself), deleted when `(*Conn).Close` runs. At each write it prints the true tuple beside the
model's, and which cache answered; the analysis (analysis/model.py) judges the stale ones.
"""

from __future__ import annotations

from usmlab.errors import UsageError, UsmlabError
from usmlab.targets.base import Target
from usmlab.tracers import TracerContext
from usmlab.tracers.bpftrace import LINE_MAX, render_template
from usmlab.tracers.builtin import BuiltinTracer
from usmlab.tracers.go_tls import REGISTERS, check_go_binary, go_arch

# KEY -> the bpftrace map key of the conn cache.
KEYS = {"pointer": "$c", "pointer-fd": "$c, $netfd", "pid-pointer": "pid, $c"}
DEFAULT_KEY = "pointer"
READ_SOCKET = "read-socket"


def parse_model_spec(spec: str) -> tuple[str, bool]:
    """(KEY, whether the (pid, fd) cache is used) from `usm-model[:KEY[:read-socket]]`."""
    parts = spec.split(":")
    key = parts[1] if len(parts) > 1 and parts[1] else DEFAULT_KEY
    extra = parts[2:]
    if parts[0] != "usm-model" or key not in KEYS or extra not in ([], [READ_SOCKET]):
        keys = ", ".join(KEYS)
        raise UsageError(
            f"unknown tracer {spec!r}: use usm-model[:KEY[:{READ_SOCKET}]], KEY one of {keys}"
        )
    return key, not extra


class UsmModelTracer(BuiltinTracer):
    name = "usm-model"

    def __init__(self, spec: str = "usm-model") -> None:
        self.key, self.fd_cache = parse_model_spec(spec)

    def go_probes(self, ctx: TracerContext, target: Target) -> str:
        if not ctx.go_binaries:
            raise UsmlabError(
                "the usm-model tracer models USM's Go-TLS caches: run the Go client (--client go)"
            )
        for binary in ctx.go_binaries:
            check_go_binary(target, binary)
        arch = go_arch(str(ctx.facts["machine"]))
        return render_template(
            "usm_model.bt.j2",
            run_id=ctx.run_id, binaries=list(dict.fromkeys(ctx.go_binaries)),
            regs=REGISTERS[arch], key=KEYS[self.key], key_name=self.key,
            fd_cache=self.fd_cache, line_max=LINE_MAX,
        )  # fmt: skip

    def manifest_facts(self) -> dict[str, object]:
        return {"model": {"key": self.key, "fd_cache": self.fd_cache}}
