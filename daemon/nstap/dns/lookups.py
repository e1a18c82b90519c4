"""What the DNS program's maps say, per namespace: lookups by outcome, latency, failing names, servers.

Pure reading and bookkeeping (no bpf(2), no threads: the service hands the maps' items in), so
it is tested with tables. Everything is keyed by the namespace's cookie.
"""

from __future__ import annotations

import socket
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from .program import (
    BUDGET, COUNT, COUNT_KEY, FLIGHT_KEY, FLIGHT_VALUE, LATENCY_KEY, NAME_KEY, NAME_VALUE, SERVER_KEY, SERVER_VALUE, SUM_BUCKET, TIMEOUT,
    decode_name, qtype_name, rcode_name,
)

# Histogram bounds, seconds: every other power of two microseconds (the program's log2 buckets).
BUCKET_LOG2 = (8, 10, 12, 14, 16, 18, 20, 22)
BOUNDS = tuple((1 << b) / 1e6 for b in BUCKET_LOG2)
WINDOW = 60.0  # "the last minute" of failing names and servers
HISTORY_EVERY = 5.0  # seconds between the snapshots that window is measured against
MAX_TIMEOUT_NAMES = 4096  # names of timed-out lookups kept (least recently timed out go first)
TOP = 20  # names and servers listed
SERVER_IDLE = 600.0  # seconds after which a server not asked any more leaves the list (and the map)


class Name(NamedTuple):
    """A failing name: its outcome (rcode or timeout), question type, lookups so far, last seen."""

    name: str
    rcode: str
    qtype: str
    count: int
    last_seen: float


class Server(NamedTuple):
    """A server the namespace asked: address, port, and its counts so far."""

    address: str
    port: int
    queries: int
    answers: int
    failures: int
    timeouts: int
    latency_seconds: float  # total over the answers
    forwarded: int  # queries the embedded resolver sent on for the container


class Lookups(NamedTuple):
    """One namespace's DNS so far, as a sample carries it (every counter only grows)."""

    requests: Mapping[tuple[str, str], int]  # (rcode or "timeout", qtype) -> lookups
    buckets: tuple[int, ...]  # answered lookups at or under each of BOUNDS (cumulative)
    answered: int
    seconds: float  # the answered lookups' total time
    names: tuple[Name, ...] = ()  # failing names of the last minute, most first (at most TOP)
    servers: tuple[Server, ...] = ()
    timeout: float = 5.0  # seconds after which an unanswered lookup counted as a timeout (dns.timeout)
    untracked: int = 0  # lookups not followed: the namespace had as many awaiting an answer as it may (program.MAX_FLIGHTS_PER_NS)

    def failed(self) -> int:
        """Lookups that did not end in NOERROR."""
        return sum(n for (rcode, _), n in self.requests.items() if rcode != "NOERROR")

    def total(self) -> int:
        """Lookups that ended (answered or timed out)."""
        return sum(self.requests.values())


def _address(raw: bytes, family: int) -> str:
    return socket.inet_ntop(socket.AF_INET, raw[:4]) if family == socket.AF_INET else socket.inet_ntop(socket.AF_INET6, raw)


