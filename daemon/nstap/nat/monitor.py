"""The NAT monitor: the host's NAT rules, conntrack and the containers' own firewalls, kept current.

Once per sampling interval, in its own worker thread (nothing here runs on the event loop but the
bookkeeping), at a cost of a few microseconds when nothing changed:

* the nftables generation id (a hand-built nfnetlink request on a kept socket, ~5 µs) says whether
  any ruleset changed; the native tables are listed again and the rules read again
  (``iptables-save -t nat -c`` for both families and back ends, ``nft -j`` for native tables) on a
  change, when the containers changed, and every ``nat.interval`` for the counters of the
  forwards' rules while a container publishes a port; changes made with iptables-legacy do not
  move the id, so those tables are polled;
* conntrack's size and statistics every interval (three ``pread`` of /proc files kept open); its
  flows per container (one dump parsed by hand) every ``nat.conntrack_interval``, or less often
  when a pass costs more than ``nat.conntrack_budget`` of a core;
* each namespace's own firewall is read (through the watcher's namespace descriptor) when its
  sampled generation id moves, and every ``nat.interval`` while it has rules, no more than
  ``nat.firewall_budget`` of the time for one namespace.

The containers' findings are made again only when the rules were read again, the containers
changed, or while one of theirs is open; the host's (conntrack) every interval.

One parse serves every container. What it finds goes to the exporter as an immutable
:class:`NatState`, and to the incident tracker as findings of the kinds in :mod:`nstap.detect.nat`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from ..config import NatConfig
from ..detect.incidents import HOST_ID, IncidentTracker
from ..gate import ROUND
from ..detect.nat import CONTAINER_KINDS, HOST_KINDS, conntrack_findings, forward_findings
from ..heap import collector_paused
from ..log import Once
from ..netns import netlink
from ..netns.evidence import run_tool
from ..registry import ContainerRegistry, WatchedNamespace
from ..runtime.records import ContainerRecord
from ..samples import NamespaceSample, SampleStore
from ..supervisor import TaskSupervisor, event_or_timeout
from .conntrack import ConntrackReader, ConntrackTotals, ConntrackUnavailable, flows_by_container, flows_of, pack
from .forwards import DEFAULT_NETWORKS, Forward, HostRules, Masquerade, refresh_counters, verify_all, verify_masquerades
from .nft import IPTABLES_TABLES, NativeRuleset, native_tables, parse_nft_json
from .rules import Ruleset, counters, parse_save, shape_of
from ..threads import QuickJob, WorkerThread

log = structlog.get_logger("nstap.nat")

READ_CAP = 64 << 20  # bytes of one iptables-save/nft output (10,000 rules print about 1 MB)
DIFF_LINES = 20
FIREWALL_MIN_GAP = 1.0  # seconds between two reads of one namespace's firewall, at the least
SLACK = 1.5  # intervals between ticks when nothing kicks the monitor (no namespace watched)
MAX_NATIVE_TABLES = 64  # native nftables tables read per namespace
KEEP_TEXT = 4 << 20  # bytes of a firewall's text kept to compare the next read with; beyond, a digest
FIREWALL_TARGETS = frozenset({"DROP", "REJECT"})
HOST_RECORD = ContainerRecord(id=HOST_ID, name="host", runtime="host", pid=1, status="running", image="")
TCP_LISTEN = 1 << 10
ALL_STATES = 0xFFFFFFFF
_NFPROTO = {2: "ip", 10: "ip6", 1: "inet", 3: "arp", 7: "bridge", 5: "netdev"}


@dataclass(frozen=True, slots=True)
class FirewallRule:
    """A DROP or REJECT rule of a container's own firewall, with its counters."""

    table: str
    chain: str
    position: int
    target: str
    packets: int
    text: str


@dataclass(slots=True)
class FirewallState:
    """What nstap last read of one namespace's firewall."""

    generation: int = -1
    read_at: float = 0.0
    text: str = ""
    rules: tuple[FirewallRule, ...] = ()
    total_rules: int = 0
    changes: int = 0
    error: str = ""
    legacy: bool = False


