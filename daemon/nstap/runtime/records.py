"""Container records: what nstap knows about one container, built from a runtime's inspect answer.

Docker and Podman's Docker-compatible API answer ``GET /containers/{id}/json`` with the same
shape; the only Podman extra nstap uses (the pod name) comes from libpod's list and is passed in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import labels as nstap_labels
from ..labels import COMPOSE_PROJECT, COMPOSE_SERVICE, PODMAN_COMPOSE_PROJECT, PODMAN_COMPOSE_SERVICE


MAX_PORTS = 256  # published ports kept per container (a runtime answer is input like any other)
MAX_NETWORKS = 64


class RecordError(ValueError):
    """An inspect answer that cannot describe a running container."""


@dataclass(frozen=True, slots=True)
class NetworkAttachment:
    """One network a container is attached to."""

    network: str
    ipv4: str
    ipv6: str
    mac: str
    ipv4_prefix: int = 0  # prefix length of the network's subnet (0: unknown)
    ipv6_prefix: int = 0


@dataclass(frozen=True, slots=True)
class PortBinding:
    """One published port: container port/protocol to host address and port."""

    container_port: int
    protocol: str
    host_ip: str
    host_port: int


@dataclass(frozen=True, slots=True)
class ContainerRecord:
    """A running (or paused) container and where its network lives."""

    id: str
    name: str
    runtime: str
    pid: int
    status: str
    image: str
    labels: Mapping[str, str] = field(default_factory=dict)  # only those nstap uses: see nstap.labels
    compose_project: str = ""
    compose_service: str = ""
    pod: str = ""
    k8s_namespace: str = ""  # a Kubernetes pod's namespace (containerd: io.kubernetes.pod.namespace)
    network_mode: str = ""
    networks: tuple[NetworkAttachment, ...] = ()
    ports: tuple[PortBinding, ...] = ()
    started_at: str = ""
    netns: int = 0  # inode of /proc/<pid>/ns/net; 0 if it could not be read
    host_network: bool = False

    @property
    def short_id(self) -> str:
        """The 12-hex id people and the ``container_id`` label use."""
        return self.id[:12]

    @property
    def enabled(self) -> bool:
        """False when the container opted out with the label ``nstap.enable=off``."""
        return nstap_labels.watch_enabled(self.labels)

    @property
    def joins_other(self) -> bool:
        """True for ``--network container:X`` (and Podman pod members): it uses X's namespace."""
        return self.network_mode.startswith("container:")

    def with_netns(self, inode: int, host_inode: int) -> ContainerRecord:
        """This record with its namespace inode filled in."""
        return replace(self, netns=inode, host_network=self.network_mode == "host" or inode == host_inode)


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def record_from_inspect(data: Mapping[str, Any], runtime: str, pod: str = "") -> ContainerRecord:
    """Build a record from a ``/containers/{id}/json`` answer (Docker or Podman compat)."""
    if not isinstance(data, Mapping):
        raise RecordError("inspect answer is not an object")
    cid = _str(data.get("Id"))
    if len(cid) < 12 or any(c not in "0123456789abcdef" for c in cid):
        raise RecordError(f"bad container id {cid!r}")
    state = _dict(data.get("State"))
    pid = state.get("Pid")
    if not isinstance(pid, int) or pid <= 0:
        raise RecordError(f"container {cid[:12]} has no process")
    status = _str(state.get("Status")) or ("running" if state.get("Running") else "")
    if state.get("Paused"):
        status = "paused"
    config = _dict(data.get("Config"))
    labels = nstap_labels.kept(_dict(config.get("Labels")))
    host_config = _dict(data.get("HostConfig"))
    settings = _dict(data.get("NetworkSettings"))
    networks = tuple(
        NetworkAttachment(
            str(name),
            _str(net.get("IPAddress")),
            _str(net.get("GlobalIPv6Address")),
            _str(net.get("MacAddress")),
            _prefix(net.get("IPPrefixLen"), 32),
            _prefix(net.get("GlobalIPv6PrefixLen"), 128),
        )
        for name, net in sorted(_dict(settings.get("Networks")).items())[:MAX_NETWORKS]
        if isinstance(net, dict)
    )
    return ContainerRecord(
        id=cid,
        name=_str(data.get("Name")).lstrip("/") or cid[:12],
        runtime=runtime,
        pid=pid,
        status=status,
        image=_str(config.get("Image")) or _str(data.get("ImageName")) or _str(data.get("Image")),
        labels=labels,
        compose_project=labels.get(COMPOSE_PROJECT) or labels.get(PODMAN_COMPOSE_PROJECT) or pod,
        compose_service=labels.get(COMPOSE_SERVICE) or labels.get(PODMAN_COMPOSE_SERVICE) or "",
        pod=pod,
        network_mode=_str(host_config.get("NetworkMode")),
        networks=networks,
        ports=_ports(_dict(settings.get("Ports"))),
        started_at=_str(state.get("StartedAt")),
    )


def _prefix(value: Any, most: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= most else 0


def _port_number(text: str) -> int | None:
    """A port number from text the runtime sent, or None (``isdigit`` alone accepts "²")."""
    if not (text.isascii() and text.isdigit() and len(text) <= 5):
        return None
    number = int(text)
    return number if number <= 65535 else None


def _ports(ports: Mapping[str, Any]) -> tuple[PortBinding, ...]:
    out = []
    for key, bindings in ports.items():
        port_text, _, proto = str(key).partition("/")
        port = _port_number(port_text)
        if port is None or not isinstance(bindings, (list, tuple)):
            continue
        for binding in bindings:
            if not isinstance(binding, dict):
                continue
            host_port = _port_number(_str(binding.get("HostPort")))
            out.append(PortBinding(port, proto[:16] or "tcp", _str(binding.get("HostIp"))[:64], host_port or 0))
            if len(out) >= MAX_PORTS:
                break
    return tuple(sorted(out, key=lambda p: (p.container_port, p.protocol, p.host_ip, p.host_port)))


def netns_inode(proc_root: Path, pid: int) -> int:
    """Inode of the network namespace of ``pid``; 0 if the process is gone or unreadable."""
    try:
        return os.stat(proc_root / str(pid) / "ns/net").st_ino
    except OSError:
        return 0
