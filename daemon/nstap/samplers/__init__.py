"""The samplers a namespace watcher runs, registered by name with their default.

The ``samplers:`` section of the config switches them on and off by these names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..netns.handles import NamespaceHandles
from .firewall import FirewallSampler
from .interfaces import HostLinks, InterfaceSampler
from .protocols import ProtocolSampler, RoundCounters
from .sockets import SocketSampler


class Sampler(Protocol):
    """Reads one part of a namespace's state; ``sample()`` must not block for long."""

    name: str

    def sample(self) -> Any: ...


@dataclass(frozen=True)
class SamplerContext:
    """What sampler factories may use besides the namespace's own handles."""

    interval: float
    host_links: HostLinks | None
    walk_budget: float  # CPU seconds per container-sample for per-state socket walks
    max_walk_interval: float
    max_listen_ports: int
    max_interfaces: int = 64
    sample_budget: float = 0.002  # CPU seconds one namespace's sample may cost, sustained, before it is sampled less often
    round_counters: RoundCounters | None = None  # the protocol counters and sockets in use of every namespace read in one pass (eBPF), per round


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler's registration: name, on by default or not, and how to build one."""

    name: str
    default_enabled: bool
    help: str
    factory: Callable[[NamespaceHandles, SamplerContext], Sampler]


SAMPLERS: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in (
        SamplerSpec(
            "interfaces",
            True,
            "interface counters, state and MTU, container side and host-side veth peer",
            lambda h, ctx: InterfaceSampler(h, ctx.host_links, ctx.max_interfaces),
        ),
        SamplerSpec(
            "protocols",
            True,
            "TCP/UDP/IP counters (the round's eBPF pass, else /proc/net/snmp and /proc/net/netstat)",
            lambda h, ctx: ProtocolSampler(h, ctx.round_counters),
        ),
        SamplerSpec(
            "sockets",
            True,
            "socket totals (the round's eBPF pass, else /proc/net/sockstat), listen queues, per-state counts",
            lambda h, ctx: SocketSampler(
                h, ctx.interval, ctx.walk_budget, ctx.max_walk_interval, ctx.max_listen_ports, round_counters=ctx.round_counters,
            ),
        ),
        SamplerSpec(
            "firewall",
            True,
            "whether the namespace's own firewall changed (nftables generation id, legacy tables)",
            lambda h, ctx: FirewallSampler(h),
        ),
    )
}


def enabled_samplers(switches: dict[str, bool]) -> list[SamplerSpec]:
    """The registered samplers that are on, given the config's switches (names already validated)."""
    return [spec for name, spec in SAMPLERS.items() if switches.get(name, spec.default_enabled)]


__all__ = ["SAMPLERS", "HostLinks", "Sampler", "SamplerContext", "SamplerSpec", "enabled_samplers"]