@dataclass(frozen=True, slots=True)
class NatState:
    """One consistent view for the exporter and the API."""

    read_at: float = 0.0
    read_seconds: float = 0.0
    rules: Mapping[str, int] = field(default_factory=dict)  # "iptables-nft ipv4" -> rules read
    errors: tuple[str, ...] = ()
    forwards: tuple[Forward, ...] = ()
    masquerades: tuple[Masquerade, ...] = ()
    conntrack: ConntrackTotals | None = None
    conntrack_error: str = ""
    flows: Mapping[str, Counter[tuple[str, str]]] = field(default_factory=dict)  # container id -> (protocol, state) -> n
    flows_at: float = 0.0
    flows_seconds: float = 0.0

    def forwards_of(self, ids: set[str]) -> list[Forward]:
        """The forwards of the containers whose full ids are in ``ids``."""
        return [f for f in self.forwards if f.container_id in ids and f.container]


def userland_proxy_on(setting: str, daemon_json: Path = Path("/etc/docker/daemon.json")) -> bool:
    """Whether Docker's published ports are also served by docker-proxy (its default)."""
    if setting != "auto":
        return setting == "on"
    try:
        value = json.loads(daemon_json.read_text()).get("userland-proxy", True)
    except (OSError, ValueError, AttributeError):
        return True
    return value is not False


