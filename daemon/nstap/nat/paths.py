"""Which rule decides a packet's fate in a netfilter table: a small evaluator of parsed rules.

A published port is verified by following the packet that should reach it — from outside, to the
host port — through ``nat PREROUTING`` and every chain it jumps to, the way the kernel would. The
packet is partly unknown (its source is "some outside address"; a port published on every address
goes to "some local address"), so a condition evaluates to yes, no or *maybe*. The walk is
optimistic: a rule that *may* match never decides against the forward — only a rule that surely
matches can shadow it, and a DNAT to the right place counts even when it only may match. So a
state other than ``ok`` is something nstap is sure of.

Pure functions over :mod:`nstap.nat.rules`; tested with tables of recorded rulesets.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Callable
from typing import NamedTuple

from .rules import Chain, Rule

MAX_DEPTH = 16  # chain jumps followed (the kernel allows more; loops are refused by iptables)
MAX_STEPS = 200_000  # rules looked at per walk: a huge ruleset cannot make one walk unbounded
OUTSIDE = {4: ipaddress.ip_address("198.51.100.1"), 6: ipaddress.ip_address("2001:db8::1")}  # documentation ranges
LOOPBACK = {4: ipaddress.ip_network("127.0.0.0/8"), 6: ipaddress.ip_network("::1/128")}
NAT_TARGETS = frozenset({"DNAT", "REDIRECT", "NETMAP"})
MASQ_TARGETS = frozenset({"MASQUERADE", "SNAT"})
DECIDING = frozenset({"ACCEPT", "DROP", "REJECT", "DNAT", "SNAT", "MASQUERADE", "REDIRECT", "NETMAP"})

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


class Packet(NamedTuple):
    """The packet a walk follows. ``src``/``dst`` None: some outside address / some local address
    of the host (not loopback). ``inbound``: it arrived on an outside interface (not a container's
    bridge or veth); ``outbound``: it leaves through one."""

    family: int
    proto: str
    src: IP | None
    dst: IP | None
    dport: int
    inbound: bool = True
    outbound: bool = True
    mark: int = 0  # packets are taken as unmarked: nstap does not read the mangle table


class Step(NamedTuple):
    """A deciding rule met on the walk, and whether the packet surely reaches and matches it."""

    rule: Rule
    certain: bool


def container_interface(name: str) -> bool:
    """True for the interface names Docker, Podman (CNI, netavark) give bridges and veths."""
    return name in ("docker0", "podman0", "cni-podman0") or name.startswith(("br-", "veth", "cni-", "podman", "docker"))


def _iface(pattern: str, packet_on_container_side: bool) -> bool | None:
    # The packet's interface is "some outside interface" or "some container bridge/veth": a
    # pattern of the other kind surely does not match it; one of the same kind may.
    name = pattern[:-1] if pattern.endswith("+") else pattern
    if not name:
        return True  # "+" matches every interface
    if container_interface(name) != packet_on_container_side:
        return False
    return None


def _dst(value, pkt: Packet) -> bool | None:
    if pkt.dst is not None:
        return pkt.dst.version == value.version and pkt.dst in value
    if value.version != pkt.family:
        return False
    if value.prefixlen == 0:
        return True
    if LOOPBACK[pkt.family].supernet_of(value) or value.is_multicast:
        return False  # "some local address" of an inbound packet is never loopback or multicast
    return None


def _src(value, pkt: Packet) -> bool | None:
    if pkt.src is not None:
        return pkt.src.version == value.version and pkt.src in value
    if value.version != pkt.family:
        return False
    if value.prefixlen == 0:
        return True
    if value.is_private or value.is_loopback or value.is_multicast:
        return False  # "some outside address" stands for the internet, not a local or container range
    return None


def _addrtype(value: str, local: bool) -> bool | None:
    if value == "LOCAL":
        return local
    if value == "UNICAST":
        return True
    if value in ("BROADCAST", "MULTICAST", "ANYCAST", "BLACKHOLE", "UNREACHABLE", "PROHIBIT", "NAT", "XRESOLVE", "THROW"):
        return False
    return None


def matches(rule: Rule, pkt: Packet) -> bool | None:
    """True if ``pkt`` surely matches ``rule``'s conditions, False if surely not, None if it may."""
    result: bool | None = True
    for negated, key, value in rule.conds:
        if key == "proto":
            m: bool | None = value in (pkt.proto, "all") or (value == "6" and pkt.proto == "tcp") or (value == "17" and pkt.proto == "udp")
        elif key == "dport":
            m = any(low <= pkt.dport <= high for low, high in value)  # type: ignore[union-attr]
        elif key == "dst":
            m = _dst(value, pkt)
        elif key == "src":
            m = _src(value, pkt)
        elif key == "in":
            m = _iface(str(value), not pkt.inbound)
        elif key == "out":
            m = _iface(str(value), not pkt.outbound)
        elif key == "dst_type":
            m = _addrtype(str(value), pkt.inbound)  # inbound packets go to the host; outbound ones leave it
        elif key == "mark":
            mark, mask = value  # type: ignore[misc]
            m = (pkt.mark & mask) == mark
        elif key == "src_type":
            m = _addrtype(str(value), False)  # neither comes from the host itself
        else:
            m = None
        if m is not None and negated:
            m = not m
        if m is False:
            return False
        if m is None:
            result = None
    return result


