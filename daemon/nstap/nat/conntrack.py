"""The host's connection-tracking table: its pressure and its flows per container.

Totals and per-CPU statistics come from /proc (``nf_conntrack_count``, ``nf_conntrack_max``,
``/proc/net/stat/nf_conntrack``) read with ``pread`` on descriptors kept open: microseconds, where
pyroute2's Conntrack took 0.3–0.8 ms per request every interval. Flows per container need the whole table: any conntrack dump walks the
host-wide hash, and pyroute2 building an object per entry costs 26 s at 50,000 entries, so the
dump is read here with a small ``struct`` parser on a kept netlink socket (about 0.5 s at 50,000
entries) that keeps only addresses, protocol and state. Every flow of a container lives in the
host's table: original source = the container for its outbound connections, reply source = the
container for connections to its published ports.

Everything here blocks: the NAT monitor calls it from its own worker thread.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from ..gate import ROUND
from ..netns import netlink

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_PROTOINFO = 1, 2, 3, 4
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE = 1, 1
IPS_SEEN_REPLY, IPS_ASSURED = 0x2, 0x4
NLA_TYPE_MASK = 0x3FFF
STAT_KEYS = ("insert_failed", "drop", "early_drop", "invalid", "search_restart")
TCP_STATES = ("none", "syn_sent", "syn_recv", "established", "fin_wait", "close_wait", "last_ack", "time_wait", "close", "syn_sent2")
PROTOCOLS = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6", 132: "sctp", 136: "udplite"}
EVIDENCE_LIMIT = 500
CHUNK = 1024  # entries counted between two looks at the sampling round's gate

Summary = tuple[int, bytes, bytes, int, int]  # protocol, original source, reply source, status, TCP state

try:
    from ..netns._scan import conntrack_summaries as _summaries
except ImportError:  # not built: Flow objects (dump) do the same, at many times the cost
    _summaries = None

_NLA = struct.Struct("=HH")
_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")


class ConntrackUnavailable(OSError):
    """The host has no connection tracking (module not loaded) or nstap may not read it."""


@dataclass(frozen=True, slots=True)
class ConntrackTotals:
    """The table's size, its limit, and the per-CPU statistics summed."""

    entries: int
    limit: int
    stats: Mapping[str, int] = field(default_factory=dict)


class Flow:
    """One conntrack entry, reduced to what nstap reports."""

    __slots__ = ("proto", "orig_src", "orig_dst", "sport", "dport", "reply_src", "reply_dst", "status", "tcp_state")

    def __init__(self) -> None:
        self.proto = 0
        self.orig_src = self.orig_dst = self.reply_src = self.reply_dst = b""
        self.sport = self.dport = 0
        self.status = 0
        self.tcp_state = -1

    @property
    def state(self) -> str:
        """TCP's state, or for the other protocols whether a reply was seen and the flow assured."""
        return state_name(self.proto, self.status, self.tcp_state)

    def to_json(self) -> dict[str, Any]:
        """The flow as the evidence lists it."""
        return {
            "protocol": PROTOCOLS.get(self.proto, str(self.proto)), "state": self.state,
            "src": _text(self.orig_src), "dst": _text(self.orig_dst), "sport": self.sport, "dport": self.dport,
            "reply_src": _text(self.reply_src), "reply_dst": _text(self.reply_dst),
            "assured": bool(self.status & IPS_ASSURED),
        }


def state_name(proto: int, status: int, tcp_state: int) -> str:
    """TCP's state, or for the other protocols whether a reply was seen and the flow assured."""
    if proto == 6 and 0 <= tcp_state < len(TCP_STATES):
        return TCP_STATES[tcp_state]
    if status & IPS_ASSURED:
        return "assured"
    return "replied" if status & IPS_SEEN_REPLY else "unreplied"


def _text(raw: bytes) -> str:
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    if len(raw) == 16:
        return socket.inet_ntop(socket.AF_INET6, raw)
    return ""


def _tuple(data: bytes, pos: int, end: int, flow: Flow, orig: bool) -> None:
    while pos + 4 <= end:
        length, kind = _NLA.unpack_from(data, pos)
        if length < 4:
            return
        kind &= NLA_TYPE_MASK
        if kind == CTA_TUPLE_IP:
            p, e = pos + 4, pos + length
            while p + 4 <= e:
                ln, k = _NLA.unpack_from(data, p)
                if ln < 4:
                    break
                k &= NLA_TYPE_MASK
                value = data[p + 4 : p + ln]
                if orig:
                    if k in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                        flow.orig_src = value
                    elif k in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                        flow.orig_dst = value
                elif k in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    flow.reply_src = value
                elif k in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                    flow.reply_dst = value
                p += (ln + 3) & ~3
        elif kind == CTA_TUPLE_PROTO and orig:
            p, e = pos + 4, pos + length
            while p + 4 <= e:
                ln, k = _NLA.unpack_from(data, p)
                if ln < 4:
                    break
                k &= NLA_TYPE_MASK
                if k == CTA_PROTO_NUM:
                    flow.proto = data[p + 4]
                elif k == CTA_PROTO_SRC_PORT:
                    flow.sport = _BE16.unpack_from(data, p + 4)[0]
                elif k == CTA_PROTO_DST_PORT:
                    flow.dport = _BE16.unpack_from(data, p + 4)[0]
                p += (ln + 3) & ~3
        pos += (length + 3) & ~3


