"""Published-port probes: the runbook's ``nc -zv HOST PORT``, for every published port, continuously.

Which path is tried (``path`` in every result):

* ``probe-netns``: a port published on every address (``0.0.0.0``) or on one of the host's own
  addresses is connected to from nstap's own namespace (:mod:`.probe_netns`), so the SYN enters the
  host through ``PREROUTING`` like a client's from the network and meets the runtime's DNAT rule.
  When the connection was accepted by a socket of the host instead (docker-proxy: the DNAT rule
  did not apply), ``via`` says ``userland-proxy``; otherwise ``dnat``.
* ``host-loopback``: a port published on 127.0.0.1 is only reachable from the host itself, so it
  is connected to from the host, as its clients do (``OUTPUT``, then docker-proxy or the
  runtime's loopback DNAT).
* IPv6 forwards take the same paths over IPv6: the probe namespace's IPv6 side for ``::`` and the
  host's own IPv6 addresses (Docker without ``ip6tables`` serves them with docker-proxy, which
  connects to the container's IPv4 address: that second leg is tried too), ``::1`` from the host.
  A host without IPv6 lists them as not probed, with the reason.
* Unless ``nat.probe.udp``, UDP forwards are listed as not probed.

Rate: each port every ``nat.probe.interval`` (jittered ±20 %), at once when its verified state
changes (a NAT change); at most ``nat.probe.rate`` probes a second host-wide and
``nat.probe.max_concurrent`` in flight, taken round-robin across containers (a container with
10,000 ports waits its turn like one with one), and at most ``nat.probe.max_per_container``
ports of one container. Only the forwards the NAT monitor found for this host's containers are
probed; a container labelled ``nstap.probe=off`` is skipped.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import random
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from .. import labels as nstap_labels
from ..config import ProbeConfig
from ..detect.base import Finding
from ..detect.incidents import IncidentTracker
from ..detect.probe import KINDS, FailedProbe, Listener, probe_cause, probe_findings, wants_anomaly
from ..netns import netlink
from ..registry import ContainerRegistry, WatchedNamespace
from ..samples import SampleStore
from ..supervisor import TaskSupervisor, event_or_timeout
from .forwards import Forward
from .host_filter import verdicts_met
from .probe_netns import ProbeNamespace, tcp_socket, udp_socket

log = structlog.get_logger("nstap.probe")

TICK = 0.2  # seconds between two looks at the schedule
Key = tuple[str, str, str, int]  # container id, protocol, host ip, host port
TCP_ESTABLISHED = 1
TCP_LISTEN = 10


def forward_key(f: Forward) -> Key:
    """The identity of a published port across reads of the rules."""
    return (f.container_id, f.protocol, f.host_ip, f.host_port)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe of one published port."""

    at: float  # wall clock
    ok: bool
    path: str  # probe-netns or host-loopback, with the addresses: what was tried
    via: str  # dnat, userland-proxy, host-socket (a port reservation, a failure), or "" (unknown / failed)
    seconds: float
    error: str  # "" when ok; refused, timeout, unreachable: ..., no answer
    host_drops: tuple[tuple[str, int], ...] = ()  # the host's FORWARD DROP/REJECT verdicts a second probe met (after a timeout)

    def to_json(self) -> dict[str, Any]:
        """As the API shows it."""
        out = {"ok": self.ok, "at": round(self.at, 3), "path": self.path, "via": self.via, "latency_ms": round(self.seconds * 1000, 3), "error": self.error}
        if self.host_drops:
            out["host_drops"] = [{"verdict": text, "packets": n} for text, n in self.host_drops]
        return out


