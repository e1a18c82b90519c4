"""The Prometheus exporter: a collector that builds every per-container series at scrape time.

Series are made fresh from the latest sample of each watched namespace, so a container's series
vanish with it by construction (no stale series, nothing to unregister). ``collect()`` does no
I/O: the aiohttp handler calls it on the event loop.

Naming: every per-container series carries ``container``, ``container_id`` (12 hex) and
``runtime``. No remote address, peer port or other per-connection value is ever a label.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .registry import ContainerRegistry
from .samplers.protocols import PROTOCOL_COUNTERS
from .samplers.sockets import STATE_NAMES
from .samples import SampleStore

BASE = ["container", "container_id", "runtime"]
IFACE = [*BASE, "interface", "side", "peer"]

# (metric name without _total, help, InterfaceCounters attribute)
INTERFACE_COUNTERS = (
    ("nstap_interface_receive_bytes", "Bytes received by the interface.", "rx_bytes"),
    ("nstap_interface_transmit_bytes", "Bytes transmitted by the interface.", "tx_bytes"),
    ("nstap_interface_receive_packets", "Packets received by the interface.", "rx_packets"),
    ("nstap_interface_transmit_packets", "Packets transmitted by the interface.", "tx_packets"),
    ("nstap_interface_receive_errors", "Receive errors on the interface.", "rx_errors"),
    ("nstap_interface_transmit_errors", "Transmit errors on the interface.", "tx_errors"),
    ("nstap_interface_receive_drops", "Received packets dropped by the interface (incl. missed).", "rx_drops"),
    ("nstap_interface_transmit_drops", "Transmitted packets dropped by the interface.", "tx_drops"),
)


class RuntimeStatus:
    """What the exporter reads from a runtime source (duck-typed to keep the flow one-way)."""

    name: str
    kind: str
    version: str
    up: bool
    events_total: int
    reconnects_total: int


class ContainerCollector(Collector):
    """Per-container series from the latest samples, plus the daemon's runtime and registry state."""

    def __init__(self, registry: ContainerRegistry, store: SampleStore, runtimes: Sequence[RuntimeStatus]) -> None:
        self.registry = registry
        self.store = store
        self.runtimes = runtimes

    def describe(self) -> Iterable[Metric]:
        return []  # built per scrape; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        yield from self._daemon_metrics()
        yield from self._container_info()
        yield from self._sample_metrics()

    def _daemon_metrics(self) -> Iterator[Metric]:
        build = GaugeMetricFamily("nstap_build_info", "nstap version and Python it runs on; always 1.", labels=["version", "python"])
        build.add_metric([__version__, platform.python_version()], 1)
        yield build
        up = GaugeMetricFamily("nstap_runtime_up", "1 if the runtime endpoint answers and its event stream is followed.", labels=["runtime"])
        info = GaugeMetricFamily("nstap_runtime_info", "Kind and version of each runtime endpoint once reached; always 1.", labels=["runtime", "kind", "version"])
        events = CounterMetricFamily("nstap_runtime_events", "Events received from the runtime's event stream.", labels=["runtime"])
        reconnects = CounterMetricFamily("nstap_runtime_reconnects", "Times the runtime's event stream was lost after being followed.", labels=["runtime"])
        watched = GaugeMetricFamily("nstap_containers_watched", "Running containers whose network namespace is watched.", labels=["runtime"])
        namespaces = self.registry.namespaces()
        per_runtime = {rt.name: 0 for rt in self.runtimes}
        for ns in namespaces.values():
            for member in ns.members:
                per_runtime[member.runtime] = per_runtime.get(member.runtime, 0) + 1
        for rt in self.runtimes:
            up.add_metric([rt.name], 1 if rt.up else 0)
            if rt.kind:
                info.add_metric([rt.name, rt.kind, rt.version], 1)
            events.add_metric([rt.name], rt.events_total)
            reconnects.add_metric([rt.name], rt.reconnects_total)
        for name, count in per_runtime.items():
            watched.add_metric([name], count)
        ns_count = GaugeMetricFamily("nstap_namespaces_watched", "Network namespaces with a watcher (shared namespaces count once).")
        ns_count.add_metric([], len(namespaces))
        yield from (up, info, events, reconnects, watched, ns_count)

    def _container_info(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "nstap_container_info",
            "One series per running container; netns is shared by containers in one namespace ('host' for host network).",
            labels=[*BASE, "image", "compose_project", "compose_service", "pod", "netns"],
        )
        for r in self.registry.containers():
            if not r.enabled:
                continue
            netns = "host" if r.host_network else str(r.netns)
            info.add_metric([r.name, r.short_id, r.runtime, r.image, r.compose_project, r.compose_service, r.pod, netns], 1)
        yield info

    def _sample_metrics(self) -> Iterator[Metric]:
        namespaces = self.registry.namespaces()
        iface_counters = [CounterMetricFamily(name, help_, labels=IFACE) for name, help_, _ in INTERFACE_COUNTERS]
        iface_attrs = [attr for _, _, attr in INTERFACE_COUNTERS]
        iface_up = GaugeMetricFamily("nstap_interface_up", "1 if the interface is administratively up and operationally running.", labels=IFACE)
        iface_mtu = GaugeMetricFamily("nstap_interface_mtu_bytes", "MTU of the interface.", labels=IFACE)
        proto = [
            (c.key, (GaugeMetricFamily if c.gauge else CounterMetricFamily)(f"nstap_{c.key}", c.help, labels=BASE))
            for c in PROTOCOL_COUNTERS
        ]
        sockets = GaugeMetricFamily(
            "nstap_sockets",
            "Sockets by protocol and state. TCP listen and time_wait are exact every sample; other TCP states as of nstap_socket_states_timestamp_seconds; udp/raw count all open sockets (state 'open').",
            labels=[*BASE, "protocol", "state"],
        )
        states_at = GaugeMetricFamily("nstap_socket_states_timestamp_seconds", "When the TCP states other than listen and time_wait were last counted.", labels=BASE)
        walk_every = GaugeMetricFamily("nstap_socket_walk_interval_seconds", "Current interval between per-state socket walks of this namespace (derived from their CPU cost).", labels=BASE)
        syn_retrans = GaugeMetricFamily("nstap_tcp_syn_sent_max_retransmits", "Highest SYN retransmit count among SYN_SENT sockets at the last walk.", labels=BASE)
        q_len = GaugeMetricFamily("nstap_tcp_listen_queue_length", "Connections waiting in the accept queue of the port's listening sockets ('ephemeral': ports in the ephemeral range).", labels=[*BASE, "port"])
        q_limit = GaugeMetricFamily("nstap_tcp_listen_queue_limit", "Accept-queue limit (backlog) of the port's listening sockets, summed over them.", labels=[*BASE, "port"])
        sample_ts = GaugeMetricFamily("nstap_sample_timestamp_seconds", "When the namespace was last sampled.", labels=BASE)

        for sample in self.store:
            ns = namespaces.get(sample.netns)
            if ns is None:  # its watcher is being cancelled
                continue
            owner = ns.owner
            base = [owner.name, owner.short_id, owner.runtime]
            sample_ts.add_metric(base, sample.taken_at)
            if sample.interfaces is not None:
                for iface in sample.interfaces:
                    labels = [*base, iface.name, iface.side, iface.peer]
                    for family, attr in zip(iface_counters, iface_attrs):
                        family.add_metric(labels, getattr(iface, attr))
                    iface_up.add_metric(labels, 1 if iface.up else 0)
                    iface_mtu.add_metric(labels, iface.mtu)
            if sample.protocols is not None:
                values = sample.protocols
                for key, family in proto:
                    value = values.get(key)
                    if value is not None:
                        family.add_metric(base, value)
            sock = sample.sockets
            if sock is not None:
                for state in STATE_NAMES:
                    sockets.add_metric([*base, "tcp", state], sock.tcp_states.get(state, 0))
                for protocol in ("udp", "raw"):
                    sockets.add_metric([*base, protocol, "open"], sock.in_use.get(protocol, 0) + sock.in_use.get(protocol + "6", 0))
                states_at.add_metric(base, sock.states_at)
                walk_every.add_metric(base, sock.walk_interval)
                syn_retrans.add_metric(base, sock.syn_sent_max_retransmits)
                for queue in sock.listen:
                    q_len.add_metric([*base, queue.port], queue.length)
                    q_limit.add_metric([*base, queue.port], queue.limit)
        yield from iface_counters
        yield from (iface_up, iface_mtu)
        yield from (family for _, family in proto)
        yield from (sockets, states_at, walk_every, syn_retrans, q_len, q_limit, sample_ts)


def build_registry() -> CollectorRegistry:
    """A Prometheus registry holding the standard process and Python collectors."""
    disable_created_metrics()  # *_created series double the output and no dashboard uses them
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