def parse_flow(data: bytes, off: int) -> Flow:
    """One IPCTNL_MSG_CT_NEW message starting at ``off`` (its netlink header) in ``data``."""
    (msg_len,) = struct.unpack_from("=L", data, off)
    end = min(off + msg_len, len(data))
    pos = off + 16 + 4  # nlmsghdr, nfgenmsg
    flow = Flow()
    while pos + 4 <= end:
        length, kind = _NLA.unpack_from(data, pos)
        if length < 4:
            break
        kind &= NLA_TYPE_MASK
        if kind == CTA_TUPLE_ORIG:
            _tuple(data, pos + 4, pos + length, flow, True)
        elif kind == CTA_TUPLE_REPLY:
            _tuple(data, pos + 4, pos + length, flow, False)
        elif kind == CTA_STATUS and length >= 8:
            flow.status = _BE32.unpack_from(data, pos + 4)[0]
        elif kind == CTA_PROTOINFO:
            p, e = pos + 4, pos + length
            while p + 4 <= e:
                ln, k = _NLA.unpack_from(data, p)
                if ln < 4:
                    break
                if k & NLA_TYPE_MASK == CTA_PROTOINFO_TCP:
                    q, qe = p + 4, p + ln
                    while q + 4 <= qe:
                        l2, k2 = _NLA.unpack_from(data, q)
                        if l2 < 4:
                            break
                        if k2 & NLA_TYPE_MASK == CTA_PROTOINFO_TCP_STATE:
                            flow.tcp_state = data[q + 4]
                        q += (l2 + 3) & ~3
                p += (ln + 3) & ~3
        pos += (length + 3) & ~3
    return flow


