"""Who a thread belongs to: trace_pipe names threads (`comm-TID`), the verdict needs processes.

Sources, merged: the run's threads.jsonl (thread sampler), the workloads' own per-request
pid/tid, the manifest's processes (a pid is also the tid of its main thread), and for captures
brought from elsewhere the text of `ps -eLo pid,tid,comm` plus `ROLE=PID` pairs. A comm of
`<...>` in a trace header does not matter: the TID alone resolves the process.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# Role kinds that belong to the lab but neither send nor serve requests.
LAB_HELPER_ROLES: frozenset[str] = frozenset({"tracer", "sampler", "capture"})
_PORT_IN_NAME = re.compile(r"(\d{2,5})$")


def role_kind(name: str) -> str:
    """The kind of a lab process from its name: `client*` sends, `server*` serves."""
    lowered = name.lower()
    if lowered.startswith("client"):
        return "client"
    if lowered.startswith("server"):
        return "server"
    if lowered in LAB_HELPER_ROLES:
        return lowered
    return "other"


def port_in_name(name: str) -> int | None:
    """`server-9443` / `server9443` name the port they listen on."""
    match = _PORT_IN_NAME.search(name)
    return int(match[1]) if match else None


@dataclass(slots=True)
class Process:
    """A process the analysis knows about; `role` is client/server/tracer/sampler/capture/other,
    `lab` is False for processes seen only in `ps` output (not part of the lab)."""

    pid: int
    name: str | None = None
    role: str = "other"
    comm: str | None = None
    port: int | None = None
    lab: bool = False
    tids: set[int] = field(default_factory=set)


class ThreadMap:
    """TID -> process. Last writer wins, except that a lab process's thread is never taken
    over by a non-lab source (TIDs are recycled only rarely, lab attribution matters most)."""

    def __init__(self) -> None:
        self._processes: dict[int, Process] = {}
        self._tid_pid: dict[int, int] = {}
        self._tid_comm: dict[int, str] = {}

    # -- building -----------------------------------------------------------------------------

    def add_process(
        self,
        pid: int,
        name: str | None = None,
        role: str | None = None,
        comm: str | None = None,
        port: int | None = None,
        lab: bool = True,
    ) -> Process:
        """Record (or enrich) a process; its pid is also the tid of its main thread. A lab
        source (manifest, threads.jsonl, roles) overrides what `ps` said."""
        proc = self._processes.get(pid)
        if proc is None:
            proc = self._processes[pid] = Process(pid)
        if lab:
            proc.lab = True
            proc.name = name or proc.name
            if role:
                proc.role = role
            elif name and proc.role == "other":
                proc.role = role_kind(name)
        elif name and proc.name is None:
            proc.name = name
        if comm and not proc.comm:
            proc.comm = comm
        if port is None and proc.role == "server" and proc.name:
            port = port_in_name(proc.name)
        if port is not None and proc.port is None:
            proc.port = port
        self.add_thread(pid, pid, comm)
        return proc

    def add_thread(self, tid: int, pid: int, comm: str | None = None) -> None:
        """Record that `tid` is a thread of `pid`."""
        current = self._tid_pid.get(tid)
        if current is not None and current != pid:
            owner = self._processes.get(current)
            newcomer = self._processes.get(pid)
            if owner is not None and owner.lab and not (newcomer is not None and newcomer.lab):
                return
            if owner is not None:
                owner.tids.discard(tid)
        self._tid_pid[tid] = pid
        proc = self._processes.get(pid)
        if proc is None:
            proc = self._processes[pid] = Process(pid)
        proc.tids.add(tid)
        if comm and comm != "<...>":
            self._tid_comm[tid] = comm
            if tid == pid and not proc.comm:
                proc.comm = comm

    def add_sampled(self, pid: int, tid: int, name: Any, role: Any, comm: Any) -> None:
        """One threads.jsonl record (docs/formats.md): a thread of a lab process."""
        name = name if isinstance(name, str) else None
        role = role if isinstance(role, str) and role else (role_kind(name) if name else None)
        self.add_process(pid, name, role)
        self.add_thread(tid, pid, comm if isinstance(comm, str) else None)

    def load_ps_text(self, text: str) -> int:
        """`ps -eLo pid,tid,comm` output (header optional, comm may hold spaces); these
        processes are not part of the lab unless named by a role. Returns threads read."""
        used = 0
        for line in text.splitlines():
            parts = line.split(None, 2)
            if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
                continue  # header or junk
            pid, tid = int(parts[0]), int(parts[1])
            comm = parts[2].strip() if len(parts) == 3 else None
            if pid not in self._processes:
                self.add_process(pid, comm=comm if tid == pid else None, lab=False)
            self.add_thread(tid, pid, comm)
            used += 1
        return used

    def add_roles(self, roles: dict[str, list[int]]) -> None:
        """`ROLE=PID` pairs: name -> pids; the kind follows the name (client*, server*)."""
        for name, pids in roles.items():
            for pid in pids:
                self.add_process(pid, name, role_kind(name))

    # -- queries ------------------------------------------------------------------------------

    def process(self, pid: int) -> Process | None:
        """The process with this pid, if known."""
        return self._processes.get(pid)

    def process_of_tid(self, tid: int) -> Process | None:
        """The process a thread id belongs to, if known."""
        pid = self._tid_pid.get(tid)
        return None if pid is None else self._processes.get(pid)

    def comm_of_tid(self, tid: int) -> str | None:
        """The thread's name as the sampler or ps saw it (useful when trace_pipe says `<...>`)."""
        comm = self._tid_comm.get(tid)
        if comm is None:
            proc = self.process_of_tid(tid)
            comm = proc.comm if proc is not None else None
        return comm

    def processes(self, roles: Iterable[str] | None = None) -> list[Process]:
        """Known processes, lab ones only when `roles` is given (filtered by role kind)."""
        wanted = None if roles is None else set(roles)
        return [
            p for p in self._processes.values() if wanted is None or (p.lab and p.role in wanted)
        ]

    def tids_of_role(self, role: str) -> set[int]:
        """Every known thread of the lab processes of one role kind."""
        tids: set[int] = set()
        for proc in self.processes([role]):
            tids |= proc.tids
        return tids
