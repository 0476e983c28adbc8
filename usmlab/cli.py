"""Command-line interface: wires the verbs of usmlab/commands/ into one typer app. Nothing else."""

from __future__ import annotations

from typing import Annotated

import typer

from usmlab import __version__
from usmlab.commands import analyze, build, cleanup, collect, doctor, runs, scenarios, test, vm
from usmlab.commands import open as open_run

app = typer.Typer(
    name="usmlab",
    help="Run the USM misattribution lab with one command and get a verdict.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

COMMANDS = (
    ("scenarios", scenarios.scenarios_cmd),
    ("test", test.test_cmd),
    ("collect", collect.collect_cmd),
    ("cleanup", cleanup.cleanup_cmd),
    ("build", build.build_cmd),
    ("doctor", doctor.doctor_cmd),
    ("analyze", analyze.analyze_cmd),
    ("open", open_run.open_cmd),
    ("runs", runs.runs_cmd),
    ("summary", runs.summary_cmd),
    ("init", vm.init_cmd),
    ("up", vm.up_cmd),
    ("status", vm.status_cmd),
    ("ssh", vm.ssh_cmd),
    ("halt", vm.halt_cmd),
    ("destroy", vm.destroy_cmd),
)
for _name, _command in COMMANDS:
    app.command(_name)(_command)
app.command("compare", cls=runs.KeepsSeparator)(runs.compare_cmd)


def _version(value: bool) -> None:
    if value:
        print(f"usmlab {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print version.")
    ] = False,
) -> None:
    """usmlab: provision, run, capture and judge the USM misattribution lab."""


def main() -> None:
    """The CLI without the early signal handling of usmlab/__main__.py (for embedding)."""
    app()
