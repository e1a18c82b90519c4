"""Immutable snapshots produced by namespace watchers, and the store holding the latest per namespace.

Samples are what flows from the watchers to everything downstream: the detectors, which see every
sample (those stored in one turn of the event loop together, right after it), and the exporter,
which reads the latest one of each namespace at scrape time. They are never mutated after
creation: a consumer can keep one while the next is taken.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, NamedTuple

from .supervisor import FailureReport, log_failure

if TYPE_CHECKING:
    from .dns.lookups import Lookups

# NamedTuples rather than frozen dataclasses: a frozen dataclass's __init__ sets every field
# through object.__setattr__, which costs microseconds per sample on the hot path.


class InterfaceCounters(NamedTuple):
    """One interface's state and counters; ``side`` is "container" or "host" (the veth peer)."""

    name: str
    side: str
    peer: str
    up: bool
    mtu: int
    rx_bytes: int
    rx_packets: int
    rx_errors: int
    rx_drops: int
    tx_bytes: int
    tx_packets: int
    tx_errors: int
    tx_drops: int


class ListenQueue(NamedTuple):
    """Accept-queue state summed over the listening TCP sockets of one port label."""

    port: str
    length: int
    limit: int
    sockets: int
    loopback: bool = False  # every one of them bound to a loopback address (127.0.0.0/8, ::1)


class SocketSample(NamedTuple):
    """Sockets of a namespace: totals, TCP states and listeners.

    ``tcp_states["listen"]`` and ``tcp_states["time_wait"]`` are exact at every sample; the other
    states are as of ``states_at`` (see the socket sampler for why they may be older), or exact
    at this sample when ``states_at`` is 0.
    """

    in_use: Mapping[str, int]  # "tcp", "tcp6", "udp", "udp6", "raw", "raw6" -> sockets in use
    tcp_states: Mapping[str, int]
    states_at: float
    syn_sent_max_retransmits: int
    listen: tuple[ListenQueue, ...]
    walk_interval: float


class FirewallSample(NamedTuple):
    """Whether the namespace's own firewall changed: its nftables generation id (1: nothing ever
    committed; 0: no nf_tables) and whether it holds legacy iptables tables."""

    generation: int
    legacy: bool


class NamespaceSample(NamedTuple):
    """Everything sampled from one network namespace at one instant."""

    netns: int
    taken_at: float  # wall clock, seconds since the epoch
    duration: float  # seconds of wall time the sample took
    interfaces: tuple[InterfaceCounters, ...] | None = None
    protocols: Mapping[str, int] | None = None
    sockets: SocketSample | None = None
    failed: tuple[str, ...] = ()  # the samplers whose part is missing from this sample
    interval: float = 0.0  # seconds between this namespace's samples now (longer while they cost more than the budget)
    firewall: FirewallSample | None = None
    kernel_drops: Mapping[str, int] | None = None  # drops so far by kernel reason (eBPF), None without the collector
    dns: Lookups | None = None  # lookups so far by outcome, latency (the DNS collector), None without it
    # When ``kernel_drops`` were read from the kernel (wall clock; None: at ``taken_at``). A read
    # made late leaves a sample with the counts of the one before: the same time, no new interval.
    kernel_drops_at: float | None = None


class SampleStore:
    """Latest sample per namespace; a namespace's entry goes when its watcher goes.

    Subscribers are isolated like the registry's listeners: one that raises is reported and the
    others still get the sample.
    """

    def __init__(self, on_error: FailureReport = log_failure) -> None:
        self._latest: dict[int, NamespaceSample] = {}
        self.generation = 0  # counts the namespaces that came or went
        self._listeners: list[Callable[[NamespaceSample], None]] = []
        self._on_error = on_error

    def subscribe(self, listener: Callable[[NamespaceSample], None]) -> None:
        """Call ``listener`` with every new sample (on the event loop, must not block)."""
        self._listeners.append(listener)

    def put(self, sample: NamespaceSample) -> None:
        """Record a sample and hand it to the subscribers."""
        latest = self._latest
        if sample.netns not in latest:
            self.generation += 1
        latest[sample.netns] = sample
        for listener in self._listeners:
            try:
                listener(sample)
            except Exception as exc:  # noqa: BLE001 - one subscriber's bug must not starve the others
                self._on_error("sample-listener", exc)

    def drop(self, netns: int) -> None:
        """Forget a namespace (its watcher stopped)."""
        if self._latest.pop(netns, None) is not None:
            self.generation += 1

    def get(self, netns: int) -> NamespaceSample | None:
        """The latest sample of one namespace."""
        return self._latest.get(netns)

    def __iter__(self) -> Iterator[NamespaceSample]:
        return iter(list(self._latest.values()))

    def __len__(self) -> int:
        return len(self._latest)