class ConntrackReader:
    """Reads the host's conntrack table. Blocking; use it from one thread only."""

    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        self.proc_root = proc_root
        self._sock: socket.socket | None = None
        self._files: dict[str, int] = {}  # kept open: a pread each, microseconds

    def _read(self, name: str) -> bytes:
        fd = self._files.get(name)
        if fd is None:
            try:
                fd = self._files[name] = os.open(self.proc_root / name, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise ConntrackUnavailable(errno.ENOENT, f"conntrack is not loaded (no {self.proc_root / name})") from None
            except OSError as exc:
                raise ConntrackUnavailable(exc.errno, f"cannot read {self.proc_root / name}: {exc.strerror or exc}") from None
        return os.pread(fd, 1 << 16, 0)

    def totals(self) -> ConntrackTotals:
        """Entries, limit and the per-CPU statistics summed, from /proc (three preads on kept descriptors)."""
        try:
            entries = int(self._read("sys/net/netfilter/nf_conntrack_count"))
            limit = int(self._read("sys/net/netfilter/nf_conntrack_max"))
            stats = parse_stat(self._read("net/stat/nf_conntrack"))
        except (OSError, ValueError) as exc:
            if isinstance(exc, ConntrackUnavailable):
                raise
            self.close()
            raise ConntrackUnavailable(getattr(exc, "errno", 0) or 0, f"conntrack statistics unavailable: {exc}") from None
        return ConntrackTotals(entries, limit, stats)

    def summaries(self) -> Iterator[Summary]:
        """Every entry as (protocol, original source, reply source, status, TCP state): what counting
        flows per container needs. Each batch of the dump is reduced in C (about 0.5 µs an entry,
        where building a Flow costs 17 µs); without the extension, from :meth:`dump`."""
        if _summaries is None:
            for flow in self.dump():
                yield flow.proto, flow.orig_src, flow.reply_src, flow.status, flow.tcp_state
            return
        for _data, entries in self._batches(offsets=False):
            yield from entries

    def _batches(self, offsets: bool) -> Iterator[tuple[bytes, list[tuple]]]:
        """The dump, one received batch at a time with its entries reduced in C (each entry's
        message offset in the batch as well, with ``offsets``)."""
        assert _summaries is not None
        if self._sock is None:
            self._sock = netlink.open_socket(netlink.NETLINK_NETFILTER)
        try:
            seq = netlink.send(self._sock, (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET, struct.pack("=BBH", socket.AF_UNSPEC, 0, 0))
            while True:
                data = netlink.receive(self._sock)
                entries, end = _summaries(data, seq, offsets)
                yield data, entries
                if end < 0:
                    raise netlink.NetlinkError(-end, "netlink: " + os.strerror(-end))
                if end:
                    return
        except BaseException:
            if self._sock is not None:
                self._sock.close()  # a half-read dump would make the next one fail: start afresh
                self._sock = None
            raise

    def matching(self, addresses: set[bytes]) -> Iterator[Flow]:
        """The entries from or to ``addresses`` (packed), whole: what a capture's evidence lists.

        Every entry of the table comes in the dump; each batch is reduced in C first and only the
        matching messages are parsed into a Flow (at 50,000 entries: the dump alone costs about
        95 ms of CPU, this 110, a Flow for every entry 310-330: bench/bench_nat.py). Without the extension, from
        :meth:`dump`. Waits out each sampling round like the other loops over the table."""
        pause = ROUND.pause  # in a worker thread (the evidence): it waits out each sampling round (see nstap.gate)
        if _summaries is None:
            for n, flow in enumerate(self.dump()):
                if n & 1023 == 1023:
                    pause()
                if flow.orig_src in addresses or flow.reply_src in addresses:
                    yield flow
            return
        for data, entries in self._batches(offsets=True):
            pause()
            for _proto, orig_src, reply_src, _status, _state, off in entries:
                if orig_src in addresses or reply_src in addresses:
                    yield parse_flow(data, off)

    def dump(self) -> Iterator[Flow]:
        """Every entry of the table (both families), parsed by hand as the dump is read: a caller
        that counts them never holds 50,000 objects. Consume it to the end."""
        if self._sock is None:
            self._sock = netlink.open_socket(netlink.NETLINK_NETFILTER)
        body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)
        mtype = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
        try:
            for kind, data, off in netlink.request(self._sock, mtype, body):
                if kind & 0xFF == IPCTNL_MSG_CT_NEW:
                    yield parse_flow(data, off)
        except BaseException:
            if self._sock is not None:
                self._sock.close()  # a half-read dump would make the next one fail: start afresh
                self._sock = None
            raise

    def close(self) -> None:
        """Close the socket and files (reopened at the next call)."""
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def parse_stat(data: bytes) -> dict[str, int]:
    """The STAT_KEYS of /proc/net/stat/nf_conntrack (a header, then one row of hex per CPU), summed."""
    lines = data.split(b"\n")
    names = lines[0].split()
    columns = [(names.index(key.encode()), key) for key in STAT_KEYS if key.encode() in names]
    out = dict.fromkeys(STAT_KEYS, 0)
    for line in lines[1:]:
        values = line.split()
        if len(values) == len(names):
            for col, key in columns:
                out[key] += int(values[col], 16)
    return out


def flows_by_container(flows: Iterable[Summary], owners: Mapping[bytes, str]) -> dict[str, Counter[tuple[str, str]]]:
    """Per container id, its flows (:meth:`ConntrackReader.summaries`) counted by (protocol,
    state). ``owners``: packed address -> id.

    A flow counts for the container that opened it (original source) and for the one that
    answers it (reply source): a connection between two containers counts for both.

    The summaries are counted as they are first, CHUNK entries at a time (``Counter``, in C): a
    container's thousands of flows are a few distinct summaries (its address, the peer's, the
    state), and only those go through the Python that names them. Counting every entry in Python
    was a sixth of the pass beside 50 containers (4 of 23 ms for 6,000 entries). What is held
    between two chunks is the containers' counts: a host's table of distinct flows is never
    held whole.
    """
    out: dict[str, Counter[tuple[str, str]]] = {}
    pause = ROUND.pause  # in the NAT thread: it waits out each sampling round (see nstap.gate)
    entries = iter(flows)
    while True:
        chunk = Counter(islice(entries, CHUNK))
        if not chunk:
            return out
        for (proto, orig_src, reply_src, status, tcp_state), n in chunk.items():
            first = owners.get(orig_src)
            second = owners.get(reply_src)
            if first is None and second is None:
                continue
            key = (PROTOCOLS.get(proto, "other"), state_name(proto, status, tcp_state))
            if first is not None:
                out.setdefault(first, Counter())[key] += n
            if second is not None and second != first:
                out.setdefault(second, Counter())[key] += n
        pause()


def flows_of(flows: Iterable[Flow], addresses: set[bytes], limit: int = EVIDENCE_LIMIT) -> tuple[list[dict[str, Any]], int]:
    """The flows from or to ``addresses`` (first ``limit`` listed) and how many there are."""
    listed = []
    count = 0
    pause = ROUND.pause  # in a worker thread (the evidence): it waits out each sampling round (see nstap.gate)
    for n, flow in enumerate(flows):
        if n & 1023 == 1023:
            pause()
        if flow.orig_src in addresses or flow.reply_src in addresses:
            count += 1
            if len(listed) < limit:
                listed.append(flow.to_json())
    return listed, count


def pack(address: str) -> bytes:
    """An address as the kernel sends it."""
    return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)


__all__ = ["ConntrackReader", "ConntrackTotals", "ConntrackUnavailable", "Flow", "flows_by_container", "flows_of", "pack", "parse_flow", "parse_stat", "state_name"]
