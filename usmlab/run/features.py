"""Scenario behaviours as features that plug into the run's stages.

A scenario is data (`usmlab/scenarios.py`); what makes one run differ from another is the set of
features its parameters switch on. Each feature overrides only the hooks it needs (the hooks:
`context.Feature`); the stages
call every feature's hook at its place, so the runner never asks which scenario it runs. A new
behaviour is one small class here plus one line in `FEATURES`. See docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable

from usmlab.analysis.model import conn_log_name
from usmlab.run.context import Feature, RunContext, Started
from usmlab.run.signals import held_signals
from usmlab.run.stages import start_clients, start_server
from usmlab.scenarios import Params, check_url
from usmlab.targets.base import term_then_kill

# A restart is a crash-like stop: SIGTERM, as Kubernetes sends, then SIGKILL.
RESTART_STOP = term_then_kill(3.0)


class EphemeralPortServer(Feature):
    """The server listens inside ip_local_port_range (the direction heuristic's blind spot)."""

    def plan(self, ctx: RunContext) -> None:
        from usmlab.run.nat import ephemeral_port

        ctx.server_ports = [ephemeral_port(ctx.target, ctx.kit_dir)]
        ctx.progress(f"server: port {ctx.server_ports[0]} is inside the ephemeral port range")


def _build_go(ctx: RunContext, role: str) -> str:
    """Build the Go client or server on the target; the manifest records what was built."""
    from usmlab.kit import GO_CLIENT_DIR, GO_SERVER_DIR
    from usmlab.run.go_build import build_go_program

    ctx.progress(f"{role}: building the Go {role} for the target")
    source = GO_CLIENT_DIR if role == "client" else GO_SERVER_DIR
    machine = ctx.facts.machine if ctx.facts else ""
    build = build_go_program(
        ctx.target, ctx.kit_dir, source, f"go_{role}", ctx.kit(f"go{role}"), machine
    )
    ctx.manifest[f"go_{role}"] = dict(build)
    return build["path"]


class GoClient(Feature):
    """The Go crypto/tls client, built on the target (kit/go_client/)."""

    def plan(self, ctx: RunContext) -> None:
        ctx.go_client = _build_go(ctx, "client")

    def client_program(self, ctx: RunContext, argv: list[str]) -> list[str]:
        assert ctx.go_client is not None
        return [ctx.go_client]

    def client_flags(self, ctx: RunContext, name: str, flags: list[str]) -> list[str]:
        # Its connections' addresses and tls.Conn closes: the model's independent check.
        return [*flags, "--conn-log", ctx.remote(conn_log_name(name))]


class PythonClientEvidence(Feature):
    """The Python client under the usm-model tracer: its connections' opens and closes with
    their SSL* addresses (the OpenSSL model's independent check), and, for `--same-layout`,
    address randomization off."""

    def client_flags(self, ctx: RunContext, name: str, flags: list[str]) -> list[str]:
        if (ctx.tracer_name or "").startswith("usm-model"):
            flags = [*flags, "--conn-log", ctx.remote(conn_log_name(name))]
        return [*flags, "--same-layout"] if ctx.params.same_layout else flags


class GoServer(Feature):
    """The Go server (kit/go_server), built on the target: the repro's servers were Go's."""

    def plan(self, ctx: RunContext) -> None:
        ctx.go_server = _build_go(ctx, "server")

    def server_program(self, ctx: RunContext, argv: list[str]) -> list[str]:
        assert ctx.go_server is not None
        return [ctx.go_server]


class SeveralClients(Feature):
    """Several client processes, each with paths of its own, so a capture names its client."""

    def client_paths(self, ctx: RunContext, index: int, paths: tuple[str, ...]) -> tuple[str, ...]:
        n = index + 1
        return (
            f"/api/v1/namespaces/client-{n}/configmaps",
            f"/api/v1/namespaces/client-{n}/pods",
            f"/api/v1/persistentvolumes/pvc-client-{n}",
        )


class Nat(Feature):
    """The client calls a loopback virtual address DNAT'ed to the (first) server."""

    def servers_started(self, ctx: RunContext) -> None:
        from usmlab.run.nat import NatRule

        params = ctx.params
        assert params.nat_vip is not None
        vip_host, vip_port = check_url(f"https://{params.nat_vip}")
        to = f"{params.host}:{ctx.server_ports[0]}"
        with held_signals():
            rule = NatRule.add(
                ctx.target, ctx.kit_dir, ctx.remote_dir, ctx.run_id,
                vip_host, vip_port, params.host, ctx.server_ports[0],
            )  # fmt: skip
            ctx.registry.add(Started("nat", "nat", stop=rule.remove))
        ctx.manifest["nat"] = {"vip": params.nat_vip, "to": to}
        ctx.progress(f"nat: {params.nat_vip} -> {to}")

    def client_urls(self, ctx: RunContext, urls: list[str]) -> list[str]:
        return [f"https://{ctx.params.nat_vip}"]

    def client_flags(self, ctx: RunContext, name: str, flags: list[str]) -> list[str]:
        # The lab certificate does not name a virtual address: no --cacert.
        i = flags.index("--cacert")
        return flags[:i] + flags[i + 2 :]


class Preexisting(Feature):
    """Traffic that starts before the tracer attaches."""

    start_order = "traffic-first"

    def lead_time(self, ctx: RunContext) -> None:
        ctx.progress(f"traffic: running {ctx.params.preexisting:g} s before the tracer attaches")
        ctx.sleep(ctx.params.preexisting)


class Restart(Feature):
    """Kill and respawn (new PIDs) mid-traffic, as a CronJob restart does in production."""

    def __init__(self) -> None:
        self.done = False

    def tick(self, ctx: RunContext, elapsed: float) -> None:
        params = ctx.params
        if self.done or elapsed < params.restart_after:
            return
        self.done = True
        remaining = None
        if params.duration is not None:
            remaining = max(0.5, params.duration - elapsed)
        ctx.restarts += 1
        suffix = f"-r{ctx.restarts}"
        if params.restart in ("server", "both"):
            servers = [
                e for e in ctx.registry.entries
                if e.role == "server" and e.proc is not None and not e.retired
            ]  # fmt: skip
            stopping = [e.proc for e in servers if e.proc]
            ctx.registry.retire(stopping)
            ctx.target.stop_many(stopping, RESTART_STOP)
            for entry in servers:
                assert entry.port is not None
                start_server(ctx, f"{entry.name.split('-r')[0]}{suffix}", entry.port)
        if params.restart in ("client", "both"):
            ctx.registry.retire(ctx.clients)
            ctx.target.stop_many(ctx.clients, RESTART_STOP)
            start_clients(ctx, remaining, suffix)
        ctx.progress(f"restart: {params.restart} respawned with new PIDs")


# Which features a run's parameters switch on, in the order their hooks run.
FEATURES: tuple[tuple[Callable[[Params], bool], Callable[[], Feature]], ...] = (
    (lambda p: p.ephemeral_server, EphemeralPortServer),
    (lambda p: p.client == "go", GoClient),
    (lambda p: p.client == "python", PythonClientEvidence),
    (lambda p: p.server == "go", GoServer),
    (lambda p: p.clients > 1, SeveralClients),
    (lambda p: p.nat_vip is not None, Nat),
    (lambda p: p.preexisting > 0, Preexisting),
    (lambda p: p.restart is not None, Restart),
)


def features_for(params: Params) -> list[Feature]:
    return [make() for wanted, make in FEATURES if wanted(params)]
