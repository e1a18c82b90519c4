"""Why an anomaly happened, from what nstap saw in its window: pure rules, tested as tables.

:class:`Window` is the evidence of one anomaly at one moment — counter and drop-reason deltas
since the sample before the anomaly, the container's own firewall rules and how much each
matched meanwhile, its interfaces, listeners, published ports, the host's conntrack, whether
its process is paused, and the containers its retransmitted flows go to with their anomalies.
:func:`explain` names the cause the evidence shows, most concrete first, or ``unknown``: a rule
fires only on evidence that moved in the window, never on a state alone that a healthy
namespace also has (a DROP rule that matched nothing, a full queue that did not overflow).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from . import cause as c
from .cause import Cause
from .kernel_drops import QUIET_REASONS

RETRANSMIT_KINDS = ("tcp_retransmits", "tcp_syn_sent_stuck")
NAT_KINDS = {"nat_missing": c.NAT_MISSING, "nat_shadowed": c.NAT_SHADOWED, "nat_stale": c.NAT_STALE, "nat_masquerade_missing": c.NAT_MISSING}
CONNTRACK_KINDS = ("conntrack_full", "conntrack_drops")
NOT_ACCEPTING_KINDS = (
    "tcp_listen_overflows", "tcp_accept_stalled", "tcp_syn_recv_stuck", "tcp_collapse", "tcp_retransmits", "tcp_syn_sent_stuck",
    "udp_receive_buffer_errors", "tcp_reset_spike",
)
MAX_NAMED = 3  # rules, interfaces or peers named in one sentence


class RuleHit(NamedTuple):
    """A DROP or REJECT rule of the container's own firewall and what it matched in the window."""

    table: str
    chain: str
    position: int
    target: str
    text: str
    packets: int  # matched in the window


class Link(NamedTuple):
    """One interface of the namespace (or a host end of its veths) and its losses in the window."""

    name: str
    side: str  # "container" or "host"
    peer: str
    up: bool
    mtu: int
    dropped: int  # rx+tx drops and errors in the window


class Listener(NamedTuple):
    port: str
    length: int
    limit: int


class Forward(NamedTuple):
    """A published port of the container and what its verification says now."""

    text: str  # "0.0.0.0:8080/tcp -> 172.17.0.2:80"
    state: str  # ok, missing, stale, shadowed
    rule: str  # the rule that decides it (or would)


class Peer(NamedTuple):
    """A container the namespace's retransmitted flows go to, with an anomaly going on."""

    container: str
    address: str
    anomaly_id: str
    kind: str
    cause: str  # its cause's sentence ("" if unknown)


@dataclass(frozen=True)
class Window:
    """What nstap saw of one anomaly's namespace from the sample before it to now."""

    kind: str
    container: str = ""
    numbers: Mapping[str, object] = field(default_factory=dict)
    counters: Mapping[str, int] = field(default_factory=dict)  # protocol counter increases (nstap's keys)
    drops: Mapping[str, int] = field(default_factory=dict)  # kernel drop reason -> increase (eBPF)
    firewall: Sequence[RuleHit] = ()  # DROP/REJECT rules that matched packets in the window
    firewall_rules: int = 0  # DROP/REJECT rules the firewall holds
    links: Sequence[Link] = ()
    listeners: Sequence[Listener] = ()
    paused: str = ""  # "web is paused (docker pause): its processes cannot accept connections", frozen, stopped ... or ""
    forwards: Sequence[Forward] = ()
    conntrack: tuple[int, int, int] | None = None  # entries, limit, drops in the window (drop + insert_failed + early_drop)
    peers: Sequence[Peer] = ()
    clients: Sequence[str] = ()  # containers whose anomalies name this one as their cause
    hint: Cause | None = None  # the cause the detector itself gave with its finding


def explain(w: Window) -> Cause:
    """The cause the window shows, or ``unknown``."""
    for rule in (_nat, _conntrack_event, _paused, _hint, _link_down, _firewall, _mtu, _conntrack_pressure, _peer, _queue, _no_listener,
                 _not_reading, _kernel_drop):
        found = rule(w)
        if found is not None:
            return _with_clients(found, w)
    return c.UNKNOWN_CAUSE


