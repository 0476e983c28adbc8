"""`--tracer usm-model[:KEY[:read-socket]]`: the built-in tracer plus a MODEL of USM's Go-TLS
tuple caches, in bpftrace, on real Go runtime memory (docs/usm-model.md); with no Go program in
the run, a model of its OpenSSL cache (`ssl_sock_by_ctx`) on the Python clients' libssl.

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
from usmlab.tracers.builtin import SET_FD, BuiltinTracer
from usmlab.tracers.go_tls import REGISTERS, check_go_binary, go_arch

# KEY -> the bpftrace map key of the conn cache.
KEYS = {"pointer": "$c", "pointer-fd": "$c, $netfd", "pid-pointer": "pid, $c"}
# The OpenSSL cache's keys: the SSL* alone (USM before its pid_tgid key), or with the pid.
OPENSSL_KEYS = {"pointer": "$c", "pid-pointer": "pid, $c"}
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


def check_openssl_spec(key: str, fd_cache: bool) -> None:
    """A usm-model spec for a run with no Go program (the OpenSSL cache is modelled)."""
    if key not in OPENSSL_KEYS:
        raise UsageError(
            f"usm-model:{key} is a Go-TLS key; USM's OpenSSL cache is keyed by "
            f"{' or '.join(OPENSSL_KEYS)} (or run the Go client, --client go)"
        )
    if not fd_cache:
        raise UsageError(f"usm-model:...:{READ_SOCKET} is for Go's (pid, fd) cache")


class UsmModelTracer(BuiltinTracer):
    name = "usm-model"

    def __init__(self, spec: str = "usm-model") -> None:
        self.key, self.fd_cache = parse_model_spec(spec)
        self.library = "go"  # or "openssl": which of USM's caches is modelled (extra_probes)

    def extra_probes(
        self, ctx: TracerContext, target: Target, functions: dict[str, list[str]]
    ) -> str:
        if not ctx.go_binaries:
            return self.openssl_probes(ctx, functions)
        self.library = "go"
        for binary in ctx.go_binaries:
            check_go_binary(target, binary)
        arch = go_arch(str(ctx.facts["machine"]))
        return render_template(
            "usm_model.bt.j2",
            run_id=ctx.run_id, binaries=list(dict.fromkeys(ctx.go_binaries)),
            regs=REGISTERS[arch], key=KEYS[self.key], key_name=self.key,
            fd_cache=self.fd_cache, line_max=LINE_MAX,
        )  # fmt: skip

    def openssl_probes(self, ctx: TracerContext, functions: dict[str, list[str]]) -> str:
        """No Go program in the run: model USM's OpenSSL cache on the libssl the clients use."""
        check_openssl_spec(self.key, self.fd_cache)
        usable = {lib: names for lib, names in functions.items() if SET_FD in names}
        if not usable:
            raise UsmlabError(
                "the usm-model tracer's OpenSSL model needs SSL_set_fd in the clients' libssl"
            )
        self.library = "openssl"
        return render_template(
            "usm_model_openssl.bt.j2",
            run_id=ctx.run_id, libraries=sorted(usable), functions=usable,
            key=OPENSSL_KEYS[self.key], key_name=self.key,
        )  # fmt: skip

    def manifest_facts(self) -> dict[str, object]:
        return {"model": {"key": self.key, "fd_cache": self.fd_cache, "library": self.library}}