class NatMonitor:
    """Reads the host's NAT rules and conntrack, and the containers' firewalls; see the module doc."""

    def __init__(
        self,
        config: NatConfig,
        interval: float,
        registry: ContainerRegistry,
        netns_fd: Callable[[int], int | None],
        host_inode: int,
        supervisor: TaskSupervisor,
        tracker: IncidentTracker | None = None,
        disabled: frozenset[str] = frozenset(),
        proc_root: Path = Path("/proc"),
    ) -> None:
        self.config = config
        self.interval = interval
        self.registry = registry
        self.netns_fd = netns_fd
        self.supervisor = supervisor
        self.tracker = tracker
        self.disabled = disabled
        self.proc_root = proc_root
        self.host = WatchedNamespace(host_inode, HOST_RECORD, (HOST_RECORD,))
        self.state = NatState()
        self.firewalls: dict[int, FirewallState] = {}
        self.up = {"nat": 0, "conntrack": 0, "firewall": 1}
        self.reads_total = 0
        self.read_errors_total = 0
        self.proxied = frozenset({"docker"}) if userland_proxy_on(config.userland_proxy) else frozenset()
        self._executor = WorkerThread("nstap-nat")
        self._look_job = QuickJob(self._executor, self._look)  # on the loop's thread while quick (nstap.threads)
        self._nfnl: socket.socket | None = None  # the host's nfnetlink socket: generation id, tables
        self._tables_generation = -1
        self._native_tables: list[tuple[str, str]] = []
        self._legacy_files: dict[str, int] = {}
        self._reported: tuple[Any, Any] | None = None  # the forwards and masquerades the last container report was made of
        self._open: set[int] = set()  # namespaces with NAT findings at the last container report
        self._diag: socket.socket | None = None
        self._conntrack = ConntrackReader(proc_root)
        self._generation = -1
        self._dirty = True
        self._rules: HostRules | None = None
        self._listened: set[tuple[str, int]] | None = None
        self._rules_at = 0.0
        self._flows_due = 0.0
        self._last_stats: tuple[float, Mapping[str, int]] | None = None
        self._ok_at: dict[tuple[str, str], float] = {}
        self._masq_seen: set[str] = set()
        self._fw_pending: dict[int, None] = {}
        self._fw_next: dict[int, float] = {}  # loop time before which a namespace's firewall is not read again
        self._fw_wake = asyncio.Event()
        self._kicked = asyncio.Event()  # set by kick(): time for a tick
        self._logged = Once()
        self.probes: Any = None  # the published-port prober (nat/probe.py), when it runs
        self.talkers: Any = None  # the top-talker tracker (nat/talkers.py), when it runs
        self.exposure: Any = None  # async (namespace) -> the container's exposure (nat/exposure.py)

    def start(self, samples: SampleStore) -> None:
        """Follow the registry and the samples, and run the two long-lived tasks."""
        self.registry.subscribe(self._registry_changed)
        samples.subscribe(self._on_sample)
        self.supervisor.service("nat", self._run)
        self.supervisor.service("firewall", self._firewall_loop)

    def _registry_changed(self) -> None:
        self._dirty = True
        self._reported = None
        watched = self.registry.namespaces()
        for inode in [i for i in self.firewalls if i not in watched]:
            del self.firewalls[inode]
            self._fw_pending.pop(inode, None)
            self._fw_next.pop(inode, None)

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._executor.submit(fn, *args)

    # -- the host ----------------------------------------------------------------------------

    def kick(self) -> None:
        """Tick now (the sampling ticker's early hook: once an interval, in the wake-up the loop
        makes for the eBPF and DNS reads anyway)."""
        self._kicked.set()

    async def _run(self) -> None:
        # A tick once an interval, when kicked: each wake-up of the event loop costs CPU of its
        # own (hundreds of µs on a VM whose caches went cold meanwhile; docs/performance.md,
        # "Wake-ups"), so the monitor's ticks join the sampling ticker's. Nothing kicks while no
        # namespace is watched (the ticker stops): then every SLACK intervals.
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            self._kicked.clear()
            await self.tick()
            if self.probes is not None:
                self.probes.kick()  # new forwards are looked at in this wake-up, not the prober's own
            await event_or_timeout(self._kicked, max(0.0, self.interval * SLACK - (loop.time() - started)))

    async def tick(self) -> None:
        """One round: rules if they changed (or are due), conntrack, findings."""
        now = time.time()
        probed, totals = await self._look_job.start()  # both in one trip to the thread, or none while quick
        if isinstance(probed, OSError):  # no nf_tables, or no privilege: the rules are then polled
            self._once("nat_generation_unavailable", error=f"{type(probed).__name__}: {probed}")
            generation, native, legacy = -1, None, False
        else:
            generation, native, legacy = probed
        # Legacy tables do not move the generation id: like a host without nf_tables, they are
        # polled every nat.interval.
        changed = self._dirty or (generation >= 0 and generation != self._generation)
        if changed or (now - self._rules_at >= self.config.interval and self._poll_due(generation, legacy)):
            self._dirty = False
            await self._read_rules(generation, native or [], legacy, now, changed)
        await self._read_conntrack(now, totals)
        self._report(now)

    def _poll_due(self, generation: int, legacy: bool) -> bool:
        """Whether the rules are to be read again though nothing said they changed: where no
        generation id covers them (legacy tables, no nf_tables), or for the packet counters of the
        forwards' rules. Where no container publishes a port there are no counters to refresh and
        the id says the rules are those of the last read: two child processes every
        ``nat.interval`` for nothing (a tenth of the daemon's CPU beside 50 containers)."""
        return generation < 0 or legacy or self._rules is None or bool(self.state.forwards)

    def _look(self) -> tuple[tuple[int, list[tuple[str, str]], bool] | OSError, ConntrackTotals | ConntrackUnavailable]:
        """The interval's two cheap reads, in the thread: :meth:`_probe` and conntrack's totals,
        each with the error it met in place of its answer."""
        try:
            probed: tuple[int, list[tuple[str, str]], bool] | OSError = self._probe()
        except OSError as exc:
            probed = exc
        try:
            totals: ConntrackTotals | ConntrackUnavailable = self._conntrack.totals()
        except ConntrackUnavailable as exc:
            totals = exc
        return probed, totals

    def _probe(self) -> tuple[int, list[tuple[str, str]], bool]:
        """(generation id, native tables, whether legacy nat tables exist); runs in the thread.

        The generation id and the legacy table names are a few microseconds on descriptors kept
        open; the native tables are listed again only when the generation moved.
        """
        try:
            if self._nfnl is None:
                self._nfnl = netlink.open_socket(netlink.NETLINK_NETFILTER)
            generation = netlink.nft_generation(self._nfnl)
            if generation != self._tables_generation:
                self._native_tables = [
                    (family, name) for family, name in ((_NFPROTO.get(f, ""), n) for f, n in netlink.nft_tables(self._nfnl))
                    if family in ("ip", "ip6", "inet") and not (family in ("ip", "ip6") and name in IPTABLES_TABLES)
                ]
                self._tables_generation = generation
        except OSError:
            if self._nfnl is not None:
                self._nfnl.close()
                self._nfnl = None
            self._tables_generation = -1
            raise
        legacy = False
        for name in ("ip_tables_names", "ip6_tables_names"):
            try:
                fd = self._legacy_files.get(name)
                if fd is None:
                    fd = self._legacy_files[name] = os.open(self.proc_root / "net" / name, os.O_RDONLY | os.O_CLOEXEC)
                legacy = legacy or b"nat" in os.pread(fd, 4096, 0).split()
            except OSError:
                continue
        return generation, self._native_tables, legacy

    async def _read_rules(self, generation: int, native_tables: list[tuple[str, str]], legacy: bool, now: float, changed: bool = True) -> None:
        started = time.perf_counter()
        timeout, cap = self.config.read_timeout, READ_CAP
        runs = [("iptables-save", 4), ("ip6tables-save", 6)]
        if legacy:
            runs += [("iptables-legacy-save", 4), ("ip6tables-legacy-save", 6)]
        outputs = await asyncio.gather(*(run_tool([tool, "-t", "nat", "-c"], None, timeout, cap) for tool, _ in runs))
        nft_outputs = await asyncio.gather(*(run_tool(["nft", "-j", "list", "table", f, n], None, timeout, cap) for f, n in native_tables))
        errors = [f"{tool}: {err}" for (tool, _), (_, err) in zip(runs, outputs) if err]
        errors += [f"nft list table {f} {n}: {err}" for (f, n), (_, err) in zip(native_tables, nft_outputs) if err]
        records = self.registry.containers()
        texts = [(text, family) for (_, family), (text, err) in zip(runs, outputs) if text and not err]
        nft_texts = [text for text, err in nft_outputs if text and not err]
        if not changed and not nft_texts and self._rules is not None and not errors:
            # Only the counters are due: if the rules read the same as last time, take the new
            # counters from their lines and keep the verdicts (a parse of 10,000 rules is ~150 ms).
            refreshed = await self._thread(self._refresh, texts)
            if refreshed is not None:
                self.reads_total += 1
                self._rules_at = now
                self.state = _with(self.state, read_at=now, read_seconds=time.perf_counter() - started, forwards=tuple(refreshed))
                return
        try:
            result = await self._thread(self._evaluate, texts, nft_texts, records)
        except Exception as exc:  # noqa: BLE001 - one bad read must not stop the monitor; the next one retries
            self.read_errors_total += 1
            self.supervisor.failed("nat", exc)
            return
        rules, forwards, masquerades, counts, parse_errors = result
        errors += parse_errors
        ok_reads = len(texts)
        self.up["nat"] = 1 if ok_reads else 0
        if errors:
            self.read_errors_total += 1
            for error in errors[:5]:
                self._once("nat_read_error", error=error)
        if not ok_reads:
            return
        self.reads_total += 1
        self._rules = rules
        self._rules_at = now
        self._generation = generation
        self.state = NatState(
            read_at=now, read_seconds=time.perf_counter() - started, rules=counts, errors=tuple(errors[:20]),
            forwards=tuple(forwards), masquerades=tuple(masquerades), conntrack=self.state.conntrack,
            conntrack_error=self.state.conntrack_error, flows=self.state.flows, flows_at=self.state.flows_at,
            flows_seconds=self.state.flows_seconds,
        )

    def _refresh(self, texts: list[tuple[str, int]]) -> list[Forward] | None:
        """The forwards with new counters if ``texts`` hold the rules of the last parse; else None."""
        rules = self._rules
        if rules is None or len(texts) != len(rules.iptables):
            return None
        if any(shape_of(text) != old.shape for (text, _), old in zip(texts, rules.iptables)):
            return None
        if self._listening() != self._listened:
            return None  # a userland proxy came or went: verify again
        return refresh_counters(self.state.forwards, [counters(text) for text, _ in texts])

    @collector_paused()
    def _evaluate(
        self, texts: list[tuple[str, int]], nft_texts: list[str], records: list[ContainerRecord]
    ) -> tuple[HostRules, list[Forward], list[Masquerade], dict[str, int], list[str]]:
        """Parse and verify (in the thread)."""
        rulesets: list[Ruleset] = [parse_save(text, family) for text, family in texts]
        native = NativeRuleset()
        for text in nft_texts:
            part = parse_nft_json(text)
            native.chains.update(part.chains)
            native.bases.extend(part.bases)
            native.tables.extend(part.tables)
            native.errors.extend(part.errors)
        rules = HostRules(rulesets, native if native.chains else None)
        listening = self._listened = self._listening()
        forwards = verify_all(records, rules, listening, self.proxied)
        masquerades = verify_masquerades(records, rules)
        counts = {f"{r.backend} ipv{r.family}": len(r.rules("nat")) for r in rulesets}
        if native.chains:
            counts["nftables"] = sum(len(c.rules) for c in native.chains.values())
        errors = [f"{r.backend} ipv{r.family}: {e}" for r in rulesets for e in r.errors[:5]] + native.errors[:5]
        return rules, forwards, masquerades, counts, errors

    def _listening(self) -> set[tuple[str, int]] | None:
        """(protocol, port) of every TCP listener and UDP socket of the host; None if unknown."""
        try:
            if self._diag is None:
                self._diag = netlink.open_socket(netlink.NETLINK_SOCK_DIAG)
            out = set()
            for family in (socket.AF_INET, socket.AF_INET6):
                out.update(("tcp", s.port) for s in netlink.dump_inet(self._diag, family, socket.IPPROTO_TCP, TCP_LISTEN))
                out.update(("udp", s.port) for s in netlink.dump_inet(self._diag, family, socket.IPPROTO_UDP, ALL_STATES))
            return out
        except OSError as exc:
            if self._diag is not None:
                self._diag.close()
                self._diag = None
            self._once("nat_listeners_unavailable", error=str(exc))
            return None

    async def _read_conntrack(self, now: float, totals: ConntrackTotals | ConntrackUnavailable) -> None:
        if isinstance(totals, ConntrackUnavailable):
            self.up["conntrack"] = 0
            self._once("conntrack_unavailable", error=str(totals), fix="modprobe nf_conntrack, and run nstap as root (CAP_NET_ADMIN)")
            self.state = _with(self.state, conntrack=None, conntrack_error=str(totals))
            return
        self.up["conntrack"] = 1
        flows, flows_at, flows_seconds = self.state.flows, self.state.flows_at, self.state.flows_seconds
        if now >= self._flows_due:
            owners = self._owners()
            try:
                flows, flows_seconds = await self._thread(self._flows, owners)
            except OSError as exc:
                self._once("conntrack_dump_failed", error=str(exc))
            else:
                flows_at = now
            # A pass that costs more than its budget share of a core spaces the next one out.
            every = max(self.config.conntrack_interval, flows_seconds / self.config.conntrack_budget)
            self._flows_due = now + every
        self.state = _with(self.state, conntrack=totals, conntrack_error="", flows=flows, flows_at=flows_at, flows_seconds=flows_seconds)

    def _owners(self) -> dict[bytes, str]:
        owners = {}
        for ns in self.registry.namespaces().values():
            for member in ns.members:
                for net in member.networks:
                    for address in (net.ipv4, net.ipv6):
                        if address:
                            try:
                                owners[pack(address)] = ns.owner.id
                            except OSError:
                                continue
        return owners

    def _flows(self, owners: dict[bytes, str]) -> tuple[dict[str, Counter[tuple[str, str]]], float]:
        started = time.thread_time()
        return flows_by_container(self._conntrack.summaries(), owners), time.thread_time() - started

    async def conntrack_of(self, addresses: list[str], limit: int) -> dict[str, Any]:
        """The conntrack entries from or to ``addresses`` now (for a capture's evidence)."""
        def read() -> dict[str, Any]:
            packed = {pack(a) for a in addresses}
            listed, count = flows_of(self._conntrack.matching(packed), packed, limit)
            return {"count": count, "listed": listed}
        try:
            return await self._thread(read)
        except OSError as exc:
            return {"error": str(exc)}

    # -- views (API, evidence) -------------------------------------------------------------------

    def conntrack_json(self) -> dict[str, Any]:
        """The host's conntrack totals."""
        ct = self.state.conntrack
        if ct is None:
            return {"error": self.state.conntrack_error or "not read yet"}
        return {"entries": ct.entries, "limit": ct.limit, **ct.stats}

    def container_json(self, record: ContainerRecord) -> dict[str, Any]:
        """Everything the monitor knows of one container: forwards, masquerade, flows, firewall."""
        ns = self.registry.namespaces().get(record.netns)
        ids = {m.id for m in ns.members} if ns is not None else {record.id}
        owner = ns.owner.id if ns is not None else record.id
        state = self.state
        fw = self.firewalls.get(record.netns) if ns is not None else None
        return {
            "container": record.name, "container_id": record.short_id, "runtime": record.runtime,
            "read_at": state.read_at,
            "forwards": [f.to_json() for f in state.forwards_of(ids)],
            "masquerade": [
                {"network": m.network, "subnet": m.subnet, "source": m.source, "state": m.state, "rule": m.rule, "detail": m.detail}
                for m in state.masquerades if m.container_id in ids
            ],
            "conntrack": {f"{p} {s}": n for (p, s), n in sorted(state.flows.get(owner, Counter()).items())},
            "conntrack_at": state.flows_at,
            "firewall": None if fw is None else {
                "read_at": fw.read_at, "rules": fw.total_rules, "changes": fw.changes, "error": fw.error,
                "drop_rules": [_rule_json(r) for r in fw.rules],
            },
        }

    async def evidence(self, ns: WatchedNamespace, limit: int = 500) -> dict[str, Any]:
        """The NAT part of a capture's evidence: forwards, firewall, conntrack entries now."""
        view = self.container_json(ns.owner)
        addresses = [a for m in ns.members for n in m.networks for a in (n.ipv4, n.ipv6) if a]
        view["conntrack_entries"] = await self.conntrack_of(addresses, limit) if addresses else {"count": 0, "listed": []}
        if self.probes is not None:
            view["probes"] = self.probes.verdicts(self.state.forwards_of({m.id for m in ns.members}))
        if self.exposure is not None:
            view["exposure"] = await self.exposure(ns)
        if self.talkers is not None:
            view["talkers"] = self.talkers.talkers_json(ns.owner)
        return view

    # -- findings ------------------------------------------------------------------------------

    def _report(self, now: float) -> None:
        state = self.state
        # The containers' findings change only with a new read of the rules, a change of the
        # containers, or while some are open (they resolve after a quiet while): not every tick.
        made_of = (state.forwards, state.masquerades)
        if self._reported is None or self._open or made_of[0] is not self._reported[0] or made_of[1] is not self._reported[1]:
            self._reported = made_of
            self._report_containers(now)
        self._report_host(now)

    def _report_containers(self, now: float) -> None:
        tracker = self.tracker
        state = self.state
        self._open = set()
        by_container: dict[str, list[Forward]] = {}
        for forward in state.forwards:
            by_container.setdefault(forward.container_id, []).append(forward)
        masq: dict[str, list[Masquerade]] = {}
        for m in state.masquerades:
            if m.state == "ok":
                self._masq_seen.add(m.subnet)
            elif m.network in DEFAULT_NETWORKS or m.subnet in self._masq_seen:
                masq.setdefault(m.container_id, []).append(m)
        for ns in self.registry.namespaces().values():
            ids = [m.id for m in ns.members]
            forwards = [f for i in ids for f in by_container.get(i, [])]
            masquerades = [m for i in ids for m in masq.get(i, [])]
            onset = {kind: self._ok_at.get((ns.owner.id, kind)) for kind in CONTAINER_KINDS}
            findings = [f for f in forward_findings(forwards, masquerades, onset) if f.kind not in self.disabled]
            seen = {f.kind for f in findings}
            for kind in CONTAINER_KINDS:
                if kind not in seen and state.read_at:
                    self._ok_at[(ns.owner.id, kind)] = state.read_at
            if tracker is not None:
                for finding in findings:
                    tracker.found(ns, finding, now, self.interval)
                tracker.quiet(ns.inode, seen, now, CONTAINER_KINDS)
                if tracker.has_active(ns.inode, CONTAINER_KINDS):  # looked at every tick until resolved
                    self._open.add(ns.inode)
        live = {ns.owner.id for ns in self.registry.namespaces().values()}
        for key in [k for k in self._ok_at if k[0] not in live]:
            del self._ok_at[key]

    def _report_host(self, now: float) -> None:
        tracker = self.tracker
        totals = self.state.conntrack
        if totals is None:
            return
        before = self._last_stats
        host_findings = [
            f for f in conntrack_findings(totals.entries, totals.limit, totals.stats, before[1] if before else None,
                                          self.config.conntrack_full_ratio, before[0] if before else None)
            if f.kind not in self.disabled
        ]
        self._last_stats = (now, totals.stats)
        if tracker is not None:
            for finding in host_findings:
                tracker.found(self.host, finding, now, self.interval, capture=False)
            tracker.quiet(self.host.inode, {f.kind for f in host_findings}, now, HOST_KINDS)

    # -- the containers' own firewalls ---------------------------------------------------------

    def _on_sample(self, sample: NamespaceSample) -> None:
        fw = sample.firewall
        if fw is None:
            return
        state = self.firewalls.get(sample.netns)
        if state is None:
            state = self.firewalls[sample.netns] = FirewallState()
        moved = fw.generation != state.generation and fw.generation > 1
        # Read again for the counters only where there are counters nstap exports (DROP/REJECT
        # rules): Docker's own rules in every container of a user-defined network (its embedded
        # DNS) would otherwise cost three child processes per container every nat.interval.
        # Legacy tables do not notify their changes: those are polled.
        stale = (state.rules or fw.legacy) and sample.taken_at - state.read_at >= self.config.interval
        state.legacy = fw.legacy
        first_legacy = fw.legacy and not state.read_at
        if not state.read_at and 0 < fw.generation <= 1 and not fw.legacy:
            state.read_at = sample.taken_at  # nothing was ever committed there: known empty, so its first rules are a change
        # The generation is taken as read now: a commit while the tools run moves it again.
        state.generation = fw.generation
        if (moved or stale or first_legacy) and sample.netns not in self._fw_pending:
            self._fw_pending[sample.netns] = None
            self._fw_wake.set()

    def read_counters_soon(self, inode: int) -> bool:
        """Read the namespace's firewall counters again soon (an anomaly there wants to know which
        rule matched), within the same rate bound as every read; False if it has no DROP/REJECT
        rule to read."""
        state = self.firewalls.get(inode)
        if state is None or not state.rules:
            return False
        if inode not in self._fw_pending:
            self._fw_pending[inode] = None
            self._fw_wake.set()
        return True

    async def _firewall_loop(self) -> None:
        """Read the firewalls that changed, each no sooner than its last read's cost allows."""
        loop = asyncio.get_running_loop()
        while True:
            await self._fw_wake.wait()
            self._fw_wake.clear()
            while self._fw_pending:
                now = loop.time()
                due = [i for i in self._fw_pending if self._fw_next.get(i, 0.0) <= now]
                if not due:
                    # Every pending namespace read recently and at a cost: wait for the first, or
                    # for a new one to be pending.
                    wait = min(self._fw_next.get(i, 0.0) for i in self._fw_pending) - now
                    await event_or_timeout(self._fw_wake, max(wait, 0.01))
                    self._fw_wake.clear()
                    continue
                inode = due[0]
                del self._fw_pending[inode]
                started = loop.time()
                await self._read_firewall(inode)
                # A namespace whose firewall changes all the time is read at a bounded rate: its
                # reads (the tools and the parse) take at most nat.firewall_budget of the time.
                cost = loop.time() - started
                self._fw_next[inode] = loop.time() + max(FIREWALL_MIN_GAP, cost / self.config.firewall_budget - cost)

    async def _read_firewall(self, inode: int) -> None:
        ns = self.registry.namespaces().get(inode)
        state = self.firewalls.get(inode)
        fd = self.netns_fd(inode)
        if ns is None or state is None or fd is None:
            return
        timeout = self.config.read_timeout
        fd = os.dup(fd)  # the watcher may close its own while the tools run
        try:
            tools = [["iptables-save", "-c"], ["ip6tables-save", "-c"], ["nft", "-j", "list", "tables"]]
            if state.legacy:
                tools += [["iptables-legacy-save", "-c"], ["ip6tables-legacy-save", "-c"]]
            outputs = await asyncio.gather(*(run_tool(argv, fd, timeout, READ_CAP) for argv in tools))
            # Only the native nftables tables are read as JSON: the iptables-nft ones are in the
            # saves already, and their JSON is six times the size of their text.
            tables_text, tables_error = outputs[2]
            native = native_tables(tables_text)[:MAX_NATIVE_TABLES] if tables_text and not tables_error else []
            nft_outputs = await asyncio.gather(
                *(run_tool(["nft", "-j", "list", "table", family, name], fd, timeout, READ_CAP) for family, name in native)
            )
        finally:
            os.close(fd)
        if self.firewalls.get(inode) is not state:
            return  # the namespace went while the tools ran
        errors = [f"{argv[0]}: {err}" for argv, (_, err) in zip(tools, outputs) if err and "not installed" not in err]
        errors += [f"nft list table {f} {n}: {err}" for (f, n), (_, err) in zip(native, nft_outputs) if err]
        saves = [(text, 6 if argv[0].startswith("ip6") else 4) for argv, (text, err) in zip(tools, outputs) if argv[0] != "nft" and text and not err]
        nft_texts = [text for text, err in nft_outputs if text and not err]
        read = await self._thread(_firewall_rules, saves, nft_texts, self.config.max_firewall_rules, state.text if state.read_at else None)
        if self.firewalls.get(inode) is not state:
            return
        self.up["firewall"] = 0 if errors and not saves else 1
        state.error = "; ".join(errors)[:500]
        owner = ns.owner
        if read.diff is not None:
            state.changes += 1
            log.info("firewall_changed", container=owner.name, container_id=owner.short_id, runtime=owner.runtime, netns=inode,
                     rules=read.total, diff=read.diff[:DIFF_LINES], more=max(0, len(read.diff) - DIFF_LINES))
        state.text = read.text
        state.rules = tuple(read.rules)
        state.total_rules = read.total
        state.read_at = time.time()

    def _once(self, event: str, **fields: Any) -> None:
        if self._logged.first(event + str(fields.get("error", ""))):
            log.warning(event, **fields)

    async def close(self) -> None:
        """Close the sockets in their thread and stop it."""
        def close_all() -> None:
            if self._nfnl is not None:
                self._nfnl.close()
            for fd in self._legacy_files.values():
                os.close(fd)
            if self._diag is not None:
                self._diag.close()
            self._conntrack.close()
        await self._thread(close_all)
        self._executor.shutdown(wait=True)


