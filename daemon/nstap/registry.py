"""The container registry: running containers, and the network namespaces nstap watches for them.

Several containers may share one namespace (``--network container:X``, Podman pods). A namespace
is watched once; its series carry the container that owns it (the one that did not join another's
namespace: the pod's infra container, X), and every member is listed with the shared ``netns``.
Host-network containers and opted-out ones are listed but never own or join a watched namespace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import os
import re
from dataclasses import replace
from pathlib import Path

from . import labels as nstap_labels
from .runtime.records import ContainerRecord
from .supervisor import FailureReport, log_failure


@dataclass(frozen=True, slots=True)
class WatchedNamespace:
    """A namespace to watch: its owner (whose identity its series carry) and all its members.

    ``vetoes`` names every container in the namespace labelled ``nstap.capture=off``, watched or
    not: a capture of the namespace records every container's packets, so one that opted out of
    watching altogether (``nstap.enable=off``) still vetoes captures of a sidecar that joined it.
    """

    inode: int
    owner: ContainerRecord
    members: tuple[ContainerRecord, ...]
    vetoes: tuple[str, ...] = ()


def _owner_rank(record: ContainerRecord) -> tuple:
    # Prefer the container that created the namespace, then the oldest, then a stable tie-break.
    return (record.joins_other, record.started_at or "~", record.id)


_CONTAINER_PATH = re.compile(r"/(?:containers|overlay-containers)/([0-9a-f]{64})/")
_CONTAINER_MARKERS = (Path("/.dockerenv"), Path("/run/.containerenv"))


def own_container_id(
    proc_root: Path = Path("/proc"), env: dict[str, str] | None = None, markers: tuple[Path, ...] = _CONTAINER_MARKERS
) -> str:
    """The id of the container nstap itself runs in ("" on a host): Docker and Podman bind the
    container's own hostname/resolv.conf files from a directory named after its id."""
    env = os.environ if env is None else env
    if not (env.get("NSTAP_IN_CONTAINER") or any(p.exists() for p in markers)):
        return ""
    try:
        text = (proc_root / "self/mountinfo").read_text()
    except OSError:
        return ""
    found = {m.group(1) for m in _CONTAINER_PATH.finditer(text)}
    return found.pop() if len(found) == 1 else ""


def group_namespaces(records: Iterable[ContainerRecord]) -> dict[int, WatchedNamespace]:
    """Group watchable containers by namespace and elect each namespace's owner."""
    groups: dict[int, list[ContainerRecord]] = {}
    vetoes: dict[int, list[str]] = {}
    for record in records:
        if not record.netns or record.host_network:
            continue
        if nstap_labels.capture_opted_out(record.labels):
            vetoes.setdefault(record.netns, []).append(record.name)
        if record.enabled:
            groups.setdefault(record.netns, []).append(record)
    out = {}
    for inode, members in groups.items():
        members.sort(key=_owner_rank)
        out[inode] = WatchedNamespace(inode, members[0], tuple(members), tuple(sorted(vetoes.get(inode, ()))))
    return out


class ContainerRegistry:
    """Running containers by id, per runtime; notifies listeners after every change.

    Listeners are isolated from each other: one that raises is reported (``on_error``, which the
    daemon points at its task supervisor) and the others are still called.
    """

    def __init__(self, on_error: FailureReport = log_failure, own_id: str = "") -> None:
        self.own_id = own_id  # nstap's own container: listed, never watched or captured
        self._containers: dict[str, ContainerRecord] = {}
        self._namespaces: dict[int, WatchedNamespace] = {}
        self._listeners: list[Callable[[], None]] = []
        self._on_error = on_error

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after each change (on the event loop; it must not block)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        self._namespaces = group_namespaces(self._containers.values())
        for listener in self._listeners:
            try:
                listener()
            except Exception as exc:  # noqa: BLE001 - one listener's bug must not starve the others
                self._on_error("registry-listener", exc)

    def _own(self, record: ContainerRecord) -> ContainerRecord:
        if record.id != self.own_id:
            return record
        return replace(record, labels={**record.labels, nstap_labels.ENABLE: "off"})

    def upsert(self, record: ContainerRecord) -> None:
        """Add or update one running container."""
        record = self._own(record)
        if self._containers.get(record.id) == record:
            return
        self._containers[record.id] = record
        self._changed()

    def remove(self, container_id: str) -> ContainerRecord | None:
        """Forget a container that stopped; returns its record if it was known."""
        record = self._containers.pop(container_id, None)
        if record is not None:
            self._changed()
        return record

    def replace_runtime(self, runtime: str, records: Iterable[ContainerRecord]) -> None:
        """Make ``records`` the complete set of running containers of ``runtime`` (a reconcile)."""
        fresh = {r.id: self._own(r) for r in records}
        current = {cid: r for cid, r in self._containers.items() if r.runtime == runtime}
        if fresh == current:
            return
        for cid in current.keys() - fresh.keys():
            del self._containers[cid]
        self._containers.update(fresh)
        self._changed()

    def get(self, container_id: str) -> ContainerRecord | None:
        """One container by full id."""
        return self._containers.get(container_id)

    def containers(self) -> list[ContainerRecord]:
        """Every known running container, sorted by runtime and name."""
        return sorted(self._containers.values(), key=lambda r: (r.runtime, r.name))

    def namespaces(self) -> dict[int, WatchedNamespace]:
        """The namespaces to watch, by inode."""
        return self._namespaces

    def runtime_ids(self, runtime: str) -> set[str]:
        """Ids of the containers a runtime has running."""
        return {cid for cid, r in self._containers.items() if r.runtime == runtime}
