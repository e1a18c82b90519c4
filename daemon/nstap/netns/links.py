"""The interfaces of one namespace: metadata from rtnetlink, counters from /proc/net/dev.

Counters change every sample and ``/proc/<ns>/net/dev`` is the cheapest way to read them (one
``pread``, about 5 µs). Names, state, MTU and veth peers change rarely, so they come from an
rtnetlink dump that is repeated only after the kernel announced a link change on a socket
subscribed to RTMGRP_LINK. The event loop watches that socket, so an unchanged namespace costs
nothing for it.
"""

from __future__ import annotations

import asyncio
import socket

from . import netlink
from .handles import ProcFile
from .scan import Plan, dev_plan

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
        self.generation = 0  # bumped whenever the metadata changed
        self._fresh = False
        self._plan: Plan | None = None  # where the counters are in the current shape of /proc/net/dev
        self._names: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def follow(self, loop: asyncio.AbstractEventLoop) -> None:
        """Have ``loop`` watch for link-change notifications (until :meth:`close`)."""
        self._loop = loop
        loop.add_reader(self._events.fileno(), self._notified)

    def _notified(self) -> None:
        if netlink.drain(self._events):
            self._fresh = False

    def close(self) -> None:
        """Stop watching notifications (the handles' owner closes the sockets)."""
        if self._loop is not None:
            self._loop.remove_reader(self._events.fileno())
            self._loop = None

    def refresh(self) -> bool:
        """Re-dump link metadata if a change was announced (or never dumped); True if it did."""
        if self._fresh:
            if self._loop is not None or not netlink.drain(self._events):
                return False
        netlink.drain(self._events)  # what is queued now is covered by the dump below
        links = netlink.dump_links(self._rtnl)
        self._by_name = {link.name: link for link in links}
        self._fresh = True
        self.generation += 1
        return True

    def links(self) -> dict[str, netlink.LinkInfo]:
        """Current metadata by interface name (call :meth:`refresh` first)."""
        return self._by_name

    def read_counters(self) -> bytes:
        """/proc/net/dev of the namespace, read now (see :func:`parse_net_dev`)."""
        return self._dev.read()

    def counters(self, raw: bytes | None = None) -> dict[str, DevCounters]:
        """Counters of every interface in ``raw`` (/proc/net/dev read now if not given), by a scan
        plan learnt again only when the interfaces changed."""
        if raw is None:
            raw = self._dev.read()
        values = self._plan.scan(raw) if self._plan is not None else None
        if values is None:
            self._plan, self._names = dev_plan(raw)
            values = self._plan.scan(raw)
            if values is None:
                raise ValueError("unreadable /proc/net/dev")
        return {name: values[i : i + 8] for i, name in zip(range(0, len(values), 8), self._names)}  # type: ignore[misc]
