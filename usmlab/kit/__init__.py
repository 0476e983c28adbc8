"""The target side: every file uploaded to a target and run there by a bare `python3`.

Standard library only, Python 3.8+: these run on VMs and staging hosts that have nothing else.
The workloads (`server.py`, `client.py`, `go_client/`, `go_server/`), the helper scripts and
the programs the transports send (`detach.py`) all live here, laid out as on the target.
Each script's controller half is named in its docstring; docs/architecture.md pairs them all.
"""

from pathlib import Path

KIT_DIR = Path(__file__).resolve().parent
GO_CLIENT_DIR = KIT_DIR / "go_client"
GO_SERVER_DIR = KIT_DIR / "go_server"


def kit_files() -> dict[str, Path]:
    """Every script a target needs to run a scenario, by the name it gets there."""
    return {p.name: p for p in sorted(KIT_DIR.glob("*.py")) if p.name != "__init__.py"}