class ProbeSchedule:
    """When each port is due, and which are probed next: round-robin across containers.

    Pure bookkeeping on a clock the caller passes in (tested with tables).
    """

    def __init__(self, interval: float, rng: random.Random | None = None) -> None:
        self.interval = interval
        self.rng = rng or random.Random()
        self.due: dict[Key, float] = {}
        self.signature: dict[Key, tuple] = {}
        self._turn: deque[str] = deque()  # containers in the order they are served

    def update(self, wanted: Mapping[Key, tuple], now: float) -> list[Key]:
        """The ports to probe now are ``wanted`` (key -> what the rules say of it): new ones and
        those whose signature changed are due at once; the others keep their time. Returns the
        keys made due at once."""
        at_once = []
        for key in [k for k in self.due if k not in wanted]:
            del self.due[key]
            self.signature.pop(key, None)
        for key, sig in wanted.items():
            if key not in self.due or self.signature.get(key) != sig:
                self.due[key] = now
                at_once.append(key)
            self.signature[key] = sig
        return at_once

    def take(self, now: float, budget: int) -> list[Key]:
        """Up to ``budget`` due ports, one container at a time in turn (the one served longest ago
        first), longest-due first within each container."""
        if budget <= 0:
            return []
        by_container: dict[str, list[Key]] = {}
        for key, when in self.due.items():
            if when <= now:
                by_container.setdefault(key[0], []).append(key)
        for keys in by_container.values():
            keys.sort(key=self.due.__getitem__, reverse=True)  # pop() takes the longest-due
        served = set(self._turn)
        order = [c for c in self._turn if c in by_container] + [c for c in by_container if c not in served]
        out: list[Key] = []
        taken: list[str] = []
        while order and len(out) < budget:
            for cid in list(order):
                keys = by_container[cid]
                key = keys.pop()
                out.append(key)
                self.due[key] = float("inf")  # in flight: not taken twice
                if cid not in taken:
                    taken.append(cid)
                if not keys:
                    order.remove(cid)
                if len(out) >= budget:
                    break
        live = {k[0] for k in self.due}
        self._turn = deque([c for c in self._turn if c not in taken and c in live] + taken)
        return out

    def done(self, key: Key, now: float) -> None:
        """``key`` was probed: due again after the interval, jittered by ±20 %."""
        if key in self.due:
            self.due[key] = now + self.interval * self.rng.uniform(0.8, 1.2)

    def next_look(self, now: float, shortest: float, longest: float) -> float:
        """Seconds until the next port is due, within [``shortest``, ``longest``]."""
        due = min(self.due.values(), default=float("inf"))
        return min(max(due - now, shortest), longest)


