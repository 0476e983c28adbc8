"""The run pipeline on a FakeTarget: stage order, teardown order, interruption at every stage,
the registry's stop order. No root, no processes: milliseconds per run."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_target import FakeTarget

from usmlab import tracers
from usmlab.run.pipeline import PREPARE, STAGES, START_ORDERS, LabRun
from usmlab.scenarios import get_scenario
from usmlab.targets.base import BackgroundProcess, Target
from usmlab.tracers import Tracer, TracerContext


class AttachFirstTracer(Tracer):
    """A tracer double that, like usm-debugger, finds processes only as they start."""

    name = "attach-first-double"
    traces_running_processes = False

    def start(self, target: Target, ctx: TracerContext) -> BackgroundProcess:
        return target.start(["tracer"], name="tracer", stdout_path=f"{ctx.run_dir}/tracer.log")

    def attached(self, target: Target, ctx: TracerContext, proc: BackgroundProcess) -> bool:
        return True


def lab_run(tmp_path: Path, scenario: str = "scenario1", tracer: str = "builtin", **kw) -> tuple:
    target = FakeTarget(tmp_path / "work", **kw.pop("target", {}))
    target.lifeline_pid = lambda: 4242  # type: ignore[method-assign]
    params = get_scenario(scenario).with_overrides(**kw.pop("params", {}))
    run = LabRun(
        target, get_scenario(scenario), params, runs_dir=tmp_path / "runs", tracer=tracer,
        state_dir=tmp_path / "state", **kw,
    )  # fmt: skip
    return target, run


@pytest.fixture
def attach_first(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(
        tracers.TRACERS, "attach-first-double", f"{__name__}:{AttachFirstTracer.__name__}"
    )
    return "attach-first-double"


def test_builtin_tracer_order_starts_the_server_while_probes_attach(tmp_path: Path) -> None:
    target, run = lab_run(tmp_path)
    result = run.execute()
    assert result.status == "complete", result.error
    assert result.manifest["start_order"] == "server-during-attach"
    assert target.started() == ["capture", "tracer", "sampler", "server", "client"]


def test_a_tracer_that_finds_processes_as_they_start_is_attached_before_the_server(
    tmp_path: Path, attach_first: str
) -> None:
    target, run = lab_run(tmp_path, tracer=attach_first)
    messages: list[str] = []
    run.ctx.progress = messages.append
    result = run.execute()
    assert result.manifest["start_order"] == "attach-first"
    said = "\n".join(messages)
    assert said.index("attached") < said.index("server: ready")
    assert target.started() == ["capture", "tracer", "sampler", "server", "client"]


def test_preexisting_traffic_starts_before_any_observer(tmp_path: Path) -> None:
    target, run = lab_run(tmp_path, "preexisting", params={"preexisting": 0.05, "duration": 1.0})
    result = run.execute()
    assert result.manifest["start_order"] == "traffic-first"
    started = target.started()
    assert started == ["server", "client", "capture", "tracer", "sampler"]


def test_teardown_stops_by_stage_and_removes_the_marker_last(tmp_path: Path) -> None:
    target, run = lab_run(tmp_path, tracer="none", params={"servers": (8443, 9443)})
    result = run.execute()
    assert result.status == "complete", result.error
    # The clients ended on their own; the servers (a stage stops in reverse start order), then
    # the sampler (no tracer).
    assert target.first_signals() == ["server-9443", "server-8443", "sampler"]
    runs = [e for e in target.events if e[0] == "run"]
    assert runs[-1] == ("run", "rm", "-f")  # the run marker goes after every process


def test_the_tracer_is_told_to_stop_with_the_clients_and_the_reader_after_the_servers(
    tmp_path: Path,
) -> None:
    target, run = lab_run(tmp_path)
    run.execute()
    signals = [(e[1], e[2]) for e in target.events if e[0] == "signal"]
    # Nudges: the tracer (SIGINT) as soon as the clients' stage is over, the reader (SIGTERM)
    # as soon as the servers' is; the server is stopped between the two.
    assert signals.index(("tracer", "SIGINT")) < signals.index(("server", "SIGINT"))
    assert signals.index(("server", "SIGINT")) < signals.index(("capture", "SIGTERM"))
    assert not target.live


STAGES_OF_BUILTIN = [*PREPARE, *START_ORDERS["server-during-attach"]]


@pytest.mark.parametrize("stage", STAGES_OF_BUILTIN)
def test_an_interrupt_at_any_stage_stops_everything_started_and_keeps_the_run(
    tmp_path: Path, stage: str
) -> None:
    def interrupted(ctx):
        raise KeyboardInterrupt

    target, run = lab_run(tmp_path, stages={**STAGES, stage: interrupted})
    result = run.execute()
    assert result.status == "interrupted"
    assert result.exit_code == 130
    assert not target.live, f"left running: {[p.name for p in target.live.values()]}"
    assert result.manifest["status"] == "interrupted"
    assert (result.run_dir / "manifest.json").is_file()
    if target.started():
        # Whatever had started was recorded, and stopped in reverse stage order.
        recorded = [p["name"] for p in result.manifest["processes"]]
        assert sorted(recorded) == sorted(target.started())


@pytest.mark.parametrize("stage", STAGES_OF_BUILTIN)
def test_a_failure_at_any_stage_is_a_failed_run_with_everything_stopped(
    tmp_path: Path, stage: str
) -> None:
    from usmlab.errors import UsmlabError

    def failing(ctx):
        raise UsmlabError(f"{stage} broke")

    target, run = lab_run(tmp_path, stages={**STAGES, stage: failing})
    result = run.execute()
    assert result.status == "failed"
    assert result.error == f"{stage} broke"
    assert not target.live


def test_a_restart_respawns_clients_and_servers_with_new_names(tmp_path: Path) -> None:
    target, run = lab_run(
        tmp_path, "restart", tracer="none", target={"client_polls": 20},
        params={"restart_after": 0.3, "duration": 1.0},
    )  # fmt: skip
    result = run.execute()
    assert result.status == "complete", result.error
    started = target.started()
    assert "server-r1" in started and "client-r1" in started
    assert started.index("server-r1") < started.index("client-r1")
    names = {p["name"] for p in result.manifest["processes"]}
    assert {"server", "server-r1", "client", "client-r1"} <= names
    assert not target.live
