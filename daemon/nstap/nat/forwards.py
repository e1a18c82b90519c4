"""Every published port of every container, checked against the host's NAT rules.

One pass over one read of the rules serves every container: for each port a runtime says it
publishes, the packet that should reach it is followed through the nat table (native nftables
chains that run first, iptables' PREROUTING, native chains that run after) by
:mod:`nstap.nat.paths`, and the forward gets its state:

* ``ok``: a DNAT leads to the container's current address and port first (and, where the runtime
  uses a userland proxy, a socket holds the host port);
* ``missing``: nothing leads there (no rule, a rule nothing jumps to, or no proxy listener);
* ``stale``: the deciding rule points at an address no running container has, or at the wrong
  port of this one;
* ``shadowed``: an earlier rule sends the packet elsewhere (another container, a REDIRECT) or ends
  its NAT first.

DNAT rules that point into a container network at an address no container has any more are listed
as forwards of no container (state ``stale``). Pure: the monitor feeds it what it read.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from ..runtime.records import ContainerRecord, PortBinding
from .nft import NativeRuleset
from .paths import Packet, Verdict, dnat_targets, verify_forward, verify_masquerade
from .rules import Chain, Rule, Ruleset

MAX_ORPHANS = 256  # forwards of no container listed (a host can hold any number of leftover rules)
DEFAULT_NETWORKS = frozenset({"bridge", "podman"})  # their MASQUERADE is always expected
PROXY_NETWORK_MODES = ("slirp4netns", "pasta")  # rootless: a user-space forwarder, no DNAT
_CONTAINER_ID = re.compile(r"\bid: \"?([0-9a-f]{64})")
STATES = ("ok", "missing", "stale", "shadowed")


@dataclass(frozen=True, slots=True)
class Forward:
    """One published port (or a leftover DNAT rule of no container) and its verified state."""

    container_id: str  # full id; "" for a rule of no container
    container: str
    runtime: str
    protocol: str
    host_ip: str
    host_port: int
    container_ip: str
    container_port: int
    backend: str  # iptables-nft, iptables-legacy, nftables, userland-proxy, none
    state: str
    rule: str  # the deciding rule's text ("" when none)
    chain: str
    detail: str
    new_connections: int  # the DNAT rule's packet counter: it counts a connection's first packet only
    counter: tuple[int, int] = (-1, -1)  # (iptables ruleset, counter line) of that rule: refreshed without a parse

    def to_json(self) -> dict[str, object]:
        """The forward as the API and the evidence show it."""
        return {
            "container": self.container, "container_id": self.container_id[:12], "runtime": self.runtime,
            "protocol": self.protocol, "host_ip": self.host_ip, "host_port": self.host_port,
            "container_ip": self.container_ip, "container_port": self.container_port, "backend": self.backend,
            "state": self.state, "rule": self.rule, "chain": self.chain, "detail": self.detail,
            "new_connections": self.new_connections,
        }

    def describe(self) -> str:
        """One line: the forward and, if it is broken, why."""
        host = f"[{self.host_ip}]" if ":" in self.host_ip else self.host_ip
        dest = f"[{self.container_ip}]" if ":" in self.container_ip else self.container_ip
        line = f"{self.protocol} {host or '*'}:{self.host_port} -> {dest or '?'}:{self.container_port} {self.state}"
        return f"{line}: {self.detail}" if self.detail else line


@dataclass(frozen=True, slots=True)
class Masquerade:
    """Whether a container's outbound traffic on one network is masqueraded."""

    container_id: str
    network: str
    subnet: str
    source: str
    state: str  # ok, missing
    rule: str
    detail: str


@dataclass(slots=True)
class HostRules:
    """One read of the host's NAT rules: iptables-save per family and back end, and native nftables."""

    iptables: list[Ruleset] = field(default_factory=list)
    native: NativeRuleset | None = None
    _origin: dict[int, int] | None = None

    def origin(self, rule: Rule) -> int:
        """Index in ``iptables`` of the ruleset a rule was read from; -1 for a native rule."""
        if self._origin is None:
            self._origin = {id(r): i for i, rules in enumerate(self.iptables) for r in rules.rules("nat")}
        return self._origin.get(id(rule), -1)

    def nat_chains(self, family: int, hook: str) -> dict[str, Chain]:
        """The chains a packet of ``family`` meets at ``hook`` (PREROUTING or POSTROUTING), composed
        into one ``hook``-named start chain: native chains before, iptables', native chains after."""
        native = self.native
        chains: dict[str, Chain] = {}
        start = Chain(hook, "ACCEPT")
        before, after = native.nat_bases(family, hook.lower()) if native is not None else ([], [])
        if native is not None:
            chains.update(native.chains)
        for base in before:
            start.rules.append(_jump(hook, base.key))
        mine = [r for r in self.iptables if r.family == family]
        for rules in mine:
            table = rules.tables.get("nat", {})
            prefix = f"{rules.backend}:" if len(mine) > 1 else ""
            for name, chain in table.items():
                chains[prefix + name if name != hook else f"{rules.backend} {hook}"] = chain if not prefix else _renamed(chain, prefix, table)
            if hook in table:
                start.rules.append(_jump(hook, f"{rules.backend} {hook}"))
        for base in after:
            start.rules.append(_jump(hook, base.key))
        chains[hook] = start
        return chains

    def all_nat_rules(self) -> Iterable[tuple[str, Rule]]:
        """(backend, rule) for every rule of every nat table read."""
        for rules in self.iptables:
            for rule in rules.rules("nat"):
                yield rules.backend, rule
        if self.native is not None:
            for chain in self.native.chains.values():
                for rule in chain.rules:
                    yield "nftables", rule

    def backend_of(self, rule: Rule) -> str:
        """The back end a rule was read from."""
        index = self.origin(rule)
        return self.iptables[index].backend if index >= 0 else "nftables"


