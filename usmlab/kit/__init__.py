"""Helper scripts deployed next to the workloads and run on the target with a bare python3.

Standard library only, Python 3.8+: they run on VMs and staging hosts that have nothing else.
"""

from pathlib import Path

KIT_DIR = Path(__file__).resolve().parent
WORKLOADS_DIR = KIT_DIR.parent / "workloads"


def kit_files() -> dict[str, Path]:
    """Every file a target needs to run a scenario, by the name it gets there."""
    files = {p.name: p for p in sorted(KIT_DIR.glob("*.py")) if p.name != "__init__.py"}
    files.update({p.name: p for p in sorted(WORKLOADS_DIR.glob("*.py")) if p.name != "__init__.py"})
    return files
