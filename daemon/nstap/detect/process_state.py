"""Why a listener does not accept: its container paused, its cgroup frozen, its processes stopped.

Read only when a detector says a listener looks stuck (never per sample for every container):
the runtime's status of the namespace's containers (``paused`` after ``docker pause`` /
``podman pause``, kept current by the runtime's pause and unpause events), the cgroup freezer
(v1: ``freezer.state`` of the container's freezer cgroup; v2: ``frozen 1`` in ``cgroup.events``)
and the state of the container's processes (``T``/``t`` in ``/proc/PID/stat``: stopped by a
signal or a tracer). Paths are injectable, so the reads are tested against fixture trees.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..runtime.records import ContainerRecord
from .cause import PROCESS_NOT_ACCEPTING, Cause

MAX_MEMBERS = 16  # containers of one namespace looked at
MAX_PROCESSES = 64  # processes of one container whose state is read
MAX_READ = 65536


def _read(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_READ).decode("utf-8", "replace")
    except OSError:
        return ""


def cgroup_paths(text: str) -> dict[str, str]:
    """``/proc/PID/cgroup`` as controller -> path ("" for the v2 unified hierarchy)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/") or ".." in parts[2].split("/"):
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            out.setdefault(controller, parts[2])
    return out


def process_state(stat: str) -> tuple[str, str]:
    """(state letter, command name) from ``/proc/PID/stat`` text; ("", "") if unreadable."""
    open_, close = stat.find("("), stat.rfind(")")
    if open_ < 0 or close < open_:
        return "", ""
    rest = stat[close + 1:].split()
    return (rest[0] if rest else ""), stat[open_ + 1:close][:64]


class ProcessStateReader:
    """Says whether a namespace's containers are paused, frozen or stopped, as a cause."""

    def __init__(self, proc_root: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> None:
        self.proc_root = proc_root
        self.cgroup_root = cgroup_root

    def cause(self, members: Iterable[ContainerRecord]) -> Cause | None:
        """process_not_accepting, naming the first container that is paused, frozen or stopped; None if none is."""
        found = self.describe(members)
        return Cause(PROCESS_NOT_ACCEPTING, found) if found else None

    def describe(self, members: Iterable[ContainerRecord]) -> str:
        """The first container that is paused, frozen or stopped, in a sentence ("" if none is)."""
        for record in list(members)[:MAX_MEMBERS]:
            found = self._of(record)
            if found is not None:
                return found
        return ""

    def _of(self, record: ContainerRecord) -> str | None:
        name = record.name
        if record.status == "paused":
            return f"{name} is paused ({record.runtime} pause): its processes cannot accept connections"
        cgroups = cgroup_paths(_read(self.proc_root / str(record.pid) / "cgroup"))
        frozen = self._frozen(cgroups)
        if frozen:
            return f"{name} is frozen ({frozen}): its processes cannot accept connections"
        stopped = self._stopped(record.pid, cgroups)
        if stopped:
            return f"{name}: {stopped} stopped (state T): it cannot accept connections"
        return None

    def _frozen(self, cgroups: dict[str, str]) -> str:
        if "freezer" in cgroups:
            state = _read(self._cgroup("freezer", cgroups["freezer"], "freezer.state")).strip()
            if state in ("FROZEN", "FREEZING"):
                return f"cgroup freezer {state}"
        elif "" in cgroups:
            events = _read(self._cgroup("", cgroups[""], "cgroup.events"))
            if "frozen 1" in events.splitlines():
                return "cgroup.events frozen 1"
        return ""

    def _cgroup(self, controller: str, path: str, name: str) -> Path:
        base = self.cgroup_root / controller if controller else self.cgroup_root
        return base / path.lstrip("/") / name

    def _stopped(self, pid: int, cgroups: dict[str, str]) -> str:
        """The container's stopped processes ("process 12 (httpd)"), from its cgroup's process list."""
        pids: list[str] = [str(pid)]
        for controller in ("pids", "freezer", ""):
            if controller in cgroups:
                listed = _read(self._cgroup(controller, cgroups[controller], "cgroup.procs")).split()
                if listed:
                    pids = listed
                    break
        stopped, main_stopped, looked = [], False, 0
        for p in pids[:MAX_PROCESSES]:
            if not p.isdigit():
                continue
            looked += 1
            state, comm = process_state(_read(self.proc_root / p / "stat"))
            if state in ("T", "t"):
                stopped.append(f"process {p} ({comm})")
                main_stopped = main_stopped or p == str(pid)
        # Only a stopped main process, or every process stopped, is named: a stopped helper
        # beside a running server would be a wrong cause, which is worse than none.
        if not stopped or not (main_stopped or len(stopped) == looked):
            return ""
        more = f" and {len(stopped) - 3} more" if len(stopped) > 3 else ""
        return ", ".join(stopped[:3]) + more + (" is" if len(stopped) == 1 else " are")
