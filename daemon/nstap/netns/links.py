"""The interfaces of one namespace: metadata from rtnetlink, counters from /proc/net/dev.

Counters change every sample and ``/proc/<ns>/net/dev`` is the cheapest way to read them (one
``pread``, about 5 µs). Names, state, MTU and veth peers change rarely, so they come from an
rtnetlink dump taken once, then kept current by the changes the kernel announces on a socket
subscribed to RTMGRP_LINK: each announcement carries the changed link's metadata, so only what
changed is parsed (a container that makes and deletes interfaces all the time among a thousand
would otherwise cost a dump of all of them, 20-30 ms, at each of its samples). The event loop
watches that socket and only keeps what arrives (the CPU that takes is charged to the namespace's
next sample); in the namespace's own sample (so the namespace is charged for it) each announced
link is asked for by itself. More of them than a quarter of the
links, announcements beyond CHANGES_CAP bytes, or lost by the kernel mean one new dump: the cost
of a sample is bounded by the smaller of its changes and its links.
"""

from __future__ import annotations

import asyncio
import socket
import time

from . import netlink
from .handles import ProcFile
from .scan import Plan, dev_plan

# rx bytes, packets, errs, drop (cols 0-3); tx bytes, packets, errs, drop (cols 8-11)
DevCounters = tuple[int, int, int, int, int, int, int, int]
MIN_GETS = 64  # links asked for one by one before a dump is cheaper (also beyond a quarter of them)
CHANGES_CAP = 256 << 10  # bytes of link announcements kept between two samples (~170); beyond, a new dump


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
        self._dumped = False  # _by_index is a dump plus the changes in _changes
        self._changes: list[bytes] = []  # announcements received since the last refresh
        self.dumps = 0  # full dumps taken (the first, and one per overflow)
        self._plan: Plan | None = None  # where the counters are in the current shape of /proc/net/dev
        self._names: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.notified_cpu = 0.0  # CPU seconds the loop spent receiving announcements since take_notified_cpu
        self.notices = 0  # wake-ups for announcements since take_notices

    def follow(self, loop: asyncio.AbstractEventLoop) -> None:
        """Have ``loop`` watch for link-change notifications (until :meth:`close`)."""
        self._loop = loop
        loop.add_reader(self._events.fileno(), self._notified)

    def _notified(self) -> None:
        self.notices += 1
        started = time.thread_time()
        if not netlink.queued(self._events, self._changes, CHANGES_CAP):
            self._dumped = False
        self.notified_cpu += time.thread_time() - started

    def take_notified_cpu(self) -> float:
        """The CPU the loop spent receiving this namespace's announcements since the last call:
        a namespace that churns links is charged for it (see NamespaceWatcher.account)."""
        cpu, self.notified_cpu = self.notified_cpu, 0.0
        return cpu

    def take_notices(self) -> int:
        """Wake-ups for this namespace's link announcements since the last call."""
        notices, self.notices = self.notices, 0
        return notices

    def close(self) -> None:
        """Stop watching notifications (the handles' owner closes the sockets)."""
        if self._loop is not None:
            self._loop.remove_reader(self._events.fileno())
            self._loop = None

    def refresh(self) -> bool:
        """Bring link metadata up to date: the announced changes applied, or a dump if never
        dumped or announcements were lost; True if anything changed."""
        if self._loop is None and not netlink.queued(self._events, self._changes, CHANGES_CAP):
            self._dumped = False
        if self._dumped:
            if not self._changes:
                return False
            changes, self._changes = self._changes, []
            if not self._apply(set(netlink.link_changes(changes))):
                self._dumped = False
                return self.refresh()
        else:
            self._changes.clear()  # what is queued now is covered by the dump below (or repeats it)
            self._by_index = {link.ifindex: link for link in netlink.dump_links(self._rtnl)}
            self._dumped = True
            self.dumps += 1
        self._by_name = {link.name: link for link in self._by_index.values()}
        self.generation += 1
        return True

    def _apply(self, touched: set[int]) -> bool:
        """Ask for each announced link, and for the veth peer here of each one that went (its
        IFLA_LINK_NETNSID changes unannounced when it moves away); False when a dump is cheaper."""
        by_index = self._by_index
        for ifindex in list(touched):
            old = by_index.get(ifindex)
            if old is not None and old.kind == "veth" and old.link_netnsid < 0 and old.link:
                touched.add(old.link)
        if len(touched) > max(MIN_GETS, len(by_index) // 4):
            return False
        for ifindex in touched:
            link = netlink.get_link(self._rtnl, ifindex)
            if link is None:
                by_index.pop(ifindex, None)
            else:
                by_index[ifindex] = link
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