class TokenBucket:
    """``rate`` tokens a second, at most ``rate`` (one second's worth) saved up."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.tokens = min(rate, 1.0)
        self.at = now

    def available(self, now: float) -> int:
        self.tokens = min(max(self.rate, 1.0), self.tokens + (now - self.at) * self.rate)
        self.at = now
        return int(self.tokens)

    def spend(self, n: int) -> None:
        self.tokens -= n


def probe_plan(f: Forward, sources: Mapping[int, tuple[str, str]], local: set[str], udp: bool, no_ipv6: str = "") -> tuple[str, str] | str:
    """(path, destination address) for a forward, or why it is not probed. ``sources``: the probe
    namespace's (own address, host-side address) by IP version (empty: the namespace is not up);
    ``no_ipv6``: why it has no IPv6 side."""
    if f.protocol not in ("tcp", "udp"):
        return f"{f.protocol} is not probed"
    if f.protocol == "udp" and not udp:
        return "udp is not probed (nat.probe.udp: false)"
    if f.host_port <= 0:
        return "no host port"
    try:
        address = ipaddress.ip_address(f.host_ip) if f.host_ip else ipaddress.IPv4Address("0.0.0.0")
    except ValueError:
        return f"host address {f.host_ip!r} is not an address"
    if address.is_loopback:
        return ("host-loopback", str(address))
    if not sources:
        return "the probe namespace is not up"
    source = sources.get(address.version)
    if source is None:
        return f"the probe namespace has no IPv{address.version}" + (f": {no_ipv6}" if no_ipv6 and address.version == 6 else "")
    if address.is_unspecified:
        return ("probe-netns", source[1])
    if str(address) not in local:
        return f"{address} is not an address of this host"
    return ("probe-netns", str(address))


def listener_of(sample: Any, port: int) -> Listener:
    """The listener of TCP ``port`` in a namespace sample (unknown when the port's label is
    ``ephemeral``/``other`` or there is no socket part)."""
    sockets = getattr(sample, "sockets", None) if sample is not None else None
    if sockets is None:
        return Listener(None)
    labels = {q.port for q in sockets.listen}
    for q in sockets.listen:
        if q.port == str(port):
            return Listener(True, q.length, q.limit, q.loopback)
    if labels & {"ephemeral", "other"}:
        return Listener(None)
    return Listener(False)


def _error(exc: BaseException) -> str:
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return f"unreachable: {exc.strerror}"
    if isinstance(exc, OSError):
        return f"error: {exc.strerror or exc}"
    return f"error: {type(exc).__name__}"


def family_of(address: str) -> int:
    """AF_INET6 for an IPv6 address, AF_INET otherwise."""
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _packed(address: str) -> bytes:
    family = family_of(address)
    return socket.inet_pton(family, address).ljust(16, b"\0")


def proxy_sockid(local: str, local_port: int, peer: str, peer_port: int) -> bytes:
    """The inet_diag_sockid of the host socket that would have accepted a probe (docker-proxy's)."""
    return struct.pack(">HH", local_port, peer_port) + _packed(local) + _packed(peer) + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class PortProber:
    """Probes the published ports the NAT monitor found; keeps the latest result of each; reports
    ``port_unreachable`` findings to the incident tracker."""

    def __init__(
        self,
        config: Callable[[], ProbeConfig],
        forwards: Callable[[], tuple[Forward, ...]],
        registry: ContainerRegistry,
        samples: SampleStore,
        supervisor: TaskSupervisor,
        data_dir: Path,
        tracker: IncidentTracker | None = None,
        firewalls: Callable[[int], Any] | None = None,
        interval: float = 1.0,
        disabled: Callable[[], frozenset[str]] = frozenset,
        proxied: frozenset[str] = frozenset({"docker"}),
    ) -> None:
        self.config = config
        self.forwards = forwards
        self.registry = registry
        self.samples = samples
        self.supervisor = supervisor
        self.tracker = tracker
        self.firewalls = firewalls
        self.interval = interval
        self.disabled = disabled
        self.proxied = proxied  # runtimes whose host sockets are proxies (docker-proxy), not mere port reservations
        cfg = config()
        pool6 = ipaddress.ip_network(cfg.subnet6) if cfg.subnet6 else None
        self.netns = ProbeNamespace(data_dir, ipaddress.ip_network(cfg.subnet), pool6=pool6)  # type: ignore[arg-type]
        self.schedule = ProbeSchedule(cfg.interval)
        self.results: dict[Key, ProbeResult] = {}
        self.last_ok: dict[Key, float] = {}
        self.skipped: dict[Key, str] = {}
        self.seen_listening: set[Key] = set()
        self.probes_total = 0
        self.failures_total = 0
        self._forwards: dict[Key, Forward] = {}
        self._made_of: Any = None
        self._local: set[str] = set()
        self._drops_seen: dict[tuple[int, str, str, int], int] = {}
        self._diag: socket.socket | None = None
        self._open: set[str] = set()  # containers with a port_unreachable event going on
        self._kicked = asyncio.Event()

    @property
    def up(self) -> int:
        return 1 if self.netns.up else 0

    async def start(self) -> None:
        """Make the probe namespace (a stale one recovered) and run the probe loop."""
        await self.netns.start()
        self._local = _host_addresses()
        self.supervisor.service("port-probe", self._run)

    async def close(self) -> None:
        """Remove the probe namespace (the loop is stopped by the supervisor first)."""
        await self.netns.stop()
        if self._diag is not None:
            self._diag.close()
            self._diag = None

    # -- the loop ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        bucket = TokenBucket(self.config().rate, loop.time())
        while True:
            self._kicked.clear()  # (a kick while this look probes makes the next look at once)
            cfg = self.config()
            now = loop.time()
            bucket.rate = cfg.rate
            self.schedule.interval = cfg.interval
            self._sync(now)
            budget = min(bucket.available(now), cfg.max_concurrent)
            keys = self.schedule.take(now, budget)
            if keys:
                bucket.spend(len(keys))
                results = await asyncio.gather(*(self._probe(self._forwards[k], cfg) for k in keys if k in self._forwards))
                done = loop.time()
                for key, result in zip([k for k in keys if k in self._forwards], results):
                    self.schedule.done(key, done)
                    if result is not None:
                        self._record(key, result)
                self._report({k[0] for k in keys})
            elif self._open:
                self._report(set(self._open))  # ongoing events resolve after a quiet while, probed or not
            # Until the next port is due, or the NAT monitor read the rules (kick: new ports are
            # looked at in its wake-up), at most an interval: a host without published ports does
            # not wake the loop for the prober at all, where it did five times a second. Each
            # wake-up costs CPU of its own (hundreds of µs on a VM whose caches went cold
            # meanwhile: docs/performance.md, "Wake-ups").
            await event_or_timeout(self._kicked, self.schedule.next_look(loop.time(), TICK, max(self.interval, TICK)))

    def kick(self) -> None:
        """Look at the schedule now (the NAT monitor read the forwards)."""
        self._kicked.set()

    def _sync(self, now: float) -> None:
        """Follow the NAT monitor's forwards: which ports to probe, and which are due at once."""
        forwards = self.forwards()
        if forwards is self._made_of:
            return
        self._made_of = forwards
        cfg = self.config()
        records = {r.id: r for r in self.registry.containers()}
        wanted: dict[Key, tuple] = {}
        skipped: dict[Key, str] = {}
        current: dict[Key, Forward] = {}
        per_container: dict[str, int] = {}
        for f in sorted(forwards, key=lambda f: (f.container_id, f.host_port, f.protocol, f.host_ip)):
            record = records.get(f.container_id)
            if not f.container or record is None:
                continue
            key = forward_key(f)
            current[key] = f
            if nstap_labels.probe_opted_out(record.labels):
                skipped[key] = "opted out (nstap.probe=off)"
                continue
            plan = self._plan(f, cfg)
            if isinstance(plan, str):
                skipped[key] = plan
                continue
            n = per_container[f.container_id] = per_container.get(f.container_id, 0) + 1
            if n > cfg.max_per_container:
                skipped[key] = f"over nat.probe.max_per_container ({cfg.max_per_container})"
                continue
            wanted[key] = (f.state, f.rule, f.container_ip, f.container_port, f.backend)
        self._forwards, self.skipped = current, skipped
        at_once = self.schedule.update(wanted, now)
        if at_once:
            log.debug("probes_due", ports=len(at_once))
        for store in (self.results, self.last_ok):
            for key in [k for k in store if k not in wanted]:
                del store[key]
        self.seen_listening &= set(current)

    def _plan(self, f: Forward, cfg: ProbeConfig) -> tuple[str, str] | str:
        sources = {v: pair for v in (4, 6) if (pair := self.netns.addresses(v)) is not None}
        return probe_plan(f, sources, self._local, cfg.udp, self.netns.error6)

    async def _probe(self, f: Forward, cfg: ProbeConfig) -> ProbeResult | None:
        plan = self._plan(f, cfg)
        if isinstance(plan, str):
            return None
        path_kind, address = plan
        loop = asyncio.get_running_loop()
        udp = f.protocol == "udp"
        family = family_of(address)
        make = functools.partial(udp_socket if udp else tcp_socket, family)
        try:
            if path_kind == "probe-netns":
                sock = await self.netns.run(make)
                source = (self.netns.addresses(6 if family == socket.AF_INET6 else 4) or ("?",))[0]
                path = f"probe-netns {source} -> {_hostport(address, f.host_port)} (PREROUTING)"
            else:
                sock = make()
                path = f"host-loopback -> {_hostport(address, f.host_port)} (OUTPUT)"
        except OSError as exc:
            return ProbeResult(time.time(), False, path_kind, "", 0.0, _error(exc))
        started = time.perf_counter()
        seconds, via, error = 0.0, "", ""
        try:
            if udp:
                error = await self._udp(sock, address, f.host_port, cfg.timeout)
            else:
                await asyncio.wait_for(loop.sock_connect(sock, (address, f.host_port)), cfg.timeout)
                seconds = time.perf_counter() - started  # the handshake only, not the path check
                via, error = await self._accepted_by(f, address, sock, cfg.timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            error = _error(exc)
        finally:
            seconds = seconds or time.perf_counter() - started
            sock.close()
        self.probes_total += 1
        host_drops: tuple[tuple[str, int], ...] = ()
        if error:
            self.failures_total += 1
            if error == "timeout" and path_kind == "probe-netns" and not udp:
                host_drops = await verdicts_met(lambda: self._fails_again(address, f.host_port, cfg.timeout), 6 if family == socket.AF_INET6 else 4)
        return ProbeResult(time.time(), not error, path, via, seconds, error, host_drops)

    async def _fails_again(self, address: str, port: int, timeout: float) -> bool:
        """One more TCP connect along the probe-netns path: whether it failed too."""
        try:
            sock = await self.netns.run(functools.partial(tcp_socket, family_of(address)))
        except OSError:
            return False
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (address, port)), timeout)
        except (OSError, asyncio.TimeoutError):
            return True
        finally:
            sock.close()
        return False

    async def _accepted_by(self, f: Forward, address: str, sock: socket.socket, timeout: float) -> tuple[str, str]:
        """(via, error) of an accepted probe connection. A socket of the host that accepted it is
        docker-proxy's (or Podman's conmon's, which only reserves the port and accepts nothing).
        docker-proxy accepts whether or not anything listens behind it and closes at once when its
        own connection fails: the proxy's second leg, host -> container address and port, is tried
        as it tries it, so that a port with no listener is not "ok" for having reached the proxy."""
        via = self._via(address, f.host_port, sock)
        if via != "host-socket":
            return via, ""
        if f.runtime not in self.proxied:
            return via, "accepted by a socket of the host, not the container: the DNAT rule did not apply"
        target = f.container_ip or self._proxy_target(f)
        if not target:
            return "userland-proxy", ""
        backend = tcp_socket(family_of(target))
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(backend, (target, f.container_port)), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            return "userland-proxy", f"docker-proxy accepted, but its connection to {_hostport(target, f.container_port)} failed: {_error(exc)}"
        finally:
            backend.close()
        return "userland-proxy", ""

    def _proxy_target(self, f: Forward) -> str:
        """Where docker-proxy connects for a binding served by it alone (an IPv6 one of a container
        without IPv6: its first IPv4 address, as Docker passes it the container's address)."""
        record = self.registry.get(f.container_id)
        if record is None:
            return ""
        return next((n.ipv4 for n in record.networks if n.ipv4), "")

    async def _udp(self, sock: socket.socket, address: str, port: int, timeout: float) -> str:
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (address, port))
        await loop.sock_sendall(sock, b"")
        try:
            await asyncio.wait_for(loop.sock_recv(sock, 1), timeout)
        except asyncio.TimeoutError:
            return ""  # no answer is what most UDP services give an empty datagram: not a failure
        except ConnectionRefusedError:
            return "refused"
        return ""

    def _via(self, address: str, port: int, sock: socket.socket) -> str:
        """dnat, or host-socket when a socket of the host holds the accepted connection."""
        try:
            peer, peer_port = sock.getsockname()[:2]
            if self._diag is None:
                self._diag = netlink.open_socket(netlink.NETLINK_SOCK_DIAG)
            request = netlink.LookupRequest(family_of(address), socket.IPPROTO_TCP, 0xFFF, [proxy_sockid(address, port, peer, peer_port)])
            found = netlink.lookup_inet(self._diag, request)[0]
        except OSError:
            if self._diag is not None:
                self._diag.close()
                self._diag = None
            return ""
        return "host-socket" if found is not None and found.state != TCP_LISTEN else "dnat"

    def _record(self, key: Key, result: ProbeResult) -> None:
        before = self.results.get(key)
        self.results[key] = result
        if result.ok:
            self.last_ok[key] = result.at
        if before is None or before.ok != result.ok:
            f = self._forwards.get(key)
            log.info("port_probe_changed" if before is not None else "port_probe_first", container=f.container if f else "",
                     protocol=key[1], host_ip=key[2], host_port=key[3], ok=result.ok, path=result.path, via=result.via,
                     error=result.error, latency_ms=round(result.seconds * 1000, 3))

    # -- findings ----------------------------------------------------------------------------------

    def _namespace_of(self) -> dict[str, WatchedNamespace]:
        return {m.id: ns for ns in self.registry.namespaces().values() for m in ns.members}

    def _report(self, container_ids: set[str]) -> None:
        tracker = self.tracker
        if tracker is None or KINDS[0] in self.disabled():
            return
        now = time.time()
        owners = self._namespace_of()
        done: set[int] = set()
        for cid in container_ids:
            ns = owners.get(cid)
            if ns is None or ns.inode in done:
                continue
            done.add(ns.inode)
            findings = self.findings(ns)
            for finding in findings:
                tracker.found(ns, finding, now, self.interval)
            tracker.quiet(ns.inode, {f.kind for f in findings}, now, KINDS)
            if tracker.has_active(ns.inode, KINDS):
                self._open.add(cid)
            else:
                self._open.discard(cid)
        self._open &= set(owners)

    def findings(self, ns: WatchedNamespace) -> list[Finding]:
        """The ``port_unreachable`` finding of one namespace now, if any of its ports fails."""
        ids = {m.id for m in ns.members}
        sample = self.samples.get(ns.inode)
        drops = self._drops(ns.inode)
        failed = []
        for key, result in sorted(self.results.items()):
            f = self._forwards.get(key)
            if key[0] not in ids or f is None:
                continue
            listener = listener_of(sample, f.container_port) if f.protocol == "tcp" else Listener(None)
            if listener.present:
                self.seen_listening.add(key)
            if result.ok or not wants_anomaly(listener, key in self.seen_listening):
                continue
            failed.append(self._failed(f, result, listener, drops))
        return probe_findings(failed)

    def _failed(self, f: Forward, result: ProbeResult, listener: Listener, drops: tuple[tuple[str, int], ...]) -> FailedProbe:
        return FailedProbe(
            forward=_describe(f), state=f.state, rule=f.rule, detail=f.detail,
            protocol=f.protocol, container_port=f.container_port, error=result.error, path=result.path, listener=listener,
            drops=drops, last_ok=self.last_ok.get(forward_key(f)), host_drops=result.host_drops,
        )

    def _drops(self, inode: int) -> tuple[tuple[str, int], ...]:
        """The container firewall's DROP/REJECT rules whose counters grew since the previous look."""
        fw = self.firewalls(inode) if self.firewalls is not None else None
        if fw is None:
            return ()
        out = []
        for rule in fw.rules:
            key = (inode, rule.table, rule.chain, rule.position)
            before = self._drops_seen.get(key)
            self._drops_seen[key] = rule.packets
            if before is not None and rule.packets > before:
                out.append((f"{rule.table} {rule.chain} rule {rule.position}: {rule.text}", rule.packets - before))
        watched = self.registry.namespaces()
        for key in [k for k in self._drops_seen if k[0] not in watched]:
            del self._drops_seen[key]
        return tuple(out)

    # -- views -------------------------------------------------------------------------------------

    def verdict(self, f: Forward, sample: Any = None) -> dict[str, Any]:
        """One published port's verdict: rule ok, listener ok, probe ok (path, latency)."""
        key = forward_key(f)
        result = self.results.get(key)
        listener = listener_of(sample, f.container_port) if f.protocol == "tcp" else Listener(None)
        out: dict[str, Any] = {
            "rule": f.state == "ok",
            "listener": listener.present,
            "probe": result.to_json() if result is not None else None,
        }
        if listener.present:
            out["accept_queue"] = {"length": listener.length, "limit": listener.limit}
            if listener.loopback:
                out["listener_loopback_only"] = True
        if key in self.skipped:
            out["not_probed"] = self.skipped[key]
        elif result is None:
            out["not_probed"] = "not probed yet"
        if result is not None and not result.ok:
            failed = self._failed(f, result, listener, ())
            out["cause"] = probe_cause(failed).to_json()
        return out

    def verdicts(self, forwards: list[Forward]) -> list[dict[str, Any]]:
        """The verdicts of ``forwards`` (each with its listener from its namespace's latest sample)."""
        owners = self._namespace_of()
        out = []
        for f in forwards:
            ns = owners.get(f.container_id)
            out.append(self.verdict(f, self.samples.get(ns.inode) if ns is not None else None))
        return out

    def series(self) -> list[tuple[Forward, ProbeResult]]:
        """(forward, latest result) of every probed port, for the exporter (on the event loop)."""
        return [(self._forwards[k], r) for k, r in self.results.items() if k in self._forwards]


