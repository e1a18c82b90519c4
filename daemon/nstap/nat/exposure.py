"""Exposure, the runbook's ``nmap`` step: what each container listens on, and who can reach it.

Every TCP listener and bound UDP socket of the container's namespace (read on request, in a
thread that enters the namespace through its watcher's descriptor: one sock_diag dump and one read
of /proc/net/udp{,6}), classified against the forwards the NAT monitor verified:

* ``published``: a published port leads to it (``all_host_addresses`` when it is published on
  0.0.0.0 or ::, i.e. on every address of the host, and the listener is on every address too);
* ``loopback``: bound to 127.0.0.0/8 or ::1, reachable from inside the container only (and a
  port published to it is broken: the DNAT lands on the container's own address);
* ``internal``: reachable from the container's networks (other containers, the host), not
  published.

The lists are bounded (:data:`MAX_LISTENERS`): a container controls how many sockets it has.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..netns import netlink
from ..netns.evidence import NamespaceRunner, parse_udp_table
from ..registry import WatchedNamespace
from .forwards import Forward

MAX_LISTENERS = 1000
TCP_LISTEN_MASK = 1 << 10
ALL_ADDRESSES = ("", "0.0.0.0", "::")


def _split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def listeners_here(proc_root: Path = Path("/proc"), limit: int = MAX_LISTENERS) -> tuple[list[tuple[str, str, int]], int]:
    """(protocol, bound address, port) of the calling thread's namespace's TCP listeners and UDP
    sockets (the first ``limit``, unique), and how many there are in all."""
    found: dict[tuple[str, str, int], None] = {}
    total = 0
    sock = netlink.open_socket(netlink.NETLINK_SOCK_DIAG)
    try:
        for family in (socket.AF_INET, socket.AF_INET6):
            for entry in netlink.dump_inet(sock, family, socket.IPPROTO_TCP, TCP_LISTEN_MASK):
                total += 1
                raw = entry.sockid[4:8] if family == socket.AF_INET else entry.sockid[4:20]
                if len(found) < limit:
                    found[("tcp", socket.inet_ntop(family, raw), entry.port)] = None
    finally:
        sock.close()
    for name, family in (("udp", socket.AF_INET), ("udp6", socket.AF_INET6)):
        try:
            text = (proc_root / "thread-self/net" / name).read_text()
        except OSError:
            continue
        udp, count = parse_udp_table(text, family, limit)
        total += count
        for entry in udp:
            if entry["peer"].rsplit(":", 1)[-1] != "0":
                continue  # a connected UDP socket is a client, not a service
            host, port = _split(entry["local"])
            if len(found) < limit:
                found[("udp", host, port)] = None
    return list(found), total


def classify(listeners: Iterable[tuple[str, str, int]], forwards: Iterable[Forward]) -> list[dict[str, Any]]:
    """Each listener with its exposure (see the module doc), sorted by protocol and port."""
    published: dict[tuple[str, int], list[Forward]] = {}
    for f in forwards:
        published.setdefault((f.protocol, f.container_port), []).append(f)
    out = []
    for proto, address, port in sorted(set(listeners), key=lambda x: (x[0], x[2], x[1])):
        try:
            addr = ipaddress.ip_address(address)
        except ValueError:
            continue
        on_all = addr.is_unspecified
        forwards_here = published.get((proto, port), [])
        entry: dict[str, Any] = {"protocol": proto, "address": address, "port": port}
        if addr.is_loopback:
            entry["exposure"] = "loopback"
            if forwards_here:
                entry["note"] = "published, but bound to loopback: connections through the published port fail"
        elif forwards_here:
            entry["exposure"] = "published"
            entry["published_on"] = sorted({f"{f.host_ip or '*'}:{f.host_port}" for f in forwards_here})
            entry["all_host_addresses"] = on_all and any(f.host_ip in ALL_ADDRESSES for f in forwards_here)
        else:
            entry["exposure"] = "internal"
        out.append(entry)
    return out


def exposure_json(listeners: list[tuple[str, str, int]], total: int, forwards: list[Forward]) -> dict[str, Any]:
    """The exposure document: listeners classified, published ports nothing listens for."""
    entries = classify(listeners, forwards)
    served = {(e["protocol"], e["port"]) for e in entries if e["exposure"] != "loopback"}
    return {
        "listeners": entries,
        "total": total,
        "not_listed": max(0, total - len(listeners)),
        "published_without_listener": sorted(
            {f"{f.protocol} {f.host_ip or '*'}:{f.host_port} -> {f.container_port}" for f in forwards if (f.protocol, f.container_port) not in served}
        ),
        "counts": {kind: sum(1 for e in entries if e["exposure"] == kind) for kind in ("published", "internal", "loopback")},
    }


class ExposureReader:
    """Reads a watched namespace's listeners (in a thread of its own that enters it) and classifies them."""

    def __init__(self, netns_fd: Callable[[int], int | None], forwards_of: Callable[[set[str]], list[Forward]]) -> None:
        self.netns_fd = netns_fd
        self.forwards_of = forwards_of
        self.runner = NamespaceRunner()

    async def __call__(self, ns: WatchedNamespace) -> dict[str, Any]:
        """The exposure of namespace ``ns`` now (an ``error`` key when it cannot be read)."""
        fd = self.netns_fd(ns.inode)
        if fd is None:
            return {"error": "the namespace is not watched now"}
        fd = os.dup(fd)  # the watcher may close its own meanwhile
        try:
            listeners, total = await self.runner.run(fd, listeners_here)
        except OSError as exc:
            return {"error": f"cannot read the namespace's sockets: {exc}"}
        finally:
            os.close(fd)
        return exposure_json(listeners, total, self.forwards_of({m.id for m in ns.members}))

    def close(self) -> None:
        """Stop the thread."""
        self.runner.close()