class Tally:
    """Per-cookie totals from the maps' reads, plus what only the daemon counts: timeouts."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.requests: dict[int, dict[tuple[str, str], int]] = {}
        self.latency: dict[int, dict[int, int]] = {}  # cookie -> log2 bucket -> answered lookups
        self.latency_ns: dict[int, int] = {}
        self.timeouts: dict[int, dict[str, int]] = {}  # cookie -> qtype -> lookups that timed out
        self.server_timeouts: dict[tuple[int, str, int], int] = {}
        self.timeout_names: OrderedDict[tuple[int, str, str], list] = OrderedDict()  # (cookie, name, qtype) -> [count, last]
        self.names: dict[int, list[Name]] = {}
        self.servers: dict[int, list[Server]] = {}
        self._history: deque[tuple[float, dict[tuple, int]]] = deque()  # (at, name key -> count) for the window
        self.untracked: dict[int, int] = {}  # cookie -> lookups not tracked: the namespace was at its room
        self.released: dict[int, list[int]] = {}  # cookie -> [lookups, names, servers] the daemon deleted
        self._released_changed: set[int] = set()
        self._listed = 0  # reads of the names and servers so far (a Lookups made before the last one is stale)
        self._made: dict[int, tuple[tuple, Lookups]] = {}  # cookie -> (what it was made from, the Lookups): unchanged, reused

    # -- the maps' items -------------------------------------------------------------------------

    def counts(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        """dns_counts read whole: answered lookups by (rcode, qtype) per cookie."""
        out: dict[int, dict[tuple[str, str], int]] = {}
        for key, value in items:
            cookie, rcode, qtype = COUNT_KEY.unpack(key)
            per = out.setdefault(cookie, {})
            label = (rcode_name(rcode), qtype_name(qtype))
            per[label] = per.get(label, 0) + COUNT.unpack(value)[0]
        self.requests = out

    def latencies(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        """dns_latency read whole: the log2 histogram and total time per cookie."""
        buckets: dict[int, dict[int, int]] = {}
        total: dict[int, int] = {}
        for key, value in items:
            cookie, bucket, _ = LATENCY_KEY.unpack(key)
            n = COUNT.unpack(value)[0]
            if bucket == SUM_BUCKET:
                total[cookie] = n
            else:
                per = buckets.setdefault(cookie, {})
                per[bucket] = per.get(bucket, 0) + n
        self.latency, self.latency_ns = buckets, total

    def expired(self, items: Iterable[tuple[bytes, bytes]], now_ns: int, wall: float) -> list[tuple[int, bytes]]:
        """dns_inflight read whole: the keys of lookups unanswered after ``timeout`` (the caller
        deletes them: an answer that comes later finds nothing and is not counted twice), counted
        as timeouts of their namespace, server and name."""
        limit = int(self.timeout * 1e9)
        gone = []
        for key, value in items:
            sent_ns, cookie, server, server_port, qtype, forwarded, _length, name = FLIGHT_VALUE.unpack(value)
            if now_ns - sent_ns < limit:
                continue
            family = FLIGHT_KEY.unpack(key)[4]
            gone.append((cookie, key))
            skey = (cookie, _address(server, family), server_port)
            self.server_timeouts[skey] = self.server_timeouts.get(skey, 0) + 1
            if forwarded:
                continue  # the embedded resolver's own query: the container's lookup times out on its own
            qt = qtype_name(qtype)
            per = self.timeouts.setdefault(cookie, {})
            per[qt] = per.get(qt, 0) + 1
            nkey = (cookie, decode_name(name), qt)
            entry = self.timeout_names.pop(nkey, None) or [0, 0.0]
            entry[0] += 1
            entry[1] = wall
            self.timeout_names[nkey] = entry
            while len(self.timeout_names) > MAX_TIMEOUT_NAMES:
                self.timeout_names.popitem(last=False)
        return gone

    def failing(self, items: Iterable[tuple[bytes, bytes]], boot_offset: float, now: float) -> list[tuple[int, bytes]]:
        """dns_names read whole (with the timed-out names): each namespace's failing names of the
        last minute, most first. Returns the (cookie, key) of names not seen for longer than the
        window: the caller deletes them (and releases their room in the namespace's budget)."""
        current: dict[tuple, tuple[int, float]] = {}
        stale = []
        for key, value in items:
            cookie, rcode, qtype, name = NAME_KEY.unpack(key)
            count, last_ns = NAME_VALUE.unpack(value)
            if now - (last_ns / 1e9 + boot_offset) > WINDOW + HISTORY_EVERY:
                stale.append((cookie, key))
                continue
            current[(cookie, decode_name(name), rcode_name(rcode), qtype_name(qtype))] = (count, last_ns / 1e9 + boot_offset)
        for (cookie, name, qtype), (count, last) in self.timeout_names.items():
            current[(cookie, name, TIMEOUT, qtype)] = (count, last)
        base = self._window_base(now, {k: v[0] for k, v in current.items()})
        names: dict[int, list[Name]] = {}
        for key, (count, last) in current.items():
            grew = count - base.get(key, 0) if base.get(key, 0) <= count else count
            if grew > 0 and now - last <= WINDOW:
                names.setdefault(key[0], []).append(Name(key[1], key[2], key[3], grew, last))
        for per in names.values():
            per.sort(key=lambda n: (-n.count, -n.last_seen, n.name))
            del per[TOP:]
        self.names = names
        self._listed += 1
        return stale

    def _window_base(self, now: float, counts: dict[tuple, int]) -> dict[tuple, int]:
        """The counts of a minute ago: the newest snapshot at least WINDOW old, or nothing (the
        maps were made less than a minute ago: all they hold is recent). Keeps a snapshot every
        HISTORY_EVERY seconds."""
        history = self._history
        while len(history) > 1 and now - history[1][0] >= WINDOW:
            history.popleft()
        base = history[0][1] if history and now - history[0][0] >= WINDOW else {}
        if not history or now - history[-1][0] >= HISTORY_EVERY:
            history.append((now, counts))
        return base

    def server_list(self, items: Iterable[tuple[bytes, bytes]], now_ns: int) -> list[tuple[int, bytes]]:
        """dns_servers read whole: each namespace's servers, most asked first. Returns the
        (cookie, key) of servers not asked for SERVER_IDLE seconds: the caller deletes them."""
        servers: dict[int, list[Server]] = {}
        listed: set[tuple[int, str, int]] = set()
        idle = []
        for key, value in items:
            cookie, addr, family, port, _ = SERVER_KEY.unpack(key)
            queries, answers, failures, latency_ns, forwarded, last_ns = SERVER_VALUE.unpack(value)
            if now_ns - last_ns > SERVER_IDLE * 1e9:
                idle.append((cookie, key))
                continue
            address = _address(addr, family)
            listed.add((cookie, address, port))
            timeouts = self.server_timeouts.get((cookie, address, port), 0)
            servers.setdefault(cookie, []).append(Server(address, port, queries, answers, failures, timeouts, latency_ns / 1e9, forwarded))
        for per in servers.values():
            per.sort(key=lambda s: (-s.queries, s.address))
            del per[TOP:]
        self.servers = servers
        # Timeouts are kept for the servers in the map only (a namespace that asks servers past
        # its room, or pruned ones, would grow this table without end).
        self.server_timeouts = {k: v for k, v in self.server_timeouts.items() if k in listed}
        self._listed += 1
        return idle

    # -- per namespace ---------------------------------------------------------------------------

    def budgets(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        """dns_budget read whole: the lookups each namespace had no room for, so far."""
        self.untracked = {int.from_bytes(key[:8], "little"): BUDGET.unpack(value)[4] for key, value in items}

    def release(self, cookie: int, what: int) -> None:
        """The daemon deleted an entry of ``what`` (0 lookups, 1 names, 2 servers) of the namespace:
        its room back (written to dns_released by the caller: :meth:`released_changed`)."""
        counts = self.released.setdefault(cookie, [0, 0, 0])
        counts[what] += 1
        self._released_changed.add(cookie)

    def released_changed(self) -> list[tuple[bytes, bytes]]:
        """The dns_released entries to write: (key, value) of the namespaces whose count changed."""
        out = [(cookie.to_bytes(8, "little"), BUDGET.pack(*self.released[cookie], 0, 0)) for cookie in self._released_changed if cookie in self.released]
        self._released_changed = set()
        return out

    def lookups(self, cookie: int) -> Lookups:
        """The namespace's totals now (the same object as last time if nothing changed: a sample
        of an idle namespace, and what detectors keep of it, costs nothing new)."""
        counts, timeouts = self.requests.get(cookie, {}), self.timeouts.get(cookie, {})
        made = (sum(counts.values()), sum(timeouts.values()), self.latency_ns.get(cookie, 0), self._listed, self.untracked.get(cookie, 0))
        last = self._made.get(cookie)
        if last is not None and last[0] == made:
            return last[1]
        lookups = self._make(cookie)
        self._made[cookie] = (made, lookups)
        return lookups

    def _make(self, cookie: int) -> Lookups:
        requests = dict(self.requests.get(cookie, {}))
        for qtype, n in self.timeouts.get(cookie, {}).items():
            requests[(TIMEOUT, qtype)] = n
        per = self.latency.get(cookie, {})
        answered = sum(per.values())
        # log2 bucket b holds [2^(b-1), 2^b) microseconds: at or under 2^k us are the buckets <= k.
        buckets = tuple(sum(n for b, n in per.items() if b <= k) for k in BUCKET_LOG2)
        return Lookups(requests, buckets, answered, self.latency_ns.get(cookie, 0) / 1e9,
                       tuple(self.names.get(cookie, ())), tuple(self.servers.get(cookie, ())), self.timeout, self.untracked.get(cookie, 0))

    def forget(self, cookies: set[int]) -> None:
        """Drop everything of namespaces no longer watched."""
        for table in (self.requests, self.latency, self.latency_ns, self.timeouts, self.names, self.servers, self._made, self.untracked, self.released):
            for cookie in cookies & set(table):
                del table[cookie]
        self.server_timeouts = {k: v for k, v in self.server_timeouts.items() if k[0] not in cookies}
        for key in [k for k in self.timeout_names if k[0] in cookies]:
            del self.timeout_names[key]
        for i, (at, snapshot) in enumerate(self._history):
            self._history[i] = (at, {k: v for k, v in snapshot.items() if k[0] not in cookies})


def to_json(lookups: Lookups | None) -> dict[str, Any]:
    """A namespace's DNS as the API, the CLI and the evidence show it."""
    if lookups is None:
        return {}
    mean = lookups.seconds / lookups.answered if lookups.answered else None
    return {
        "requests": [{"rcode": r, "qtype": q, "count": n} for (r, q), n in sorted(lookups.requests.items())],
        "answered": lookups.answered,
        "failed": lookups.failed(),
        "mean_latency_ms": round(mean * 1000, 3) if mean is not None else None,
        "untracked": lookups.untracked,
        "failing_names": [{"name": n.name, "rcode": n.rcode, "qtype": n.qtype, "count": n.count, "last_seen": round(n.last_seen, 3)} for n in lookups.names],
        "servers": [
            {"address": s.address, "port": s.port, "queries": s.queries, "answers": s.answers, "failures": s.failures, "timeouts": s.timeouts,
             "mean_latency_ms": round(s.latency_seconds / s.answers * 1000, 3) if s.answers else None, "via_embedded_resolver": s.forwarded}
            for s in lookups.servers
        ],
    }
