"""Socket sampler: listeners, accept queues and TCP sockets by state, shaped by what each read costs.

Listeners and their accept queues (length and backlog limit) come from sock_diag. A dump of LISTEN
sockets walks the whole listening hash (25-50 µs per address family, more when cold), so it is
done only to discover listeners; every interval the known ones are asked for one by one, one hash
probe each, all in a single send. /proc/net/sockstat and sockstat6 (about 3 µs) give exact totals
every interval: sockets in use per protocol and family, and TCP sockets in TIME_WAIT. Where the
eBPF pass over every namespace (:mod:`nstap.ebpf.mibs`) read them for this round, they are taken
from it instead, and neither file is read.

Counting the other TCP states (established, syn_sent, close_wait, ...) needs a walk of the
established hash, and unless the namespace has its own (``net.ipv4.tcp_child_ehash_entries`` set
before it was created) that hash is the host's: 262,144 buckets here, 2-3 ms per address family
per walk however few sockets there are. So:

* when every TCP socket of a family in use is a listener (sockstat's count equals the listener
  count), that family has no socket in any other state and is not walked at all — the common case
  for idle services;
* otherwise the walk runs in a worker thread on a schedule derived from its measured CPU cost:
  every ``cost / budget`` intervals, clamped to [interval, max_interval]. Namespaces with their own
  small hash walk every interval; those sharing the host's about once a minute;
* a scheduled walk waits until the sockets that are not listeners were there at PERSISTING samples
  in a row: a connection that lives less than an interval (one request served) is gone before a
  walk of the host's hash could count it. With one HTTP request a second to each of 200 busybox
  httpd containers, 52 of the 54 runs of samples that found such sockets were one sample long
  (bench/bench_walk_sightings.py).
  A walk asked for by retried SYNs does not wait.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping

from ..netns import netlink
from ..netns.handles import NamespaceHandles
from ..netns.scan import pairs_plan
from ..samples import ListenQueue, SocketSample
from .protocols import RoundCounters

TCP_STATES = {
    1: "established",
    2: "syn_sent",
    3: "syn_recv",
    4: "fin_wait1",
    5: "fin_wait2",
    6: "time_wait",
    8: "close_wait",
    9: "last_ack",
    10: "listen",
    11: "closing",
    12: "syn_recv",  # TCP_NEW_SYN_RECV: a listener's pending handshakes
}
WALKED_STATES = tuple(dict.fromkeys(name for s, name in TCP_STATES.items() if s not in (6, 10)))
STATE_NAMES = ("listen", "time_wait", *WALKED_STATES)
# The walk asks for every state but LISTEN and TIME_WAIT (known exactly every interval), CLOSE (7)
# and BOUND_INACTIVE (13): asking for the last two makes the kernel walk the bind hash as well,
# which costs as much again and only finds bound, unconnected sockets.
TCP_WALK_MASK = sum(1 << s for s in TCP_STATES if s not in (6, 10))
TCP_LISTEN_MASK = 1 << 10
SYN_SENT = 2
PERSISTING = 2  # samples in a row that must find sockets other than listeners before a scheduled walk
MAX_LOOKUPS = 8  # more known listeners than this: one dump is cheaper than asking for each
REDISCOVER_AFTER = 10.0  # seconds: dump listeners at least this often while sockets are unexplained

_FAMILIES = ((socket.AF_INET, "tcp"), (socket.AF_INET6, "tcp6"))
V6_LOOPBACK = bytes(15) + b"\x01"


SOCKSTAT_WANTED = (
    ("TCP", "inuse", "tcp"), ("TCP", "tw", "time_wait"), ("UDP", "inuse", "udp"), ("RAW", "inuse", "raw"),
    ("TCP6", "inuse", "tcp6"), ("UDP6", "inuse", "udp6"), ("RAW6", "inuse", "raw6"),
)


class SockstatLayout:
    """Where the wanted numbers sit in one shape of a sockstat file: a scan plan."""

    __slots__ = ("plan", "keys")

    def __init__(self, data: bytes) -> None:
        self.plan, found = pairs_plan(data, [(section, key) for section, key, _ in SOCKSTAT_WANTED])
        self.keys = tuple(SOCKSTAT_WANTED[i][2] for i in found)


def parse_sockstat(data: bytes, in_use: dict[str, int], layout: SockstatLayout | None = None) -> tuple[int, SockstatLayout]:
    """Add "inuse" per protocol from sockstat/sockstat6 to ``in_use``; return (TCP time-wait or 0, layout)."""
    values = layout.plan.scan(data) if layout is not None else None
    if values is None:
        layout = SockstatLayout(data)
        values = layout.plan.scan(data)
        if values is None:
            raise ValueError("unreadable sockstat")
    assert layout is not None
    time_wait = 0
    for key, value in zip(layout.keys, values):
        if key == "time_wait":
            time_wait = value
        else:
            in_use[key] = value
    return time_wait, layout


def port_label(port: int, ephemeral: tuple[int, int]) -> str:
    """The ``port`` label of a listener: its number, or "ephemeral" inside the ephemeral range."""
    if ephemeral[0] <= port <= ephemeral[1]:
        return "ephemeral"
    return str(port)


def walk_tcp(diag: socket.socket, families: tuple[int, ...]) -> tuple[dict[str, int], int, float]:
    """Count the non-listening, non-time-wait TCP sockets of ``families`` by state.

    Blocking (the kernel walks the established hash): run it in a worker thread. Returns
    (counts, highest SYN retransmit count of a SYN_SENT socket, CPU seconds spent).
    """
    start = time.thread_time()
    by_state = [0] * 16
    syn_retrans = 0
    for family in families:
        syn_retrans = max(syn_retrans, netlink.count_inet(diag, family, socket.IPPROTO_TCP, TCP_WALK_MASK, by_state, SYN_SENT))
    counts = dict.fromkeys(WALKED_STATES, 0)
    for state, name in TCP_STATES.items():
        if name in counts:
            counts[name] += by_state[state]
    return counts, syn_retrans, time.thread_time() - start


def walk_interval(cost: float, budget: float, interval: float, max_interval: float) -> float:
    """Seconds between walks so that ``cost`` per walk averages ``budget`` per interval."""
    if budget <= 0:
        return max_interval
    return min(max(interval * cost / budget, interval), max_interval)


class SocketSampler:
    """Listeners and socket counts of one namespace every interval; TCP walks on a CPU budget."""

    name = "sockets"

    def __init__(
        self,
        handles: NamespaceHandles,
        interval: float,
        walk_budget: float,
        max_walk_interval: float,
        max_ports: int,
        clock=time.monotonic,
        round_counters: RoundCounters | None = None,
    ) -> None:
        self._inode = handles.inode
        self._round = round_counters or RoundCounters()
        self._passed: tuple[int, ...] | None = None  # the pass's values behind _last_in_use, if they came from one
        self._diag = handles.diag
        self._walk_socket = handles.diag_walk
        self._sockstat = handles.proc["sockstat"]
        self._sockstat6 = handles.proc.get("sockstat6")
        self._ephemeral = handles.local_port_range
        self._interval = interval
        self._budget = walk_budget  # CPU seconds per container-sample
        self._max_walk_interval = max(max_walk_interval, interval)
        self._max_ports = max_ports
        self._clock = clock
        self._walked: Mapping[str, int] = dict.fromkeys(WALKED_STATES, 0)
        self._walked_at = -1.0  # 0.0: exact as of each sample; > 0: when the last walk counted them
        self._syn_retrans = 0
        self._walk_cost: float | None = None
        self.urgent = False  # a walk was asked for by walk_soon (SYNs retried), not by the schedule
        self._next_walk = clock()
        self._walked_clock = float("-inf")
        self.walk_interval = interval
        self.walk_families: tuple[int, ...] = ()  # families to walk, set by sample()
        self._unexplained = 0  # samples in a row that found sockets other than listeners
        self._known: dict[int, list[netlink.DiagSocket]] = {}  # family -> listeners found by the last dump
        self._lookups: dict[int, netlink.LookupRequest] = {}
        self._discovered_at: dict[int, float] = {}
        self._in_use: dict[int, int] = {}
        self._layout4: SockstatLayout | None = None
        self._layout6: SockstatLayout | None = None
        self._raw: tuple[bytes, bytes] = (b"", b"")
        self._last_in_use: dict[str, int] = {}
        self._last_time_wait = 0
        self._last: SocketSample | None = None
        self._last_listeners: list[list[netlink.DiagSocket]] = []

    def sample(self) -> SocketSample:
        """Sockets in use (the round's pass, else sockstat read now) and the listeners now (no
        walk: see :meth:`walk_due`).

        When nothing read differs from the previous sample (byte for byte), the previous sample
        object is returned again: most namespaces are quiet most of the time.
        """
        passed = self._round.sockets.get(self._inode)
        if passed is not None:
            if passed == self._passed:
                in_use, time_wait, changed = self._last_in_use, self._last_time_wait, False
            else:
                in_use = dict(zip(self._round.socket_keys, passed))
                time_wait = in_use.pop("time_wait")
                self._passed, self._last_in_use, self._last_time_wait, changed = passed, in_use, time_wait, True
                self._raw = (b"", b"")  # the files' next read is parsed
        else:
            self._passed = None
            raw = (self._sockstat.read(), self._sockstat6.read() if self._sockstat6 is not None else b"")
            if raw == self._raw:
                in_use, time_wait, changed = self._last_in_use, self._last_time_wait, False
            else:
                in_use = {}
                time_wait, self._layout4 = parse_sockstat(raw[0], in_use, self._layout4)
                if raw[1]:
                    _, self._layout6 = parse_sockstat(raw[1], in_use, self._layout6)
                self._raw, self._last_in_use, self._last_time_wait, changed = raw, in_use, time_wait, True
        walk = []
        listeners: list[list[netlink.DiagSocket]] = []
        for family, proto in _FAMILIES:
            sockets = in_use.get(proto, 0)
            previous, self._in_use[family] = self._in_use.get(family, 0), sockets
            if not sockets:
                self._known[family] = []
                continue
            found = self._listeners(family, sockets, sockets > previous)
            listeners.append(found)
            if sockets > len(found):
                walk.append(family)
        self.walk_families = tuple(walk)
        self._unexplained = self._unexplained + 1 if walk else 0
        if not walk:
            self.urgent = False  # a fault's walk asked for when there is nothing to walk is not kept for later
        if not walk and self._walked_at:  # every TCP socket in use is a listener: no other state, exactly
            self._walked = dict.fromkeys(WALKED_STATES, 0)
            self._walked_at = 0.0  # "as of this sample"
            self._syn_retrans = 0
            changed = True
        last = self._last
        if (
            last is not None
            and not changed
            and last.walk_interval == self.walk_interval
            and len(listeners) == len(self._last_listeners)
            and all(a is b for a, b in zip(listeners, self._last_listeners))
        ):
            return last
        ports: dict[str, list[int]] = {}
        for found in listeners:
            self._add_ports(found, ports)
        states = {"listen": sum(p[2] for p in ports.values()), "time_wait": time_wait, **self._walked}
        listen = tuple(ListenQueue(label, q, limit, n, not routable) for label, (q, limit, n, routable) in ports.items())
        self._last = SocketSample(in_use, states, self._walked_at, self._syn_retrans, listen, self.walk_interval)
        self._last_listeners = listeners
        return self._last

    def _listeners(self, family: int, in_use: int, grew: bool) -> list[netlink.DiagSocket]:
        """The family's listeners now.

        Listeners known from the last dump are asked for one by one (one hash probe each); the
        listening hash is dumped again only when one of them is gone, when there may be a new
        one (more sockets in use than known listeners, and more than at the last sample, or
        for longer than REDISCOVER_AFTER), or when there are too many to ask for one by one.
        The answer is the very same list object as last time when nothing changed.
        """
        known = self._known.get(family)
        now = self._clock()
        if known is not None and len(known) <= MAX_LOOKUPS:
            unknown = in_use > len(known)
            if not (unknown and (grew or now - self._discovered_at.get(family, now) >= REDISCOVER_AFTER)):
                if not known:
                    return known
                answers = netlink.lookup_inet(self._diag, self._lookups[family])
                if None not in answers:
                    return answers
        current = netlink.dump_inet(self._diag, family, socket.IPPROTO_TCP, TCP_LISTEN_MASK)
        self._known[family] = current
        self._lookups[family] = netlink.LookupRequest(family, socket.IPPROTO_TCP, TCP_LISTEN_MASK, [k.sockid for k in current])
        self._discovered_at[family] = now
        return current

    def _add_ports(self, listeners: list[netlink.DiagSocket], ports: dict[str, list[int]]) -> None:
        for sock in listeners:
            label = port_label(sock.port, self._ephemeral)
            entry = ports.get(label)
            if entry is None:
                if len(ports) >= self._max_ports:
                    label = "other"
                    entry = ports.get(label)
                if entry is None:
                    entry = ports[label] = [0, 0, 0, 0]
            entry[0] += sock.rqueue
            entry[1] += sock.wqueue
            entry[2] += 1
            # bound elsewhere than loopback (the sockid's source address: 127.0.0.0/8 in its first
            # byte, or ::1): a published port's connections can reach it
            sid = sock.sockid
            if sid[4] != 127 and sid[4:20] != V6_LOOPBACK:
                entry[3] += 1

    def work(self) -> int:
        """What the namespace made this sample read: its listeners (see NamespaceWatcher.account)."""
        return sum(len(known) for known in self._known.values())

    def load(self) -> str:
        """What a sample has to read, for the log line of a namespace that costs too much."""
        listeners = sum(len(known) for known in self._known.values())
        return f"{listeners} listeners, {sum(self._last_in_use.values())} sockets in use"

    def walk_soon(self) -> None:
        """Walk at the next sample even if the budget would wait (at most every 2 intervals)."""
        self._next_walk = min(self._next_walk, max(self._clock(), self._walked_clock + 2 * self._interval))
        self.urgent = True

    @property
    def walk_cost(self) -> float | None:
        """CPU seconds this namespace's walks have cost lately (None: never walked)."""
        return self._walk_cost

    def walk_due(self) -> bool:
        """True when the latest PERSISTING samples found sockets to walk (the latest alone, if
        retried SYNs asked for a walk) and this namespace's schedule allows a walk now."""
        return (self._unexplained >= PERSISTING or (self.urgent and self._unexplained > 0)) and self._clock() >= self._next_walk

    def walk(self) -> tuple[dict[str, int], int, float]:
        """Walk the TCP tables of the families that need it (blocking: call from a worker thread)."""
        return walk_tcp(self._walk_socket, self.walk_families)

    def walk_done(self, result: tuple[dict[str, int], int, float]) -> None:
        """Record a finished walk and schedule the next from its measured cost."""
        counts, syn_retrans, cost = result
        self._walked = counts
        self._walked_at = time.time()
        self._walked_clock = self._clock()
        self._syn_retrans = syn_retrans
        self.urgent = False
        self._last = None
        self._walk_cost = cost if self._walk_cost is None else 0.7 * self._walk_cost + 0.3 * cost
        self.walk_interval = walk_interval(self._walk_cost, self._budget, self._interval, self._max_walk_interval)
        self._next_walk = self._clock() + self.walk_interval

    def walk_failed(self) -> None:
        """A walk failed: try again after the longest interval rather than every sample."""
        self._next_walk = self._clock() + self._max_walk_interval
        self.urgent = False
