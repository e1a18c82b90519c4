"""Socket sampler: listeners, accept queues and TCP sockets by state, shaped by what each read costs.

A sock_diag dump of LISTEN sockets walks only the listening hash (about 25 µs per address family),
so it runs every interval and gives each listener's accept-queue length and backlog limit.
/proc/net/sockstat (about 3 µs) gives exact totals every interval: sockets in use per protocol and
family, and TCP sockets in TIME_WAIT.

Counting the other TCP states (established, syn_sent, close_wait, ...) needs a walk of the
established hash, and unless the namespace has its own (``net.ipv4.tcp_child_ehash_entries`` set
before it was created) that hash is the host's: 262,144 buckets here, 2-3 ms per address family
per walk however few sockets there are. So:

* when every TCP socket of a family in use is a listener (sockstat's count equals the listener
  count), that family has no socket in any other state and is not walked at all — the common case
  for idle services;
* otherwise the walk runs in a worker thread on a schedule derived from its measured CPU cost:
  every ``cost / budget`` intervals, clamped to [interval, max_interval]. Namespaces with their own
  small hash walk every interval; those sharing the host's about once a minute.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping

from ..netns import netlink
from ..netns.handles import NamespaceHandles
from ..samples import ListenQueue, SocketSample

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

SOCKSTAT_KEYS = {b"TCP:": "tcp", b"UDP:": "udp", b"RAW:": "raw", b"TCP6:": "tcp6", b"UDP6:": "udp6", b"RAW6:": "raw6"}
_FAMILIES = ((socket.AF_INET, "tcp"), (socket.AF_INET6, "tcp6"))


def parse_sockstat(data: bytes, in_use: dict[str, int]) -> int:
    """Add "inuse" per protocol from sockstat/sockstat6 to ``in_use``; return TCP time-wait (or 0)."""
    time_wait = 0
    for line in data.split(b"\n"):
        fields = line.split()
        if not fields:
            continue
        key = SOCKSTAT_KEYS.get(fields[0])
        if key is None:
            continue
        for i in range(1, len(fields) - 1, 2):
            if fields[i] == b"inuse":
                in_use[key] = int(fields[i + 1])
            elif fields[i] == b"tw":
                time_wait = int(fields[i + 1])
    return time_wait


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
    counts = dict.fromkeys(WALKED_STATES, 0)
    syn_retrans = 0
    for family in families:
        for state, _port, _rq, _wq, retrans in netlink.dump_inet(diag, family, socket.IPPROTO_TCP, TCP_WALK_MASK):
            name = TCP_STATES.get(state)
            if name is None:
                continue
            counts[name] += 1
            if state == SYN_SENT and retrans > syn_retrans:
                syn_retrans = retrans
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
    ) -> None:
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
        self._walked_at = 0.0
        self._syn_retrans = 0
        self._walk_cost: float | None = None
        self._next_walk = clock()
        self.walk_interval = interval
        self.walk_families: tuple[int, ...] = ()  # families to walk, set by sample()

    def sample(self) -> SocketSample:
        """Read sockstat and the listeners now (no walk: see :meth:`walk_due`)."""
        in_use: dict[str, int] = {}
        time_wait = parse_sockstat(self._sockstat.read(), in_use)
        if self._sockstat6 is not None:
            parse_sockstat(self._sockstat6.read(), in_use)
        ports: dict[str, list[int]] = {}
        walk = []
        for family, proto in _FAMILIES:
            sockets = in_use.get(proto, 0)
            if sockets:
                listeners = self._listeners(family, ports)
                if sockets > listeners:
                    walk.append(family)
        self.walk_families = tuple(walk)
        if not walk:  # every TCP socket in use is a listener: nothing in any other state, exactly
            self._walked = dict.fromkeys(WALKED_STATES, 0)
            self._walked_at = time.time()
            self._syn_retrans = 0
        states = {"listen": sum(p[2] for p in ports.values()), "time_wait": time_wait, **self._walked}
        listen = tuple(ListenQueue(label, q, limit, n) for label, (q, limit, n) in ports.items())
        return SocketSample(in_use, states, self._walked_at, self._syn_retrans, listen, self.walk_interval)

    def _listeners(self, family: int, ports: dict[str, list[int]]) -> int:
        count = 0
        for _state, port, rq, wq, _retrans in netlink.dump_inet(self._diag, family, socket.IPPROTO_TCP, TCP_LISTEN_MASK):
            count += 1
            label = port_label(port, self._ephemeral)
            entry = ports.get(label)
            if entry is None:
                if len(ports) >= self._max_ports:
                    label = "other"
                    entry = ports.get(label)
                if entry is None:
                    entry = ports[label] = [0, 0, 0]
            entry[0] += rq
            entry[1] += wq
            entry[2] += 1
        return count

    def walk_due(self) -> bool:
        """True when the latest sample found sockets to walk and the budget allows a walk now."""
        return bool(self.walk_families) and self._clock() >= self._next_walk

    def walk(self) -> tuple[dict[str, int], int, float]:
        """Walk the TCP tables of the families that need it (blocking: call from a worker thread)."""
        return walk_tcp(self._walk_socket, self.walk_families)

    def walk_done(self, result: tuple[dict[str, int], int, float]) -> None:
        """Record a finished walk and schedule the next from its measured cost."""
        counts, syn_retrans, cost = result
        self._walked = counts
        self._walked_at = time.time()
        self._syn_retrans = syn_retrans
        self._walk_cost = cost if self._walk_cost is None else 0.7 * self._walk_cost + 0.3 * cost
        self.walk_interval = walk_interval(self._walk_cost, self._budget, self._interval, self._max_walk_interval)
        self._next_walk = self._clock() + self.walk_interval

    def walk_failed(self) -> None:
        """A walk failed: try again after the longest interval rather than every sample."""
        self._next_walk = self._clock() + self._max_walk_interval