def _hint(w: Window) -> Cause | None:
    """What the detector knew: it wins over what the window suggests, but not over a paused
    process (a full queue is what a paused listener looks like from the detector's side)."""
    return w.hint


def _with_clients(found: Cause, w: Window) -> Cause:
    if not w.clients:
        return found
    return Cause(found.kind, f"{found.text}; its clients {_names(w.clients)} retransmit because of it")


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_NAMED])
    return shown + (f" and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else "")


def _nat(w: Window) -> Cause | None:
    kind = NAT_KINDS.get(w.kind)
    if kind is None:
        return None
    if w.kind == "nat_masquerade_missing":
        networks = w.numbers.get("networks") or []
        return Cause(kind, f"no MASQUERADE rule: {networks[0] if networks else 'outgoing traffic is not translated'}")
    state = w.kind.removeprefix("nat_")
    broken = [f for f in w.forwards if f.state == state]
    if not broken:
        listed = w.numbers.get("broken") or []
        rules = w.numbers.get("rules") or []
        if not listed:
            return None
        return Cause(kind, _forward_sentence(state, str(listed[0]), str(rules[0]) if rules else ""))
    return Cause(kind, _forward_sentence(state, broken[0].text, broken[0].rule) + (f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""))


def _forward_sentence(state: str, forward: str, rule: str) -> str:
    what = {
        "missing": "has no DNAT rule: outside clients' connections go nowhere",
        "shadowed": "is decided by an earlier rule that sends it elsewhere",
        "stale": "points at an address no container has",
    }.get(state, state)
    return f"published port {forward} {what}" + (f" (deciding rule: {rule})" if rule else "")


def _conntrack_event(w: Window) -> Cause | None:
    if w.kind not in CONNTRACK_KINDS:
        return None
    entries = w.numbers.get("entries")
    limit = w.numbers.get("limit")
    if entries is not None and limit:
        return Cause(c.CONNTRACK_FULL, f"the host's conntrack table holds {entries} of {limit} entries: new flows are dropped")
    words = ", ".join(f"{k} +{v}" for k, v in w.numbers.items())
    return Cause(c.CONNTRACK_FULL, f"the host's conntrack dropped flows ({words})")


def _paused(w: Window) -> Cause | None:
    if not w.paused or w.kind not in NOT_ACCEPTING_KINDS:
        return None
    full = [q for q in w.listeners if q.limit and q.length >= q.limit]
    queue = f"; port {full[0].port} holds {full[0].length}/{full[0].limit} connections nobody accepts" if full else ""
    return Cause(c.PROCESS_NOT_ACCEPTING, f"{w.paused}{queue}")


def _link_down(w: Window) -> Cause | None:
    down = [link for link in w.links if not link.up]
    if not down:
        return None
    named = [f"{link.name} ({'host end of ' + link.peer if link.side == 'host' and link.peer else link.side})" for link in down]
    return Cause(c.LINK_DOWN, f"interface {_names(named)} is down")


def _firewall(w: Window) -> Cause | None:
    hits = sorted((h for h in w.firewall if h.packets > 0), key=lambda h: -h.packets)
    netfilter = w.drops.get("NETFILTER_DROP", 0)
    if not hits:
        if netfilter and w.firewall_rules:
            return Cause(c.FIREWALL_DROP, f"its own firewall dropped {netfilter} packets (NETFILTER_DROP; it holds {w.firewall_rules} DROP/REJECT rules)")
        return None
    top = hits[0]
    more = f"; {len(hits) - 1} more rules matched" if len(hits) > 1 else ""
    verb = "rejected" if top.target == "REJECT" else "dropped"
    return Cause(c.FIREWALL_DROP, f"its own firewall {verb} {top.packets} packets: {top.table} {top.chain} rule {top.position} `{top.text}`{more}")


def _mtu(w: Window) -> Cause | None:
    by_name = {link.name: link for link in w.links}
    for link in w.links:
        other = by_name.get(link.peer) if link.peer else None
        if other is None or not link.mtu or not other.mtu or link.mtu == other.mtu:
            continue
        small, big = (link, other) if link.mtu < other.mtu else (other, link)
        lost = link.dropped + other.dropped
        if lost > 0 or w.kind == "interface_drops":
            return Cause(
                c.MTU, f"{small.name} ({small.side}) has MTU {small.mtu} and its other end {big.name} ({big.side}) {big.mtu}: "
                f"larger packets are dropped ({lost} in the window)",
            )
    return None


def _conntrack_pressure(w: Window) -> Cause | None:
    if w.conntrack is None:
        return None
    entries, limit, dropped = w.conntrack
    if dropped > 0 or (limit and entries >= limit):
        return Cause(c.CONNTRACK_FULL, f"the host's conntrack table holds {entries} of {limit} entries and dropped {dropped} flows in the window")
    return None


def _peer(w: Window) -> Cause | None:
    if w.kind not in RETRANSMIT_KINDS or not w.peers:
        return None
    p = w.peers[0]
    why = f": {p.cause}" if p.cause else ""
    more = f" (and {len(w.peers) - 1} more peers)" if len(w.peers) > 1 else ""
    return Cause(c.PEER_ANOMALY, f"its retransmissions go to {p.container} ({p.address}), which has anomaly {p.anomaly_id} ({p.kind}){why}{more}")


def _queue(w: Window) -> Cause | None:
    if w.kind != "tcp_listen_overflows":
        return None
    overflows = w.counters.get("tcp_listen_overflows", 0)
    full = sorted((q for q in w.listeners if q.limit), key=lambda q: -q.length / q.limit)
    if full and full[0].length >= full[0].limit:
        q = full[0]
        return Cause(c.ACCEPT_QUEUE_FULL, f"port {q.port}'s accept queue is full ({q.length}/{q.limit}): {overflows} connections overflowed it")
    if overflows:
        port = f" (busiest listener: port {full[0].port}, {full[0].length}/{full[0].limit})" if full else ""
        return Cause(c.ACCEPT_QUEUE_FULL, f"{overflows} connections overflowed a listener's accept queue{port}")
    return None


def _top_reason(w: Window) -> str:
    """The drop reason that grew most in the window, of those a healthy host does not produce."""
    reasons = [(n, r) for r, n in w.drops.items() if n > 0 and r not in QUIET_REASONS]
    return max(reasons)[1] if reasons else ""


def _no_listener(w: Window) -> Cause | None:
    if w.kind != "tcp_reset_spike" and not (w.kind == "kernel_drops" and _top_reason(w) == "NO_SOCKET"):
        return None
    no_socket = w.drops.get("NO_SOCKET", 0)
    resets = w.counters.get("tcp_resets_sent", 0)
    established = w.counters.get("tcp_established_resets", 0)
    listening = ", ".join(q.port for q in w.listeners[:5]) or "none"
    if no_socket:
        return Cause(c.NO_LISTENER, f"{no_socket} packets came for ports nothing listens on (NO_SOCKET), answered with {resets} RSTs; listening: {listening}")
    if resets and not established:
        return Cause(c.NO_LISTENER, f"{resets} RSTs answered connection attempts, none to an established connection: nothing listens on the port asked (listening: {listening})")
    return None


def _not_reading(w: Window) -> Cause | None:
    if w.kind != "udp_receive_buffer_errors" and not (w.kind == "kernel_drops" and _top_reason(w) == "SOCKET_RCVBUFF"):
        return None
    errors = w.counters.get("udp_receive_buffer_errors", 0) or w.numbers.get("increase", 0) or w.drops.get("SOCKET_RCVBUFF", 0)
    return Cause(c.SOCKET_NOT_READING, f"{errors} UDP datagrams dropped because a socket's receive buffer was full: its process does not read fast enough")


def _kernel_drop(w: Window) -> Cause | None:
    reasons = sorted(((r, n) for r, n in w.drops.items() if n > 0 and r not in QUIET_REASONS), key=lambda x: -x[1])
    if not reasons:
        return None
    reason, count = reasons[0]
    others = f" (also {', '.join(f'{r} {n}' for r, n in reasons[1:MAX_NAMED])})" if len(reasons) > 1 else ""
    return Cause(c.kernel_drop(reason), f"the kernel dropped {count} packets in the namespace with reason {reason}{others}")
