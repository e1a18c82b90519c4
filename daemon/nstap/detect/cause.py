"""The cause of an anomaly: a kind from a small fixed vocabulary, and one sentence naming the
concrete thing (the rule, the drop reason, the forward, the queue, the peer, the interface).

The kind is what the metrics carry (label ``cause`` of ``nstap_anomaly_active`` and
``nstap_anomalies_total``), so it is bounded: the names below, and ``kernel_drop:<REASON>`` for
a reason of the kernel's ``enum skb_drop_reason`` (a fixed list of the running kernel).
``unknown`` is an honest answer: a wrong cause is worse than none.
"""

from __future__ import annotations

import re
from typing import NamedTuple

FIREWALL_DROP = "firewall_drop"
KERNEL_DROP = "kernel_drop"  # kernel_drop:<REASON>
NAT_MISSING, NAT_SHADOWED, NAT_STALE = "nat_missing", "nat_shadowed", "nat_stale"
ACCEPT_QUEUE_FULL = "accept_queue_full"
PROCESS_NOT_ACCEPTING = "process_not_accepting"  # paused, frozen or stopped
PEER_ANOMALY = "peer_anomaly"
LINK_DOWN = "link_down"
MTU = "mtu"
CONNTRACK_FULL = "conntrack_full"
NO_LISTENER = "no_listener"
NO_ROUTE = "no_route"  # a probe of a published port found no route (EHOSTUNREACH, ENETUNREACH)
SOCKET_NOT_READING = "socket_not_reading"  # a UDP socket whose receive buffer stays full
DNS_UPSTREAM_UNREACHABLE = "dns_upstream_unreachable"  # lookups unanswered: the server (or the embedded resolver's upstream) is silent
DNS_RESOLVER_FAILING = "dns_resolver_failing"  # SERVFAIL/REFUSED from a server
DNS_NXDOMAIN_STORM = "dns_nxdomain_storm"  # NXDOMAIN, often one name tried with every search suffix
DNS_EMBEDDED_DOWN = "dns_embedded_resolver_down"  # Docker's 127.0.0.11 does not answer
UNKNOWN = "unknown"

KINDS = (
    FIREWALL_DROP, NAT_MISSING, NAT_SHADOWED, NAT_STALE, ACCEPT_QUEUE_FULL, PROCESS_NOT_ACCEPTING, PEER_ANOMALY, LINK_DOWN, MTU,
    CONNTRACK_FULL, NO_LISTENER, SOCKET_NOT_READING, UNKNOWN, NO_ROUTE, DNS_UPSTREAM_UNREACHABLE, DNS_RESOLVER_FAILING, DNS_NXDOMAIN_STORM,
    DNS_EMBEDDED_DOWN,
)
MEANINGS = {  # kind -> (when it is named, what its sentence names): docs/reference/detectors.md
    FIREWALL_DROP: (
        "a DROP/REJECT rule of the container's own firewall matched packets in the anomaly's window (or NETFILTER_DROP drops where it has such rules)",
        "table, chain, rule number and text, packets",
    ),
    PROCESS_NOT_ACCEPTING: (
        "the container is paused, frozen or its processes stopped while its listeners overflow, its peers retransmit or its UDP buffers fill",
        "the container, the port and its queue",
    ),
    ACCEPT_QUEUE_FULL: ("listen overflows with the process running", "the port, queue length/limit, overflows"),
    NAT_MISSING: ("the published-port verification found no DNAT rule for the port (or no MASQUERADE)", "the forward and the rule that decides it"),
    NAT_SHADOWED: ("an earlier rule decides the published port's packets", "the forward and the rule that decides it"),
    NAT_STALE: ("the deciding DNAT rule points at an address no container has", "the forward and the rule that decides it"),
    LINK_DOWN: ("an interface or the host end of its veth is down", "the interface"),
    MTU: ("the two ends of a veth disagree on the MTU and packets are lost", "both MTUs, packets lost"),
    CONNTRACK_FULL: ("the host's conntrack table is at its limit, or conntrack dropped flows in the window", "entries/limit, drops"),
    PEER_ANOMALY: (
        "retransmissions to a container that has its own anomaly (the server also names its clients)",
        "the peer, its address, its anomaly id and cause",
    ),
    NO_LISTENER: ("RSTs or NO_SOCKET drops for connections to a port nothing listens on", "counts, the ports that do listen"),
    NO_ROUTE: ("a probe of a published port found no route (EHOSTUNREACH, ENETUNREACH)", "the probe's path and error"),
    SOCKET_NOT_READING: ("UDP datagrams dropped on a full receive buffer", "datagrams"),
    DNS_UPSTREAM_UNREACHABLE: (
        "DNS lookups went unanswered after dns.timeout: the server asked (or the one Docker's embedded resolver forwards to) is silent",
        "the server, its unanswered queries",
    ),
    DNS_RESOLVER_FAILING: ("DNS lookups answered SERVFAIL or REFUSED", "the rcode, the server, a name"),
    DNS_NXDOMAIN_STORM: ("DNS lookups answered NXDOMAIN (a name tried with several search suffixes: a wrong search path or ndots)", "the name and its suffixes"),
    DNS_EMBEDDED_DOWN: ("lookups to Docker's embedded resolver 127.0.0.11 went unanswered and it asked no upstream", "its unanswered queries"),
    UNKNOWN: ("nothing in the window explains it: an honest answer, a wrong cause is worse than none", ""),
}
KERNEL_DROP_MEANING = (
    "the kernel dropped packets in the namespace for a reason a healthy host does not produce (eBPF)",
    "the reason and its count",
)
_REASON = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")


class Cause(NamedTuple):
    """Why an anomaly happened: ``kind`` (bounded, see :func:`valid_kind`) and one sentence."""

    kind: str
    text: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "text": self.text}


UNKNOWN_CAUSE = Cause(UNKNOWN, "no cause found in what nstap saw in the anomaly's window")


def kernel_drop(reason: str) -> str:
    """The cause kind of drops with the kernel's ``reason`` (``kernel_drop:NO_SOCKET``)."""
    return f"{KERNEL_DROP}:{reason}"


def valid_kind(kind: str) -> bool:
    """True if ``kind`` is in the vocabulary."""
    if kind in KINDS:
        return True
    head, sep, reason = kind.partition(":")
    return bool(sep) and head == KERNEL_DROP and bool(_REASON.match(reason))
