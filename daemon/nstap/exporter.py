"""The Prometheus exporter: every per-container series, built at scrape time from the latest samples.

Series are made fresh from the latest sample of each watched namespace, so a container's series
vanish with it by construction (no stale series, nothing to unregister). A scrape takes a
:class:`ScrapeState` on the event loop (references to immutable samples and records, copies of
the few mutable counters: well under a millisecond), and the families are built, rendered and
gzipped from it in a worker thread, so a scrape of hundreds of containers never holds up a tick.

The families are rendered to the text format here, with each container's and interface's label
string built once and reused by all of its series: prometheus-client's generic encoder spends
about 17 µs per series (labels dict, escaping, float formatting), which for 200 containers of
~75 series each is a quarter of a second per scrape. The output is checked by the tests with
prometheus-client's parser and ``promtool check metrics``.

Naming: every per-container series carries ``container``, ``container_id`` (12 hex) and
``runtime``. No remote address, peer port or other per-connection value is ever a label.
"""

from __future__ import annotations

import asyncio
import math
import platform
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, disable_created_metrics

from . import __version__
from .capture.model import CaptureReadModel, CaptureStats
from .dns.lookups import BOUNDS
from .instruments import ProcessCollector
from .registry import ContainerRegistry, WatchedNamespace
from .runtime.records import ContainerRecord
from .samplers.protocols import PROTOCOL_COUNTERS
from .samplers.sockets import STATE_NAMES
from .samples import InterfaceCounters, ListenQueue, NamespaceSample, SampleStore

if TYPE_CHECKING:
    from .detect.incidents import IncidentTracker
    from .dns.service import DnsService
    from .ebpf.service import EbpfService
    from .nat.monitor import NatMonitor

HOST_ID = "host"  # nstap.detect.incidents.HOST_ID (not imported: the exporter stays free of the detection modules)

# (metric name, help, InterfaceCounters attribute)
INTERFACE_COUNTERS = (
    ("nstap_interface_receive_bytes_total", "Bytes received by the interface.", "rx_bytes"),
    ("nstap_interface_transmit_bytes_total", "Bytes transmitted by the interface.", "tx_bytes"),
    ("nstap_interface_receive_packets_total", "Packets received by the interface.", "rx_packets"),
    ("nstap_interface_transmit_packets_total", "Packets transmitted by the interface.", "tx_packets"),
    ("nstap_interface_receive_errors_total", "Receive errors on the interface.", "rx_errors"),
    ("nstap_interface_transmit_errors_total", "Transmit errors on the interface.", "tx_errors"),
    ("nstap_interface_receive_drops_total", "Received packets dropped by the interface (incl. missed).", "rx_drops"),
    ("nstap_interface_transmit_drops_total", "Transmitted packets dropped by the interface.", "tx_drops"),
)


class RuntimeStatus(Protocol):
    """What the exporter reads from a runtime source."""

    name: str
    kind: str
    version: str
    up: bool
    events_total: int
    reconnects_total: int


class WatchedSource(Protocol):
    """What the exporter reads from the watcher pool."""

    def watched(self) -> Mapping[int, WatchedNamespace]: ...


class ScrapeState(NamedTuple):
    """Everything one scrape reads, taken on the event loop; rendered from in a worker thread."""

    containers: list[ContainerRecord]
    namespaces: Mapping[int, WatchedNamespace]  # the registry's (replaced, never mutated, on change)
    watched: dict[int, WatchedNamespace]
    samples: list[NamespaceSample]
    runtimes: list[tuple[str, str, str, bool, int, int]]  # name, kind, version, up, events, reconnects
    tasks: int | None
    anomalies_total: dict[tuple[str, str, str, str], int]
    incidents: list[tuple[str, str, str, str, str, bool]]  # container, id, runtime, kind, cause, active
    captures: CaptureStats | None
    nat: dict[str, Any] | None = None
    # collector up, the host's drops by reason, drops not counted (map full), the pass over every namespace's protocol counters up
    ebpf: tuple[int, dict[str, int], int, int] | None = None
    dns: tuple[int, int] | None = None  # the DNS collector: up, entries its program could not make (a map full); None without one


# The two parts of an exposition: the families made from the namespaces' samples (which change only
# as samples come: rendered ahead of a scrape, api/ahead.py), and the rest (at the scrape).
SAMPLES, STATE = "samples", "state"
PARTS = (SAMPLES, STATE)
DNS_BOUNDS = tuple(repr(b) for b in BOUNDS)  # the le label values of nstap_dns_request_duration_seconds
INFO_LABELS = ("container", "container_id", "runtime", "image", "compose_project", "compose_service", "pod", "k8s_namespace", "netns")  # nstap_container_info


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Labels:
    """A label set, with its text-format rendering made once (as text, and as the UTF-8 bytes the
    exposition is made of)."""

    __slots__ = ("pairs", "text", "raw")

    def __init__(self, pairs: tuple[tuple[str, str], ...]) -> None:
        self.pairs = pairs
        self.text = "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}" if pairs else ""
        self.raw = self.text.encode()

    def extend(self, *pairs: tuple[str, str]) -> Labels:
        """This label set with more labels."""
        return Labels(self.pairs + pairs)


NO_LABELS = Labels(())


