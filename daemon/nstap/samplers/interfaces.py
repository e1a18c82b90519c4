"""Interface sampler: every interface in a container's namespace, and the host-side veth peer of each.

Drops on the host side of a veth (the bridge end) are the ones people miss with ``ip -s link``
inside the container. The host side is matched exactly, not by name or by ``@ifN`` guesswork: the
host veth whose IFLA_LINK_NETNSID is the id the host gave the container's namespace and whose
IFLA_LINK is the container interface's ifindex.

What a container controls is bounded: past ``max_interfaces`` interfaces (by ifindex, so the first
ones — lo, eth0 — keep their names), the rest are summed into one ``interface="other"``.
"""

from __future__ import annotations

import asyncio

from ..netns import netlink
from ..netns.handles import NamespaceHandles
from ..netns.links import DevCounters, LinkTable
from ..samples import InterfaceCounters

OTHER = "other"  # the interface label of the interfaces past max_interfaces, summed


class HostLinks:
    """The host namespace's interfaces, shared by all watchers and read once per sampling round.

    The watcher pool calls :meth:`new_round` when a tick starts; the first watcher that needs
    the host side in that round reads it, the others reuse what it read. Create it on the event
    loop: it watches the host's link-change notifications there.
    """

    def __init__(self, handles: NamespaceHandles) -> None:
        self._handles = handles
        self._table = LinkTable(handles.rtnl, handles.rtnl_events, handles.proc["dev"])
        self._table.follow(asyncio.get_running_loop())
        self._stale = True
        self._peers: dict[tuple[int, int], netlink.LinkInfo] = {}
        self._counters: dict[str, DevCounters] = {}

    @property
    def generation(self) -> int:
        """Changes whenever the host's interfaces changed."""
        return self._table.generation

    def new_round(self) -> None:
        """A sampling round starts: read the host now, before any namespace is sampled, so that
        no namespace's sample is charged for the host's interfaces."""
        self._stale = True
        self.refresh()

    def refresh(self) -> None:
        """Read host counters (and metadata if it changed) if not read yet this round."""
        if not self._stale:
            return
        self._stale = False
        if self._table.refresh():
            self._peers = {
                (link.link_netnsid, link.link): link
                for link in self._table.links().values()
                if link.kind == "veth" and link.link_netnsid >= 0
            }
        self._counters = self._table.counters()

    def nsid_of(self, ns_fd: int) -> int:
        """The id the host gave the namespace behind ``ns_fd`` (-1: none, so no veth into it)."""
        return netlink.get_nsid(self._handles.rtnl, ns_fd)

    def peer(self, nsid: int, ifindex: int) -> netlink.LinkInfo | None:
        """The host veth whose peer is interface ``ifindex`` in namespace ``nsid``."""
        return self._peers.get((nsid, ifindex))

    def counters(self, name: str) -> DevCounters | None:
        """Counters of one host interface from the latest read."""
        return self._counters.get(name)

    def close(self) -> None:
        """Close the host handles."""
        self._table.close()
        self._handles.close()


class InterfaceSampler:
    """Counters and state of a namespace's interfaces and of their host-side veth peers."""

    name = "interfaces"

    def __init__(self, handles: NamespaceHandles, host: HostLinks | None, max_interfaces: int = 64) -> None:
        self._handles = handles
        self._max = max_interfaces
        self._table = LinkTable(handles.rtnl, handles.rtnl_events, handles.proc["dev"])
        self._table.follow(asyncio.get_running_loop())
        self._host = host
        self._seen = (-1, -1)  # (container generation, host generation) the peer map was built for
        self._peer_of: dict[int, netlink.LinkInfo] = {}
        self._last_key: tuple = ()
        self._last: tuple[InterfaceCounters, ...] = ()

    def _match_peers(self) -> None:
        self._peer_of = {}
        host = self._host
        if host is None:
            return
        nsid = host.nsid_of(self._handles.ns_fd)
        if nsid < 0:
            return
        for link in self._table.links().values():
            peer = host.peer(nsid, link.ifindex)
            if peer is not None:
                self._peer_of[link.ifindex] = peer

    def close(self) -> None:
        """Stop following link changes (before the handles close)."""
        self._table.close()

    def load(self) -> str:
        """What a sample has to read, for the log line of a namespace that costs too much."""
        return f"{len(self._table.links())} interfaces"

    def take_loop_cpu(self) -> float:
        """The CPU the event loop spent on this namespace's link announcements since the last call."""
        return self._table.take_notified_cpu()

    def work(self) -> int:
        """What the namespace made this sample read: its interfaces, and the link announcements
        received since the last sample (see NamespaceWatcher.account)."""
        return len(self._table.links()) + self._table.take_notices()

    def sample(self) -> tuple[InterfaceCounters, ...]:
        """Read every interface now."""
        table = self._table
        table.refresh()
        host = self._host
        if host is not None:
            host.refresh()
            seen = (table.generation, host.generation)
        else:
            seen = (table.generation, -1)
        if seen != self._seen:
            self._match_peers()
            self._seen = seen
        raw = table.read_counters()
        host_counters = tuple(host.counters(peer.name) for peer in self._peer_of.values()) if host is not None else ()
        key = (raw, seen, host_counters)
        if key == self._last_key:  # nothing moved on either side: the same answer as last time
            return self._last
        links = table.links()
        out = []
        named = []
        for name, c in table.counters(raw).items():
            link = links.get(name)
            if link is not None:  # else it appeared since the last metadata dump; next sample has it
                named.append((link.ifindex, name, link, c))
        overflow = len(named) > self._max
        if overflow:
            named.sort(key=lambda item: item[0])
        other: list[int] | None = None
        other_up = True
        for i, (_ifindex, name, link, c) in enumerate(named):
            if overflow and (i >= self._max or name == OTHER):  # an interface called "other" joins them
                other = [a + b for a, b in zip(other, c)] if other is not None else list(c)
                other_up = other_up and link.up
                continue
            peer = self._peer_of.get(link.ifindex)
            out.append(InterfaceCounters(name, "container", peer.name if peer else "", link.up, link.mtu, *c))
            if peer is not None and host is not None:
                hc = host.counters(peer.name)
                if hc is not None:
                    out.append(InterfaceCounters(peer.name, "host", name, peer.up, peer.mtu, *hc))
        if other is not None:
            out.append(InterfaceCounters(OTHER, "container", "", other_up, 0, *other))
        self._last_key, self._last = key, tuple(out)
        return self._last