def _jump(chain: str, target: str) -> Rule:
    return Rule("nat", chain, 0, f"-j {target}", 0, 0, (), target)


def _renamed(chain: Chain, prefix: str, table: dict[str, Chain]) -> Chain:
    # Two back ends of one family (nf_tables and legacy) may both have a DOCKER chain: keep them apart.
    out = Chain(prefix + chain.name, chain.policy)
    for rule in chain.rules:
        target = prefix + rule.target if rule.target in table else rule.target
        out.rules.append(Rule(rule.table, rule.chain, rule.position, rule.text, rule.packets, rule.bytes, rule.conds, target, rule.goto, rule.dnat, rule.comment))
    return out


def refresh_counters(forwards: Iterable[Forward], counts: list[list[tuple[int, int]]]) -> list[Forward]:
    """The forwards with their rules' packet counters from a later read of the same rules."""
    out = []
    for f in forwards:
        index, line = f.counter
        if 0 <= index < len(counts) and 0 <= line < len(counts[index]):
            f = replace(f, new_connections=counts[index][line][0])
        out.append(f)
    return out


def _family(host_ip: str) -> int:
    return 6 if ":" in host_ip else 4


def _addresses(record: ContainerRecord, family: int) -> list[str]:
    return [a for n in record.networks for a in ((n.ipv4,) if family == 4 else (n.ipv6,)) if a]


