"""Gathers an anomaly's :class:`~nstap.detect.causes.Window` from what nstap holds, and names its
cause with :func:`~nstap.detect.causes.explain`.

What it reads, all already in memory (nothing here enters a namespace or runs a tool): the
namespace's samples (the one before the anomaly, the latest), the NAT monitor's view (the
container's own firewall rules with their counters, its published ports' verdicts, the host's
conntrack totals), the eBPF collector's retransmitted flows, the registry (who owns which
address, whose container is paused) and the other namespaces' anomalies going on. At an
anomaly's start it keeps the counters a later window is measured from (:class:`Start`): one per
anomaly going on, gone with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..index import AnomalyRow
from ..registry import ContainerRegistry, WatchedNamespace
from ..samples import NamespaceSample
from .base import increase
from .cause import PEER_ANOMALY, UNKNOWN, Cause
from .causes import NOT_ACCEPTING_KINDS, RETRANSMIT_KINDS, Forward, Link, Listener, Peer, RuleHit, Window, explain
from .process_state import ProcessStateReader

if TYPE_CHECKING:
    from ..ebpf.service import EbpfService
    from ..nat.monitor import NatMonitor

CONNTRACK_DROPS = ("drop", "insert_failed", "early_drop")
MAX_PEERS = 5
PROCESS_EVERY = 5.0  # seconds between looks at one namespace's processes (freezer, stopped) while it has such an anomaly


@dataclass
class Start:
    """What an anomaly's window is measured from, kept from its start."""

    sample: NamespaceSample | None  # the namespace's sample before the one that tripped
    firewall: dict[tuple[str, str, int, str], int] = field(default_factory=dict)  # rule -> packets then
    conntrack: dict[str, int] = field(default_factory=dict)  # the host's conntrack statistics then