MAX_INDEXED_RANGE = 16  # a rule for a port range wider than this is looked at by every walk


def _port_index(chain: Chain) -> tuple[list[Rule], dict[int, list[Rule]]]:
    """The chain's rules split into those any destination port may reach and those for a few
    ports only, by port: a walk for one port looks at the first and at its own entry of the
    second, not at thousands of other ports' DNAT rules."""
    wild: list[Rule] = []
    by_port: dict[int, list[Rule]] = {}
    for rule in chain.rules:
        ports = [value for negated, key, value in rule.conds if key == "dport" and not negated]
        span = sum(high - low + 1 for low, high in ports[0]) if ports else 0  # type: ignore[union-attr]
        if not ports or span > MAX_INDEXED_RANGE:
            wild.append(rule)
            continue
        for low, high in ports[0]:  # type: ignore[union-attr]
            for port in range(low, high + 1):
                by_port.setdefault(port, []).append(rule)
    return wild, by_port


def candidates(chain: Chain, dport: int) -> list[Rule]:
    """The rules of ``chain`` a packet to ``dport`` may match, in order."""
    index = chain.index
    if index is None:
        index = chain.index = _port_index(chain)
    wild, by_port = index
    hits = by_port.get(dport)
    if not hits:
        return wild
    if not wild:
        return hits
    return list(heapq.merge(wild, hits, key=lambda r: r.position))


def walk(chains: dict[str, Chain], start: str, pkt: Packet) -> list[Step]:
    """The deciding rules met from chain ``start`` in order, up to the first the packet surely
    reaches and matches (the last element then has ``certain`` True)."""
    steps: list[Step] = []
    budget = [MAX_STEPS]

    def run(name: str, certain: bool, depth: int) -> bool:  # True: a certain decision was made
        chain = chains.get(name)
        if chain is None:
            return False
        for rule in candidates(chain, pkt.dport):
            budget[0] -= 1
            if budget[0] < 0:
                return True
            m = matches(rule, pkt)
            if m is False:
                continue
            sure = certain and m is True
            target = rule.target
            if target in chains and target not in DECIDING:
                if depth < MAX_DEPTH and run(target, sure, depth + 1):
                    return True
                if rule.goto and sure:
                    return False
                continue
            if target == "RETURN":
                if sure:
                    return False
                continue
            if target in DECIDING:
                steps.append(Step(rule, sure))
                if sure:
                    return True
        return False

    run(start, True, 0)
    return steps