def _describe(f: Forward) -> str:
    host = f"[{f.host_ip}]" if ":" in f.host_ip else f.host_ip
    return f"{f.protocol} {host or '*'}:{f.host_port} -> {f.container_ip or '?'}:{f.container_port} {f.state}"


def _host_addresses(proc_net: Path = Path("/proc/net")) -> set[str]:
    """The host's own IPv4 and IPv6 addresses but link-local ones (a port published on one of
    them is this host's)."""
    out = set()
    try:
        with open(proc_net / "fib_trie") as fh:
            lines = fh.read(1 << 20).splitlines()
    except OSError:
        lines = []
    for previous, line in zip(lines, lines[1:]):
        if "/32 host LOCAL" in line:
            parts = previous.split()
            if parts:
                out.add(parts[-1])
    try:
        with open(proc_net / "if_inet6") as fh:
            rows = fh.read(1 << 20).splitlines()
    except OSError:
        rows = []
    for row in rows:  # address (32 hex digits), ifindex, prefix length, scope, flags, name
        parts = row.split()
        if len(parts) < 4 or len(parts[0]) != 32 or parts[3] == "20":  # 0x20: link scope
            continue
        try:
            out.add(str(ipaddress.IPv6Address(int(parts[0], 16))))
        except ValueError:
            continue
    return out