def _host_address(host_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not host_ip:
        return None
    try:
        addr = ipaddress.ip_address(host_ip)
    except ValueError:
        return None
    return None if addr.is_unspecified else addr


def container_subnets(records: Iterable[ContainerRecord]) -> set[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The subnets of the networks the containers are attached to (as far as the runtimes said)."""
    out = set()
    for record in records:
        for net in record.networks:
            for addr, prefix in ((net.ipv4, net.ipv4_prefix), (net.ipv6, net.ipv6_prefix)):
                if addr and prefix:
                    try:
                        out.add(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))
                    except ValueError:
                        continue
    return out


def verify_all(
    records: Iterable[ContainerRecord],
    rules: HostRules,
    listening: set[tuple[str, int]] | None,
    proxied_runtimes: frozenset[str] = frozenset({"docker"}),
) -> list[Forward]:
    """Every published port of ``records`` and every leftover DNAT into a container network.

    ``listening``: (protocol, port) pairs a socket of the host holds, or None if unknown (then
    the userland proxy is not checked). ``proxied_runtimes``: runtimes whose published ports a
    userland proxy also serves (Docker's docker-proxy unless ``userland-proxy`` is off).
    """
    records = [r for r in records if not r.host_network]
    live = {a for r in records for n in r.networks for a in (n.ipv4, n.ipv6) if a}
    chains = {4: rules.nat_chains(4, "PREROUTING"), 6: rules.nat_chains(6, "PREROUTING")}
    targets = {family: dnat_targets(c) for family, c in chains.items()}
    out: list[Forward] = []
    for record in records:
        if record.joins_other:
            continue  # its namespace's owner publishes the ports
        for binding in record.ports:
            out.append(_verify(record, binding, chains, targets, rules, live, listening, record.runtime in proxied_runtimes))
    out.extend(_orphans(records, rules, live))
    return out


def _verify(
    record: ContainerRecord,
    binding: PortBinding,
    chains: Mapping[int, dict[str, Chain]],
    targets: Mapping[int, dict[str, list[Rule]]],
    rules: HostRules,
    live: set[str],
    listening: set[tuple[str, int]] | None,
    proxied: bool,
) -> Forward:
    family = _family(binding.host_ip)
    addresses = _addresses(record, family)
    proxy_only = not addresses or record.network_mode.startswith(PROXY_NETWORK_MODES)
    proto = binding.protocol
    listener = None if listening is None else (proto, binding.host_port) in listening
    base = dict(
        container_id=record.id, container=record.name, runtime=record.runtime, protocol=proto, host_ip=binding.host_ip,
        host_port=binding.host_port, container_port=binding.container_port,
    )
    if binding.host_port == 0:
        return Forward(**base, container_ip=addresses[0] if addresses else "", backend="none", state="missing", rule="", chain="",
                       detail="the runtime reports no host port", new_connections=0)
    if proxy_only:
        if listener is False:
            return Forward(**base, container_ip="", backend="userland-proxy", state="missing", rule="", chain="",
                           detail=f"no socket holds {proto} port {binding.host_port} on the host (userland proxy)", new_connections=0)
        return Forward(**base, container_ip="", backend="userland-proxy", state="ok", rule="", chain="", detail="", new_connections=0)
    pkt = Packet(family, proto, None, _host_address(binding.host_ip), binding.host_port)
    verdict: Verdict | None = None
    for address in addresses:
        verdict = verify_forward(chains[family], pkt, address, binding.container_port, live.__contains__, targets[family])
        if verdict.state == "ok":
            break
    assert verdict is not None
    rule = verdict.rule
    state, detail = verdict.state, verdict.detail
    if state == "ok" and proxied and listener is False:
        state, detail = "missing", f"no userland-proxy socket holds {proto} port {binding.host_port} on the host"
    dest = rule.dnat.address if state == "ok" and rule is not None and rule.dnat is not None else addresses[0]
    counted = rule if state == "ok" else _correct_rule(targets[family], addresses, binding.container_port)
    return Forward(
        **base, container_ip=dest or "", backend=rules.backend_of(rule) if rule is not None else "none", state=state,
        rule=rule.text if rule is not None else "", chain=rule.chain if rule is not None else "", detail=detail,
        new_connections=counted.packets if counted is not None else 0,
        counter=(rules.origin(counted), counted.counted) if counted is not None and rules.origin(counted) >= 0 else (-1, -1),
    )


def _correct_rule(targets: dict[str, list[Rule]], addresses: list[str], port: int) -> Rule | None:
    for address in addresses:
        for rule in targets.get(address, ()):
            d = rule.dnat
            if d is not None and (d.port_low == 0 or d.port_low <= port <= d.port_high):
                return rule
    return None


def _orphans(records: list[ContainerRecord], rules: HostRules, live: set[str]) -> list[Forward]:
    # Subnets as (family, network, mask) integers: ipaddress costs ~7 µs per address, and a host
    # may hold 10,000 DNAT rules.
    ranges = [
        (socket.AF_INET6 if n.version == 6 else socket.AF_INET, int(n.network_address), int(n.netmask))
        for n in container_subnets(records)
    ]
    out = []
    inside: dict[str, bool] = {}
    for backend, rule in rules.all_nat_rules():
        d = rule.dnat
        if d is None or d.address is None or d.address in live or rule.target not in ("DNAT", "NETMAP"):
            continue
        known = inside.get(d.address)
        if known is None:
            family = socket.AF_INET6 if ":" in d.address else socket.AF_INET
            try:
                value = int.from_bytes(socket.inet_pton(family, d.address), "big")
            except OSError:
                continue
            known = inside[d.address] = any(value & mask == net for f, net, mask in ranges if f == family)
        if not known:
            continue
        proto, host_port = _proto_port(rule)
        owner = _CONTAINER_ID.search(rule.comment)
        index = rules.origin(rule)
        out.append(Forward(
            container_id=owner.group(1) if owner else "", container="", runtime="", protocol=proto, host_ip="", host_port=host_port,
            container_ip=d.address, container_port=d.port_low, backend=backend, state="stale", rule=rule.text, chain=rule.chain,
            detail=f"points at {d.address}, which no running container has", new_connections=rule.packets,
            counter=(index, rule.counted) if index >= 0 else (-1, -1),
        ))
        if len(out) >= MAX_ORPHANS:
            break
    return out


def _proto_port(rule: Rule) -> tuple[str, int]:
    proto, port = "", 0
    for negated, key, value in rule.conds:
        if negated:
            continue
        if key == "proto":
            proto = str(value)
        elif key == "dport" and value:
            port = value[0][0]  # type: ignore[index]
    return proto, port


def verify_masquerades(records: Iterable[ContainerRecord], rules: HostRules) -> list[Masquerade]:
    """Outbound NAT of each container on each of its IPv4 networks.

    Not every network is masqueraded (``--internal`` ones are not): the monitor only reports a
    missing MASQUERADE on the runtimes' default networks and on subnets it saw masqueraded before."""
    chains = rules.nat_chains(4, "POSTROUTING")
    out = []
    for record in records:
        if record.host_network or record.joins_other:
            continue
        for net in record.networks:
            if not net.ipv4:
                continue
            subnet = str(ipaddress.ip_network(f"{net.ipv4}/{net.ipv4_prefix or 32}", strict=False))
            verdict = verify_masquerade(chains, 4, net.ipv4)
            out.append(Masquerade(record.id, net.network, subnet, net.ipv4, verdict.state, verdict.rule.text if verdict.rule else "", verdict.detail))
    return out


__all__ = ["DEFAULT_NETWORKS", "Forward", "HostRules", "Masquerade", "STATES", "container_subnets", "verify_all", "verify_masquerades"]