class Family:
    """One metric family: name (the sample name, ``_total`` included for counters), type, help, and
    its sample lines, formatted as they are added into ``body`` (UTF-8 bytes)."""

    __slots__ = ("name", "raw", "kind", "help", "body")

    def __init__(self, name: str, kind: str, help: str) -> None:
        self.name = name
        self.raw = name.encode()
        self.kind = kind
        self.help = help
        self.body = bytearray()

    def add(self, labels: Labels, value: float) -> None:
        """One sample. Values are ints (counters, gauges) or floats (timestamps, seconds), which
        format as Prometheus expects (:func:`number`)."""
        self.body += b"%b%b %b\n" % (self.raw, labels.raw, (str(value) if type(value) is int else number(value)).encode())


def number(value: Any) -> str:
    """A sample's value as Prometheus text: an int's digits, 1 or 0 for a bool, a float's repr or
    +Inf, -Inf, NaN; str() of anything else."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if type(value) is not float:
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def put_py(specs: tuple[tuple[bytearray, bytes, Any], ...], text: bytes, values: Sequence[Any] | Mapping[Any, Any], missing: int | None) -> None:
    """One line ``<name><text> <value>`` per ``(body, name, key)`` spec, into its body: the value is
    ``values[key]``; from a dict, a key it does not hold (or holds None) gives ``missing``'s line, or
    none when ``missing`` is None. What ``_exposition.put`` does in C, which the tests hold it to."""
    if isinstance(values, dict):
        for body, name, key in specs:
            value = values.get(key)
            if value is None:
                if missing is None:
                    continue
                value = missing
            body += b"%b%b %b\n" % (name, text, number(value).encode())
    else:
        for body, name, index in specs:
            body += b"%b%b %b\n" % (name, text, number(values[index]).encode())


try:
    from ._exposition import put
except ImportError:  # not built (no compiler at install): the same in Python
    put = put_py

COMPILED = put is not put_py


def pieces(families: Iterable[Family]) -> Iterator[bytes | bytearray]:
    """Families in the Prometheus text format 0.0.4 (UTF-8), piece by piece: each family's HELP
    and TYPE lines, then its body (the family's own buffer, not a copy)."""
    for fam in families:
        if not fam.body:
            continue
        yield f"# HELP {fam.name} {fam.help}\n# TYPE {fam.name} {fam.kind}\n".encode()
        yield fam.body


def render(families: Iterable[Family]) -> bytes:
    """Families in the Prometheus text format 0.0.4 (UTF-8)."""
    return b"".join(pieces(families))


class SampleFamilies:
    """The per-container families made from the latest samples, for one scrape."""

    def __init__(self, disabled: frozenset[str]) -> None:
        self.iface_counters = [(Family(name, "counter", help_), attr) for name, help_, attr in INTERFACE_COUNTERS]
        self.iface_up = Family("nstap_interface_up", "gauge", "1 if the interface is administratively up and operationally running.")
        self.iface_mtu = Family("nstap_interface_mtu_bytes", "gauge", "MTU of the interface.")
        self.proto = [
            (c.key, Family(f"nstap_{c.key}" if c.gauge else f"nstap_{c.key}_total", "gauge" if c.gauge else "counter", c.help))
            for c in PROTOCOL_COUNTERS
        ]
        self.sockets = Family(
            "nstap_sockets",
            "gauge",
            "Sockets by protocol and state. TCP listen and time_wait are exact every sample; other TCP states as of "
            "nstap_socket_states_timestamp_seconds; udp and raw count every open socket (state 'open').",
        )
        self.states_at = Family("nstap_socket_states_timestamp_seconds", "gauge", "When the TCP states other than listen and time_wait were last counted.")
        self.walk_every = Family(
            "nstap_socket_walk_interval_seconds", "gauge", "Current interval between per-state socket walks of this namespace (from their CPU cost)."
        )
        self.syn_retrans = Family("nstap_tcp_syn_sent_max_retransmits", "gauge", "Highest SYN retransmit count among SYN_SENT sockets at the last walk.")
        self.q_len = Family(
            "nstap_tcp_listen_queue_length", "gauge", "Connections waiting in the accept queue of the port's listeners ('ephemeral': ephemeral-range ports)."
        )
        self.q_limit = Family("nstap_tcp_listen_queue_limit", "gauge", "Accept-queue limit (backlog) of the port's listening sockets, summed over them.")
        self.sample_ts = Family("nstap_sample_timestamp_seconds", "gauge", "When the namespace was last sampled.")
        self.sample_every = Family(
            "nstap_sample_interval_seconds", "gauge", "Seconds between samples of the namespace (longer than the interval while its samples cost more than the budget)."
        )
        # The hot lines (tens of thousands a scrape) are formatted by put (C) straight into their
        # family's body: one call per interface, per listening port, per namespace's protocol counters. Their
        # values are the kernel's counters, always ints (Family.add checks each value for floats,
        # NaN and infinities; that call was half of a render).
        self._iface_specs = tuple(
            (family.body, family.raw, InterfaceCounters._fields.index(attr)) for family, attr in self.iface_counters if family.name not in disabled
        ) + tuple((family.body, family.raw, InterfaceCounters._fields.index(attr)) for family, attr in ((self.iface_up, "up"), (self.iface_mtu, "mtu")))
        self._proto_on = [(key, family) for key, family in self.proto if family.name not in disabled]
        self._proto_specs = tuple((family.body, family.raw, key) for key, family in self._proto_on)
        self._tcp_pairs = [(state, (("protocol", "tcp"), ("state", state))) for state in STATE_NAMES]
        # The lines with the container's own labels: (taken_at, interval) and the sockets' (states_at, walk interval, SYN retransmits).
        self._sample_specs = ((self.sample_ts.body, self.sample_ts.raw, 0), (self.sample_every.body, self.sample_every.raw, 1))
        self._socket_specs = ((self.states_at.body, self.states_at.raw, 0), (self.walk_every.body, self.walk_every.raw, 1),
                              (self.syn_retrans.body, self.syn_retrans.raw, 2))
        self._queue_specs = tuple((family.body, family.raw, ListenQueue._fields.index(attr)) for family, attr in ((self.q_len, "length"), (self.q_limit, "limit")))

    def clear(self) -> None:
        """Empty every family for the next scrape (the bodies stay the same objects: the specs above
        and the socket specs kept with the label sets hold them)."""
        for family in self.all():
            family.body.clear()

    def add(self, sample: NamespaceSample, okey: tuple, base: Labels, label: Callable[..., Labels], keep: Callable[[tuple, Callable[[], Any]], Any]) -> None:
        """Add one namespace's sample (``label`` makes, or reuses, the labels of a key; ``keep``
        anything else kept with them from one scrape to the next)."""
        put(self._sample_specs, base.raw, (sample.taken_at, sample.interval), None)
        if sample.interfaces is not None:
            specs = self._iface_specs
            for iface in sample.interfaces:
                raw = label((okey, iface.name, iface.side, iface.peer), base, ("interface", iface.name), ("side", iface.side), ("peer", iface.peer)).raw
                put(specs, raw, iface, None)  # its counters, up (a bool: 1 or 0) and MTU
        if sample.protocols is not None:
            put(self._proto_specs, base.raw, sample.protocols, None)
        if sample.sockets is not None:
            self._add_sockets(sample, okey, base, label, keep)

    def _add_sockets(self, sample: NamespaceSample, okey: tuple, base: Labels, label: Callable[..., Labels], keep: Callable[[tuple, Callable[[], Any]], Any]) -> None:
        # Counts are ints: the TCP states by put, from (body, name and labels, state) specs kept
        # per container with its label sets.
        sock = sample.sockets
        assert sock is not None
        body, name = self.sockets.body, self.sockets.raw
        # Keyed by these families too: specs kept from before a reload made new ones write to the old.
        specs = keep((okey, "tcp states", self), lambda: tuple((body, name + base.extend(*pair).raw, state) for state, pair in self._tcp_pairs))
        put(specs, b"", sock.tcp_states, 0)
        in_use = sock.in_use
        for protocol in ("udp", "raw"):
            raw = label((okey, protocol, "open"), base, ("protocol", protocol), ("state", "open")).raw
            body += b"%b%b %d\n" % (name, raw, in_use.get(protocol, 0) + in_use.get(protocol + "6", 0))
        put(self._socket_specs, base.raw, (sock.states_at or sample.taken_at, sock.walk_interval, sock.syn_sent_max_retransmits), None)
        for queue in sock.listen:
            put(self._queue_specs, label((okey, "port", queue.port), base, ("port", queue.port)).raw, queue, None)

    def all(self) -> list[Family]:
        """Every family, in the order they are exported."""
        return [
            *(family for family, _ in self.iface_counters), self.iface_up, self.iface_mtu, *(family for _, family in self._proto_on), self.sockets,
            self.states_at, self.walk_every, self.syn_retrans, self.q_len, self.q_limit, self.sample_ts, self.sample_every,
        ]


class ContainerCollector:
    """Per-container series from the latest samples, plus the daemon's runtime and registry state.

    Not a prometheus-client Collector on purpose: a registry would collect it from the render
    thread, and the snapshot must be taken on the event loop (:meth:`snapshot`, then :meth:`render`).
    """

    def __init__(
        self,
        registry: ContainerRegistry,
        store: SampleStore,
        runtimes: Sequence[RuntimeStatus],
        watchers: WatchedSource | None = None,
        incidents: IncidentTracker | None = None,
        captures: CaptureReadModel | None = None,
        nat: NatMonitor | None = None,
        ebpf: EbpfService | None = None,
        disabled: Collection[str] = (),
        dns: DnsService | None = None,
    ) -> None:
        self.disabled = frozenset(disabled)  # families not exported (metrics.disabled; a reload sets it again)
        self.registry = registry
        self.store = store
        self.runtimes = runtimes
        self.watchers = watchers
        self.incidents = incidents
        self.captures = captures
        self.nat = nat
        self.ebpf = ebpf
        self.dns = dns
        # Label sets (and the socket lines' specs) by key, kept from one scrape to the next: those
        # a render of a part did not use are dropped after it (one render at a time). One cache
        # per part: a part may be rendered alone (the samples ahead of a scrape, the rest at it).
        self._kept: dict[str, dict[tuple, Any]] = {part: {} for part in PARTS}
        self._labels: dict[tuple, Any] = {}
        self._used: dict[tuple, Any] = {}
        # Families whose bodies are emptied and refilled by each render (the specs kept above hold
        # them); the per-container families are made again when the disabled set changes.
        self._drops = Family("nstap_kernel_drops_total", "counter", "Packets the kernel dropped in the container's namespace, by the kernel's drop reason (eBPF, kfree_skb).")

    @property
    def disabled(self) -> frozenset[str]:
        """The families not exported."""
        return self._disabled

    @disabled.setter
    def disabled(self, names: Collection[str]) -> None:
        self._disabled = frozenset(names)
        self._samples = SampleFamilies(self._disabled)  # a render under way keeps the one it took

    def snapshot(self) -> ScrapeState:
        """What a scrape reads, now (call on the event loop: it is what mutates these)."""
        namespaces = self.registry.namespaces()
        try:
            tasks: int | None = len(asyncio.all_tasks())
        except RuntimeError:  # outside the event loop (tests, tools)
            tasks = None
        captures = self.captures.stats() if self.captures is not None else None
        tracker = self.incidents
        return ScrapeState(
            containers=self.registry.containers(),
            namespaces=namespaces,
            watched=dict(self.watchers.watched()) if self.watchers is not None else dict(namespaces),
            samples=list(self.store),
            runtimes=[(rt.name, rt.kind, rt.version, rt.up, rt.events_total, rt.reconnects_total) for rt in self.runtimes],
            tasks=tasks,
            anomalies_total=dict(tracker.anomalies_total) if tracker is not None else {},
            incidents=[(i.row.container, i.row.container_id, i.row.runtime, i.row.kind, i.row.cause, i.active) for i in tracker.incidents.values()]
            if tracker is not None
            else [],
            captures=captures,
            nat=self._nat_snapshot(),
            ebpf=(self.ebpf.up, self.ebpf.host_counts(), self.ebpf.collector.lost if self.ebpf.collector is not None else 0, int(self.ebpf.mibs is not None))
            if self.ebpf is not None else None,
            dns=(self.dns.up, self.dns.lost) if self.dns is not None else None,
        )

    def _nat_snapshot(self) -> dict[str, Any] | None:
        monitor = self.nat
        if monitor is None:
            return None
        return {
            "state": monitor.state,  # immutable
            "up": dict(monitor.up),
            "reads": monitor.reads_total,
            "read_errors": monitor.read_errors_total,
            "firewalls": [(inode, fw.rules, fw.changes) for inode, fw in monitor.firewalls.items()],
            "probes": monitor.probes.series() if monitor.probes is not None else [],  # (forward, latest result): immutable
            "probe_up": monitor.probes.up if monitor.probes is not None else None,
            "probe_counts": (monitor.probes.probes_total, monitor.probes.failures_total) if monitor.probes is not None else (0, 0),
        }

    def exposition(self, scrape: ScrapeState | None = None, part: str | None = None) -> bytes:
        """The text exposition of every family, or of one part's (:data:`PARTS`), UTF-8 (from
        ``scrape``, or a snapshot taken now)."""
        try:
            return render(self.families(scrape if scrape is not None else self.snapshot(), part))
        finally:
            self._release()

    def write(self, sink: Callable[[bytes | bytearray], Any], scrape: ScrapeState, part: str | None = None) -> None:
        """:meth:`exposition`, handed to ``sink`` piece by piece (a compressor): never the whole
        text in one buffer. A piece is valid only during the call that hands it over."""
        try:
            for piece in pieces(self.families(scrape, part)):
                sink(piece)
        finally:
            self._release()

    def _release(self) -> None:
        """Empty the families kept from one render to the next once their text is used: at 1,000
        containers they hold the ~10 MB of the last scrape's sample lines until the next render."""
        self._samples.clear()
        self._drops.body.clear()

    def render(self, scrape: ScrapeState | None = None) -> str:
        """:meth:`exposition` as text."""
        return self.exposition(scrape).decode()

    def _label(self, key: tuple, make) -> Labels:
        labels = self._used.get(key)
        if labels is None:
            labels = self._labels.get(key) or make()
            self._used[key] = labels
        return labels

    def families(self, scrape: ScrapeState, part: str | None = None) -> list[Family]:
        """Every family not disabled, or one part's (:data:`PARTS`), built from one scrape's state
        (one render at a time: the label caches)."""
        families: list[Family] = []
        for name in PARTS if part is None else (part,):
            self._labels, self._used = self._kept[name], {}
            try:
                if name == SAMPLES:
                    families += (*self._sample_families(scrape), *self._sample_ebpf_families(scrape), *self._sample_dns_families(scrape))
                else:
                    families += (
                        *self._daemon_families(scrape), *self._container_info(scrape), *self._anomaly_families(scrape),
                        *self._capture_families(scrape), *self._nat_families(scrape), *self._ebpf_families(scrape),
                        *self._dns_families(scrape), *self._collector_up(scrape),
                    )
            finally:
                self._kept[name] = self._used  # keep the label sets used this time, drop the rest
        disabled = self.disabled
        return [f for f in families if f.name not in disabled] if disabled else families

    def _daemon_families(self, scrape: ScrapeState) -> list[Family]:
        build = Family("nstap_build_info", "gauge", "nstap version and the Python it runs on; always 1.")
        build.add(Labels((("version", __version__), ("python", platform.python_version()))), 1)
        up = Family("nstap_runtime_up", "gauge", "1 if the runtime endpoint answers and its event stream is followed.")
        info = Family("nstap_runtime_info", "gauge", "Kind and version of each runtime endpoint once reached; always 1.")
        events = Family("nstap_runtime_events_total", "counter", "Events received from the runtime's event stream.")
        reconnects = Family("nstap_runtime_reconnects_total", "counter", "Times the runtime's event stream was lost after being followed.")
        watched = Family("nstap_containers_watched", "gauge", "Running containers whose network namespace has an attached watcher.")
        per_runtime = {rt[0]: 0 for rt in scrape.runtimes}
        for ns in scrape.watched.values():
            for member in ns.members:
                per_runtime[member.runtime] = per_runtime.get(member.runtime, 0) + 1
        for name, kind, version, is_up, events_total, reconnects_total in scrape.runtimes:
            labels = Labels((("runtime", name),))
            up.add(labels, 1 if is_up else 0)
            if kind:
                info.add(labels.extend(("kind", kind), ("version", version)), 1)
            events.add(labels, events_total)
            reconnects.add(labels, reconnects_total)
        for name, count in per_runtime.items():
            watched.add(Labels((("runtime", name),)), count)
        ns_count = Family("nstap_namespaces_watched", "gauge", "Network namespaces with an attached watcher (shared namespaces count once).")
        ns_count.add(NO_LABELS, len(scrape.watched))
        out = [build, up, info, events, reconnects, watched, ns_count]
        if scrape.tasks is not None:
            task_count = Family("nstap_asyncio_tasks", "gauge", "asyncio tasks alive in the daemon (one per watched namespace plus a few).")
            task_count.add(NO_LABELS, scrape.tasks)
            out.append(task_count)
        return out

    def _container_info(self, scrape: ScrapeState) -> list[Family]:
        info = Family(
            "nstap_container_info",
            "gauge",
            "One series per running container; netns is shared by containers in one namespace ('host' for host network).",
        )
        body, name = info.body, info.raw
        for r in scrape.containers:
            if not r.enabled:
                continue
            netns = "host" if r.host_network else str(r.netns)
            values = (r.name, r.short_id, r.runtime, r.image, r.compose_project, r.compose_service, r.pod, r.k8s_namespace, netns)
            labels = self._label(("info", *values), lambda: Labels(tuple(zip(INFO_LABELS, values))))  # noqa: B023 - called at once
            body += b"%b%b 1\n" % (name, labels.raw)
        return [info]

    def _sample_families(self, scrape: ScrapeState) -> list[Family]:
        namespaces = scrape.namespaces
        used, known = self._used, self._labels

        def label(key: tuple, base: Labels, *pairs: tuple[str, str]) -> Labels:
            labels = used.get(key) or known.get(key)
            if labels is None:
                labels = base.extend(*pairs) if pairs else base
            used[key] = labels
            return labels

        families = self._samples
        families.clear()
        for sample in scrape.samples:
            ns = namespaces.get(sample.netns)
            if ns is None:  # its watcher is being cancelled
                continue
            owner = ns.owner
            okey = (owner.name, owner.short_id, owner.runtime)
            base = used.get(okey) or known.get(okey) or Labels((("container", owner.name), ("container_id", owner.short_id), ("runtime", owner.runtime)))
            used[okey] = base
            families.add(sample, okey, base, label, self._label)
        return families.all()


    def _anomaly_families(self, scrape: ScrapeState) -> list[Family]:
        if self.incidents is None:
            return []
        current = {r.short_id for r in scrape.containers} | {HOST_ID}  # the host's own events (conntrack)
        total = Family(
            "nstap_anomalies_total", "counter",
            "Anomaly events that started, by kind and the cause named at detection (an ongoing or flapping anomaly counts once).",
        )
        active = Family(
            "nstap_anomaly_active", "gauge",
            "1 while an anomaly of this kind is going on in the container, 0 after it ended; cause: its cause's kind now (fixed at its end).",
        )
        for (name, cid, runtime, kind, cause), count in scrape.anomalies_total.items():
            if cid in current:
                total.add(self._label(("anomaly", name, cid, runtime, kind, cause), lambda: Labels(
                    (("container", name), ("container_id", cid), ("runtime", runtime), ("kind", kind), ("cause", cause)))), count)
        for name, cid, runtime, kind, cause, is_active in scrape.incidents:
            if cid in current:
                labels = self._label(("anomaly", name, cid, runtime, kind, cause), lambda: Labels(
                    (("container", name), ("container_id", cid), ("runtime", runtime), ("kind", kind), ("cause", cause))))
                active.add(labels, 1 if is_active else 0)
        return [total, active]

    def _capture_families(self, scrape: ScrapeState) -> list[Family]:
        c = scrape.captures
        if c is None:
            return []
        current = {r.short_id for r in scrape.containers}
        total = Family("nstap_captures_total", "counter", "Captures started, by reason (anomaly, manual, alertmanager).")
        for (name, cid, runtime, reason), count in c.total.items():
            if cid in current:
                total.add(Labels((("container", name), ("container_id", cid), ("runtime", runtime), ("reason", reason))), count)
        refused = Family(
            "nstap_captures_refused_total",
            "counter",
            "Captures not started: concurrency limit, per-container anomaly capture limit, or the store could not take them.",
        )
        for why, count in c.refused.items():
            refused.add(Labels((("reason", why),)), count)
        reach = Family(
            "nstap_flight_recorder_reach_seconds", "gauge",
            "How far back the container's flight recorder holds every packet now (size ring_bytes to the reach you need).",
        )
        for inode, seconds in c.reach:
            ns = scrape.namespaces.get(inode)
            if ns is not None and ns.owner.short_id in current:
                owner = ns.owner
                reach.add(Labels((("container", owner.name), ("container_id", owner.short_id), ("runtime", owner.runtime))), round(seconds, 1))
        info = Family(
            "nstap_capture_info", "gauge",
            "The container's latest finished captures (at most 10, kept across restarts from the index): when each was started (unix time), "
            "its id (the capture page's /ui/captures/<id>), why and how it ended.",
        )
        for cid, rows in c.recent:
            if cid in current:
                for capture_id, name, runtime, reason, state, created in rows:
                    info.add(Labels((("container", name), ("container_id", cid), ("runtime", runtime), ("capture_id", capture_id),
                                     ("reason", reason), ("state", state))), round(created, 3))
        out = [total, refused, reach, info]
        for name, kind, help_, value in (
            ("nstap_capture_bytes_total", "counter", "Bytes of pcap written by finished captures.", c.bytes),
            ("nstap_capture_kernel_drops_total", "counter", "Packets the kernel dropped before tcpdump read them, during captures.", c.kernel_drops),
            ("nstap_capture_failures_total", "counter", "Captures that failed (tcpdump missing, died, container gone, disk full).", c.failed),
            ("nstap_captures_running", "gauge", "Captures in progress.", c.running),
            ("nstap_capture_store_bytes", "gauge", "Bytes of pcap and evidence files in the capture store.", c.store_bytes),
            ("nstap_capture_store_max_bytes", "gauge", "The capture store's byte budget (capture.store_max_bytes), which the index shares.", c.store_max_bytes),
            ("nstap_index_bytes", "gauge", "Bytes of the SQLite index (database and write-ahead log), counted in the store's byte budget.", c.index_bytes),
            ("nstap_index_pruned_total", "counter", "Index entries deleted past capture.index_max_age or capture.index_max_rows.", c.index_pruned),
            ("nstap_flight_recorders_running", "gauge", "Namespaces with a running flight recorder.", c.rings),
            ("nstap_flight_recorder_restarts_total", "counter", "Flight recorders started again after their tcpdump died.", c.ring_restarts),
            ("nstap_flight_recorder_backlog_bytes", "gauge", "Bytes tcpdump wrote into the flight recorders' pipes not filed yet (after the last pump).", c.ring_backlog),
            ("nstap_flight_recorder_pumps_cut_total", "counter", "Pumps of the flight recorders that reached their time budget before every recorder was read.", c.pumps_cut),
            (
                "nstap_flight_recorder_lost_packets_total", "counter",
                "Packets flight recorders received but could not write to their ring (the data dir's disk was full).", c.ring_lost,
            ),
        ):
            family = Family(name, kind, help_)
            family.add(NO_LABELS, value)
            out.append(family)
        return out


    def _sample_ebpf_families(self, scrape: ScrapeState) -> list[Family]:
        """The containers' kernel drops (from their samples)."""
        if scrape.ebpf is None:
            return []
        drops = self._drops
        drops.body.clear()
        for sample in scrape.samples:
            counts = sample.kernel_drops
            ns = scrape.namespaces.get(sample.netns)
            if not counts or ns is None:
                continue
            owner = ns.owner
            # One line per reason, by put, from specs kept per container and set of reasons (which changes seldom).
            specs = self._label(("drops", owner.name, owner.short_id, owner.runtime, *counts), lambda: self._drop_specs(owner, counts))  # noqa: B023
            put(specs, b"", counts, None)
        return [drops]

    def _ebpf_families(self, scrape: ScrapeState) -> list[Family]:
        """The eBPF collector's host-wide families."""
        if scrape.ebpf is None:
            return []
        _up, host, lost, _mibs = scrape.ebpf
        host_drops = Family("nstap_host_kernel_drops_total", "counter", "Packets the kernel dropped outside container namespaces, by drop reason (eBPF).")
        for reason, count in sorted(host.items()):
            host_drops.add(Labels((("reason", reason),)), count)
        uncounted = Family("nstap_kernel_drops_uncounted_total", "counter",
                           "Drops the eBPF program could not count because its map of (namespace, reason) was full.")
        uncounted.add(NO_LABELS, lost)
        return [host_drops, uncounted]

    def _drop_specs(self, owner: ContainerRecord, counts: Mapping[str, int]) -> tuple:
        base = (("container", owner.name), ("container_id", owner.short_id), ("runtime", owner.runtime))
        prefix = self._drops.raw
        return tuple((self._drops.body, prefix + Labels((*base, ("reason", reason))).raw, reason) for reason in sorted(counts))

    def _sample_dns_families(self, scrape: ScrapeState) -> list[Family]:
        """The containers' DNS lookups (from their samples)."""
        if scrape.dns is None:
            return []
        requests = Family("nstap_dns_requests_total", "counter",
                          "DNS lookups the container made, by outcome (rcode, or timeout: unanswered after dns.timeout) and question type (eBPF, tc).")
        duration = Family("nstap_dns_request_duration_seconds", "histogram", "Time from a DNS query to its answer, answered lookups (eBPF, tc).")
        untracked = Family("nstap_dns_untracked_total", "counter",
                           "DNS lookups, failing names or servers not followed: the container already held as many as one namespace may.")
        body = duration.body
        for sample in scrape.samples:
            lookups = sample.dns
            ns = scrape.namespaces.get(sample.netns)
            if lookups is None or ns is None or not (lookups.requests or lookups.untracked):
                continue  # a container that made no lookup pays no series for them
            owner = ns.owner
            base = (("container", owner.name), ("container_id", owner.short_id), ("runtime", owner.runtime))
            for (rcode, qtype), count in sorted(lookups.requests.items()):
                requests.add(Labels((*base, ("rcode", rcode), ("qtype", qtype))), count)
            untracked.add(Labels(base), lookups.untracked)
            lines = [f"nstap_dns_request_duration_seconds_bucket{Labels((*base, ('le', bound))).text} {count}\n" for bound, count in zip(DNS_BOUNDS, lookups.buckets)]
            tail = Labels(base).text
            lines.append(f"nstap_dns_request_duration_seconds_bucket{Labels((*base, ('le', '+Inf'))).text} {lookups.answered}\n")
            lines.append(f"nstap_dns_request_duration_seconds_sum{tail} {number(lookups.seconds)}\n")
            lines.append(f"nstap_dns_request_duration_seconds_count{tail} {lookups.answered}\n")
            body += "".join(lines).encode()
        return [requests, duration, untracked]

    def _dns_families(self, scrape: ScrapeState) -> list[Family]:
        """The DNS collector's own family."""
        if scrape.dns is None:
            return []
        uncounted = Family("nstap_dns_uncounted_total", "counter", "DNS map entries the program could not make because a map of every namespace was full.")
        uncounted.add(NO_LABELS, scrape.dns[1])
        return [uncounted]

    def _collector_up(self, scrape: ScrapeState) -> list[Family]:
        up = Family(
            "nstap_collector_up", "gauge",
            "1 when the collector can read what it needs (nat: the NAT rules; conntrack: the table; firewall: the containers' rules; ebpf_drops: the eBPF program; ebpf_mibs: the eBPF pass over every namespace's protocol counters, else they are read from /proc/net/snmp and netstat; dns: the DNS program).",
        )
        values = dict(scrape.nat["up"]) if scrape.nat is not None else {}
        if scrape.nat is not None and scrape.nat.get("probe_up") is not None:
            values["port_probe"] = scrape.nat["probe_up"]
        if scrape.ebpf is not None:
            values["ebpf_drops"] = scrape.ebpf[0]
            values["ebpf_mibs"] = scrape.ebpf[3]
        if scrape.dns is not None:
            values["dns"] = scrape.dns[0]
        for collector, value in sorted(values.items()):
            up.add(Labels((("collector", collector),)), value)
        return [up] if values else []

    def _nat_families(self, scrape: ScrapeState) -> list[Family]:
        nat = scrape.nat
        if nat is None:
            return []
        ids = {r.id: r for r in scrape.containers}
        return [*_forward_families(nat["state"], ids), *_nat_host_families(nat), *_nat_container_families(scrape, nat, ids, self._label), *_probe_families(nat, ids)]


def _single(name: str, kind: str, help_: str, value: float) -> Family:
    family = Family(name, kind, help_)
    family.add(NO_LABELS, value)
    return family


def _forward_families(state: Any, ids: Mapping[str, ContainerRecord]) -> list[Family]:
    """The published ports and their verified state; the nat tables' rule counts."""
    info = Family(
        "nstap_nat_port_forward_info", "gauge",
        "A published port and its verified state: ok, missing, stale (points at an address no container has) or shadowed (an earlier rule decides first).",
    )
    new = Family(
        "nstap_nat_port_forward_new_connections_total", "counter",
        "Connections the forward's DNAT rule translated (its packet counter: NAT rules see a connection's first packet only).",
    )
    for f in state.forwards:
        record = ids.get(f.container_id)
        name, cid, runtime = (record.name, record.short_id, record.runtime) if record is not None and f.container else ("", f.container_id[:12], "")
        base = (("container", name), ("container_id", cid), ("runtime", runtime), ("protocol", f.protocol), ("host_ip", f.host_ip), ("host_port", str(f.host_port)))
        info.add(Labels((*base, ("container_ip", f.container_ip), ("container_port", str(f.container_port)), ("backend", f.backend), ("state", f.state))), 1)
        if f.container:
            new.add(Labels(base), f.new_connections)
    rules = Family("nstap_nat_rules", "gauge", "Rules in the host's nat tables at the last read, by back end and family.")
    for key, count in sorted(state.rules.items()):
        rules.add(Labels((("source", key),)), count)
    return [info, new, rules]


def _nat_host_families(nat: dict[str, Any]) -> list[Family]:
    """The NAT monitor's reads and the host's conntrack table."""
    state = nat["state"]
    out = [
        _single("nstap_nat_reads_total", "counter", "Reads of the host's NAT rules.", nat["reads"]),
        _single("nstap_nat_read_errors_total", "counter", "Reads of the NAT rules that failed or could not parse some of the output.", nat["read_errors"]),
        _single("nstap_nat_read_seconds", "gauge", "Wall time of the last read of the NAT rules (tools, parse and verification).", round(state.read_seconds, 6)),
        _single("nstap_nat_last_read_timestamp_seconds", "gauge", "When the NAT rules were last read.", round(state.read_at, 3)),
    ]
    ct = state.conntrack
    if ct is not None:
        out += [
            _single("nstap_conntrack_entries", "gauge", "Entries in the host's conntrack table.", ct.entries),
            _single("nstap_conntrack_limit", "gauge", "nf_conntrack_max: the table's size limit.", ct.limit),
            *(_single(f"nstap_conntrack_{key}_total", "counter", f"conntrack's {key} statistic, summed over CPUs.", ct.stats.get(key, 0))
              for key in ("insert_failed", "drop", "early_drop", "invalid", "search_restart")),
        ]
    if state.flows_at:
        out += [
            _single("nstap_conntrack_flows_pass_seconds", "gauge", "CPU seconds of the last per-container conntrack pass (one dump of the whole table).",
                    round(state.flows_seconds, 6)),
            _single("nstap_conntrack_flows_timestamp_seconds", "gauge", "When the per-container conntrack flows were last counted.", round(state.flows_at, 3)),
        ]
    return out


def _nat_container_families(scrape: ScrapeState, nat: dict[str, Any], ids: Mapping[str, ContainerRecord], label: Callable[[tuple, Callable[[], Labels]], Labels]) -> list[Family]:
    """Each container's conntrack entries and its own firewall's DROP/REJECT counters and changes
    (``label``: the collector's label sets kept from one scrape to the next)."""
    flows = Family("nstap_container_conntrack_entries", "gauge", "Conntrack entries of the container (it opened or answers them), by protocol and state.")
    for cid, counts in nat["state"].flows.items():
        record = ids.get(cid)
        if record is None:
            continue
        for (protocol, st), count in sorted(counts.items()):
            flows.add(label(("flows", record.name, record.short_id, record.runtime, protocol, st), lambda: Labels(  # noqa: B023 - called at once
                (("container", record.name), ("container_id", record.short_id), ("runtime", record.runtime), ("protocol", protocol), ("state", st)))), count)
    packets = Family("nstap_firewall_rule_packets_total", "counter", "Packets matched by a DROP or REJECT rule of the container's own firewall (rule: its position in the chain).")
    changes = Family("nstap_firewall_changes_total", "counter", "Changes of the container's own firewall seen by nstap.")
    for inode, fw_rules, changed in nat["firewalls"]:
        ns = scrape.namespaces.get(inode)
        if ns is None:
            continue
        owner = ns.owner
        base = (("container", owner.name), ("container_id", owner.short_id), ("runtime", owner.runtime))
        changes.add(label((owner.name, owner.short_id, owner.runtime), lambda: Labels(base)), changed)  # noqa: B023 - the container's own label set
        for rule in fw_rules:
            packets.add(Labels((*base, ("table", rule.table), ("chain", rule.chain), ("target", rule.target), ("rule", str(rule.position)))), rule.packets)
    return [flows, packets, changes]


def _probe_families(nat: dict[str, Any], ids: Mapping[str, ContainerRecord]) -> list[Family]:
    """The latest probe of each published port (labels like nstap_nat_port_forward_info's)."""
    success = Family(
        "nstap_port_probe_success", "gauge",
        "1 if the latest TCP connect to the published port succeeded along the path its clients take (see nstap nat for the path), else 0.",
    )
    duration = Family("nstap_port_probe_duration_seconds", "gauge", "Seconds the latest probe of the published port took (the handshake, or until it failed).")
    for f, result in nat.get("probes", ()):
        record = ids.get(f.container_id)
        if record is None:
            continue
        labels = Labels((("container", record.name), ("container_id", record.short_id), ("runtime", record.runtime), ("protocol", f.protocol),
                         ("host_ip", f.host_ip), ("host_port", str(f.host_port))))
        success.add(labels, 1 if result.ok else 0)
        duration.add(labels, round(result.seconds, 6))
    total, failed = nat.get("probe_counts", (0, 0))
    return [
        success, duration,
        _single("nstap_port_probes_total", "counter", "Probes of published ports made (host-wide; bounded by nat.probe.rate).", total),
        _single("nstap_port_probe_failures_total", "counter", "Probes of published ports that failed.", failed),
    ]


def family_names() -> list[str]:
    """The name of every family the collector can export (what ``metrics.disabled`` may name)."""
    from .nat.conntrack import ConntrackTotals  # noqa: PLC0415 - only for this list: the exporter does not depend on the NAT monitor
    from .nat.monitor import NatState  # noqa: PLC0415

    captures = CaptureStats([], {}, {}, 0, 0, 0, 0, 0, 0, 0, 0, [], 0, 0, 0, 0, 0)
    nat = {"state": NatState(read_at=1.0, flows_at=1.0, conntrack=ConntrackTotals(0, 0)), "up": {}, "reads": 0, "read_errors": 0, "firewalls": []}
    empty = ScrapeState([], {}, {}, [], [], 0, {}, [], captures, nat, (0, {}, 0, 0))
    collector = ContainerCollector(ContainerRegistry(), SampleStore(), [])
    collector.incidents = _NoIncidents()  # type: ignore[assignment]
    return sorted({f.name for f in collector.families(empty)})


class _NoIncidents:
    anomalies_total: dict = {}
    incidents: dict = {}


def build_registry() -> CollectorRegistry:
    """A Prometheus registry holding the standard process and Python collectors."""
    disable_created_metrics()  # *_created series double the output and no dashboard uses them
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