def _rule_json(rule: FirewallRule) -> dict[str, Any]:
    return {"table": rule.table, "chain": rule.chain, "position": rule.position, "target": rule.target, "packets": rule.packets, "rule": rule.text}


def _with(state: NatState, **changes: Any) -> NatState:
    values = {name: getattr(state, name) for name in NatState.__slots__}  # type: ignore[attr-defined]
    values.update(changes)
    return NatState(**values)


@dataclass(frozen=True, slots=True)
class FirewallRead:
    """One read of a namespace's firewall, parsed (in the NAT thread)."""

    rules: list[FirewallRule]  # the DROP/REJECT rules (the first ``limit``)
    total: int  # rules in all
    text: str  # the ruleset as comparable text (without counters and dates), or its digest when too large to keep
    diff: list[str] | None  # lines gone (-) and new (+) since the previous text; None: no change, or no previous read


@collector_paused()
def _firewall_rules(saves: list[tuple[str, int]], nft_texts: list[str], limit: int, previous: str | None = None) -> FirewallRead:
    """Parse the saves and native tables of one namespace, and compare them with the previous read."""
    out: list[FirewallRule] = []
    total = 0
    lines: list[str] = []
    for text, family in saves:
        rules = parse_save(text, family)
        for table, chains in rules.tables.items():
            for chain in chains.values():
                lines.append(f"ipv{family} {table} :{chain.name} {chain.policy}")
                for rule in chain.rules:
                    ROUND.pause()
                    total += 1
                    lines.append(f"ipv{family} {table} {rule.text}")
                    if rule.target in FIREWALL_TARGETS and len(out) < limit:
                        out.append(FirewallRule(f"ipv{family}-{table}", chain.name, rule.position, rule.target, rule.packets, rule.text))
    for nft_text in nft_texts:
        native = parse_nft_json(nft_text)
        for key, chain in native.chains.items():
            lines.append(f"nft {key} {chain.policy}")
            # Each rule is let go once used: the whole parse freed at once (50,000 rules: 75 ms)
            # would hold the GIL, and so the event loop's thread, for as long.
            rules, chain.rules = chain.rules, []
            for i, rule in enumerate(rules):
                rules[i] = None  # type: ignore[call-overload]
                ROUND.pause()  # a worker thread waits out each sampling round (see nstap.gate)
                total += 1
                lines.append(rule.text.split(" handle ", 1)[0] + " " + rule.text.split(": ", 1)[-1])
                if rule.target in FIREWALL_TARGETS and len(out) < limit:
                    family, table, name = key.split(" ", 2)
                    out.append(FirewallRule(f"{family}-{table}", name, rule.position, rule.target, rule.packets, rule.text))
    text = "\n".join(lines)
    if len(text) > KEEP_TEXT:  # kept as a digest: a change is still seen, its lines are not listed
        text = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    if previous is None or text == previous:
        return FirewallRead(out, total, text, None)
    return FirewallRead(out, total, text, line_diff(previous, text))


def line_diff(old: str, new: str) -> list[str]:
    """The lines of ``old`` that ``new`` lacks (-) and those it adds (+), each side in its own order.

    Linear in the lines (difflib's matching is not, and a ruleset can be tens of thousands of
    lines); a digest on either side makes one line that says so.
    """
    if old.startswith("sha256:") or new.startswith("sha256:"):
        return [f"~ the ruleset changed (more than {KEEP_TEXT} bytes: not compared line by line)"]
    old_lines, new_lines = old.splitlines(), new.splitlines()
    counts = Counter(old_lines)
    counts.subtract(new_lines)
    gone = Counter({line: n for line, n in counts.items() if n > 0})
    added = Counter({line: -n for line, n in counts.items() if n < 0})
    out = []
    pause = ROUND.pause
    for line in old_lines:
        pause()
        if gone[line] > 0:
            gone[line] -= 1
            out.append("-" + line)
    for line in new_lines:
        pause()
        if added[line] > 0:
            added[line] -= 1
            out.append("+" + line)
    if not out and old != new:
        out.append("~ the same rules in another order")
    return out