class Verdict(NamedTuple):
    """A forward's state, the rule that decided it (None when none did) and why, in one line."""

    state: str  # ok, missing, stale, shadowed
    rule: Rule | None
    detail: str


def _leads_to(rule: Rule, address: str, port: int) -> bool:
    d = rule.dnat
    if d is None or rule.target not in NAT_TARGETS or d.address is None:
        return False
    return d.address == address and (d.port_low == 0 and d.port_high == 0 or d.port_low <= port <= d.port_high)


def verify_forward(
    chains: dict[str, Chain],
    pkt: Packet,
    address: str,
    port: int,
    live: Callable[[str], bool],
    targets: dict[str, list[Rule]] | None = None,
) -> Verdict:
    """Does the packet reach ``address:port`` through ``chains`` (a nat table)?

    ``live(ip)`` says whether some running container has that address now: a DNAT to an address
    no container has is *stale*, one to another container (or a REDIRECT or ACCEPT before the
    right DNAT) *shadows* the forward.
    """
    steps = walk(chains, "PREROUTING", pkt)
    for rule, certain in steps:
        if _leads_to(rule, address, port):
            return Verdict("ok", rule, "")
        if not certain:
            continue
        if rule.dnat is not None and rule.target in NAT_TARGETS:
            to = rule.dnat.address
            where = f"{to}:{rule.dnat.port_low}" if to else f"the host port {rule.dnat.port_low or pkt.dport}"
            if to == address:
                return Verdict("stale", rule, f"sends it to port {rule.dnat.port_low} of the container, not {port}")
            if to is not None and not live(to):
                return Verdict("stale", rule, f"sends it to {where}, which no running container has")
            return Verdict("shadowed", rule, f"an earlier rule sends it to {where}")
        if _exists(chains, address, port, targets):
            return Verdict("shadowed", rule, f"an earlier rule ({rule.target}) ends its NAT before the DNAT")
        return Verdict("missing", rule, f"no DNAT rule: {rule.target} decides it first")
    existing = _exists(chains, address, port, targets)
    if existing is not None:
        return Verdict("missing", existing, f"a DNAT rule exists in {existing.chain} but nothing leads to it from PREROUTING")
    return Verdict("missing", None, "no DNAT rule for it")


def dnat_targets(chains: dict[str, Chain]) -> dict[str, list[Rule]]:
    """Every DNAT/NETMAP rule of the chains, by the address it sends packets to (built once per
    read: a host with 10,000 rules is not searched once per forward)."""
    out: dict[str, list[Rule]] = {}
    for chain in chains.values():
        for rule in chain.rules:
            if rule.dnat is not None and rule.dnat.address is not None and rule.target in NAT_TARGETS:
                out.setdefault(rule.dnat.address, []).append(rule)
    return out


def _exists(chains: dict[str, Chain], address: str, port: int, targets: dict[str, list[Rule]] | None = None) -> Rule | None:
    rules = (targets if targets is not None else dnat_targets(chains)).get(address, ())
    for rule in rules:
        if _leads_to(rule, address, port):
            return rule
    return None


def verify_masquerade(chains: dict[str, Chain], family: int, source: str) -> Verdict:
    """Is traffic from ``source`` (a container address) to the outside masqueraded or SNATed?"""
    pkt = Packet(family, "tcp", ipaddress.ip_address(source), OUTSIDE[family], 443, inbound=False, outbound=True)
    for rule, certain in walk(chains, "POSTROUTING", pkt):
        if rule.target in MASQ_TARGETS:
            return Verdict("ok", rule, "")
        if certain:
            return Verdict("missing", rule, f"{rule.target} decides it before any MASQUERADE")
    return Verdict("missing", None, f"no MASQUERADE or SNAT for {source} to the outside")


__all__ = ["OUTSIDE", "Packet", "Step", "Verdict", "container_interface", "matches", "verify_forward", "verify_masquerade", "walk"]
