"""The interfaces of one namespace: metadata from rtnetlink, counters from /proc/net/dev.

Counters change every sample and ``/proc/<ns>/net/dev`` is the cheapest way to read them (one
``pread``, about 5 µs). Names, state, MTU and veth peers change rarely, so they come from an
rtnetlink dump that is repeated only when the kernel announces a link change on a socket
subscribed to RTMGRP_LINK; checking that socket costs one non-blocking ``recv``.
"""

from __future__ import annotations

import socket

from . import netlink
from .handles import ProcFile

# rx bytes, packets, errs, drop (cols 0-3); tx bytes, packets, errs, drop (cols 8-11)
DevCounters = tuple[int, int, int, int, int, int, int, int]


def parse_net_dev(data: bytes) -> dict[str, DevCounters]:
    """Parse /proc/net/dev into name -> (rx bytes, packets, errors, drops, tx bytes, ...)."""
    out: dict[str, DevCounters] = {}
    for line in data.split(b"\n")[2:]:
        name, sep, rest = line.partition(b":")
        if not sep:
            continue
        f = rest.split()
        if len(f) < 12:
            continue
        out[name.strip().decode("utf-8", "replace")] = (
            int(f[0]), int(f[1]), int(f[2]), int(f[3]), int(f[8]), int(f[9]), int(f[10]), int(f[11])
        )
    return out


class LinkTable:
    """Interfaces of one namespace, read through handles kept open in it."""

    def __init__(self, rtnl: socket.socket, rtnl_events: socket.socket, dev: ProcFile) -> None:
        self._rtnl = rtnl
        self._events = rtnl_events
        self._dev = dev
        self._by_name: dict[str, netlink.LinkInfo] = {}
        self._by_index: dict[int, netlink.LinkInfo] = {}
        self.generation = 0  # bumped whenever the metadata changed
        self._fresh = False

    def refresh(self) -> bool:
        """Re-dump link metadata if the kernel announced a change (or never dumped); True if it did."""
        changed = netlink.drain(self._events)
        if self._fresh and not changed:
            return False
        links = netlink.dump_links(self._rtnl)
        self._by_name = {link.name: link for link in links}
        self._by_index = {link.ifindex: link for link in links}
        self._fresh = True
        self.generation += 1
        return True

    def links(self) -> dict[str, netlink.LinkInfo]:
        """Current metadata by interface name (call :meth:`refresh` first)."""
        return self._by_name

    def by_index(self, ifindex: int) -> netlink.LinkInfo | None:
        """Metadata of one interface by ifindex."""
        return self._by_index.get(ifindex)

    def counters(self) -> dict[str, DevCounters]:
        """Counters of every interface, read now."""
        return parse_net_dev(self._dev.read())