class CauseFinder:
    """Names the causes of anomalies; see the module doc."""

    def __init__(self, registry: ContainerRegistry, processes: ProcessStateReader | None = None) -> None:
        self.registry = registry
        self.processes = processes or ProcessStateReader()
        self._held: dict[int, tuple[float, str]] = {}  # netns -> (when, what keeps its processes from running)
        self.nat: NatMonitor | None = None  # set by the daemon when the NAT monitor runs
        self.ebpf: EbpfService | None = None  # likewise, for the retransmitted flows
        self._owners: dict[str, int] | None = None  # address -> netns of the container that has it
        registry.subscribe(self._registry_changed)

    def _registry_changed(self) -> None:
        self._owners = None  # rebuilt at the next peer lookup
        self._held.clear()  # a pause or an unpause changes the members' status: looked at again

    def start(self, ns: WatchedNamespace | None, before: NamespaceSample | None) -> Start:
        """The counters an anomaly of ``ns`` starting now is measured from."""
        start = Start(before)
        nat = self.nat
        if nat is not None:
            if ns is not None:
                fw = nat.firewalls.get(ns.inode)
                if fw is not None:
                    start.firewall = {(r.table, r.chain, r.position, r.text): r.packets for r in fw.rules}
            ct = nat.state.conntrack
            if ct is not None:
                start.conntrack = {k: ct.stats.get(k, 0) for k in CONNTRACK_DROPS}
        return start

    def explain(
        self, ns: WatchedNamespace | None, row: AnomalyRow, sample: NamespaceSample | None, start: Start,
        active: Mapping[int, Sequence[AnomalyRow]], clients: Sequence[str] = (), hint: Cause | None = None,
    ) -> tuple[Cause, int | None]:
        """The anomaly's cause now (``hint``: the one its detector gave), and the namespace of the
        peer it blames (None if none)."""
        window, peer = self.window(ns, row, sample, start, active, clients)
        if hint is not None:
            window = replace(window, hint=hint)
        return explain(window), peer

    def window(
        self, ns: WatchedNamespace | None, row: AnomalyRow, sample: NamespaceSample | None, start: Start,
        active: Mapping[int, Sequence[AnomalyRow]], clients: Sequence[str] = (),
    ) -> tuple[Window, int | None]:
        """The evidence of ``row`` now (``active``: the anomalies going on, by namespace;
        ``clients``: the containers whose anomalies blame this one)."""
        before = start.sample
        fields: dict[str, Any] = {"kind": row.kind, "container": row.container, "numbers": row.numbers}
        if sample is not None:
            fields.update(_sample_fields(sample, before))
        if ns is not None and row.kind in NOT_ACCEPTING_KINDS:
            fields["paused"] = self.held(ns, row.last_seen)
        fields["clients"] = tuple(clients)
        fields.update(self._nat_fields(ns, start))
        peer_netns = None
        if ns is not None and row.kind in RETRANSMIT_KINDS:
            peers, peer_netns = self._peers(ns.inode, active)
            fields["peers"] = peers
        return Window(**fields), peer_netns

    def held(self, ns: WatchedNamespace, at: float) -> str:
        """What keeps the namespace's processes from running (paused, frozen, stopped), in a
        sentence ("" if nothing does), read at most every PROCESS_EVERY seconds (cgroup and /proc
        files of its containers; a pause or unpause the runtime reports is seen at once)."""
        held = self._held.get(ns.inode)
        if held is None or not 0 <= at - held[0] < PROCESS_EVERY:
            if len(self._held) >= 4096:
                self._held.clear()
            held = self._held[ns.inode] = (at, self.processes.describe(ns.members))
        return held[1]

    def _nat_fields(self, ns: WatchedNamespace | None, start: Start) -> dict[str, Any]:
        nat = self.nat
        if nat is None:
            return {}
        out: dict[str, Any] = {}
        if ns is not None:
            fw = nat.firewalls.get(ns.inode)
            if fw is not None and fw.rules:
                nat.read_counters_soon(ns.inode)  # for the next look: which rule matched since
            if fw is not None:
                out["firewall_rules"] = len(fw.rules)
                out["firewall"] = tuple(
                    RuleHit(r.table, r.chain, r.position, r.target, r.text, r.packets - start.firewall.get((r.table, r.chain, r.position, r.text), 0))
                    for r in fw.rules if r.packets > start.firewall.get((r.table, r.chain, r.position, r.text), 0)
                )
            ids = {m.id for m in ns.members}
            out["forwards"] = tuple(Forward(f.describe(), f.state, f.rule) for f in nat.state.forwards_of(ids))
        ct = nat.state.conntrack
        if ct is not None:
            dropped = sum(max(0, ct.stats.get(k, 0) - start.conntrack.get(k, ct.stats.get(k, 0))) for k in CONNTRACK_DROPS)
            out["conntrack"] = (ct.entries, ct.limit, dropped)
        return out

    def _peers(self, netns: int, active: Mapping[int, Sequence[AnomalyRow]]) -> tuple[tuple[Peer, ...], int | None]:
        """Containers with an anomaly going on that this namespace's retransmitted flows go to."""
        ebpf = self.ebpf
        if ebpf is None or not ebpf.up:
            return (), None
        owners = self._owners
        if owners is None:
            owners = self._owners = {
                a: inode for inode, ns in self.registry.namespaces().items() for m in ns.members for n in m.networks for a in (n.ipv4, n.ipv6) if a
            }
        peers: list[Peer] = []
        seen: set[int] = set()
        first = None
        for flow in ebpf.retransmits({netns}):
            inode = owners.get(flow["remote"])
            if inode is None or inode == netns or inode in seen:
                continue
            seen.add(inode)  # one peer per namespace, whatever the flows to it
            # A peer's own retransmissions blamed on this namespace are not a cause of ours.
            theirs = [r for r in active.get(inode, ()) if r.kind not in RETRANSMIT_KINDS or r.cause not in (UNKNOWN, PEER_ANOMALY)]
            if not theirs:
                continue
            r = theirs[0]
            peers.append(Peer(r.container, f"{flow['remote']}:{flow['remote_port']}", r.id, r.kind, r.cause_text if r.cause != UNKNOWN else ""))
            first = inode if first is None else first
            if len(peers) >= MAX_PEERS:
                break
        return tuple(peers), first


def _sample_fields(sample: NamespaceSample, before: NamespaceSample | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if sample.protocols is not None and before is not None and before.protocols is not None:
        out["counters"] = {k: increase(v, before.protocols.get(k)) for k, v in sample.protocols.items() if k in before.protocols}
    if sample.kernel_drops is not None and before is not None and before.kernel_drops is not None:
        out["drops"] = {r: increase(n, before.kernel_drops.get(r, 0)) for r, n in sample.kernel_drops.items()}
    if sample.interfaces is not None:
        old = {(i.name, i.side): i for i in (before.interfaces or ())} if before is not None else {}
        links = []
        for i in sample.interfaces:
            was = old.get((i.name, i.side))
            lost = 0
            if was is not None:
                lost = sum(increase(getattr(i, k), getattr(was, k)) for k in ("rx_drops", "rx_errors", "tx_drops", "tx_errors"))
            links.append(Link(i.name, i.side, i.peer, i.up, i.mtu, lost))
        out["links"] = tuple(links)
    if sample.sockets is not None:
        out["listeners"] = tuple(Listener(q.port, q.length, q.limit) for q in sample.sockets.listen)
    return out

