"""Top talkers, the runbook's ``iftop`` step: bytes and packets per peer of each container over the
last minute, from conntrack's accounting.

With ``net.netfilter.nf_conntrack_acct=1`` every conntrack entry counts the packets and bytes of
each direction. nstap dumps the table every ``nat.talkers.interval`` seconds (spaced out further
when a pass costs more than :data:`BUDGET` of a core), takes each flow's growth since the previous
pass, and adds it to its container's peer: for a connection the container opened, the peer is the
original destination; for one it answers (a published port, another container), the original
source — the real client, before DNAT. Six passes' worth of growth make the minute.

Accounting is off by default in the kernel, and nstap turns it on only with the operator's consent
(``nat.talkers.conntrack_acct: true``): it costs 16 bytes per conntrack entry and two counter
updates per packet, host-wide. It counts connections created after it was turned on only.

Bounded: at most ``max_flows`` flows followed host-wide (the rest counted as untracked), at most
``max_peers`` peers per container per pass (the rest summed as ``other``). Flows that end between
two passes lose their last interval's bytes: a lower bound, said in the output.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import structlog

from ..config import TalkersConfig
from ..gate import ROUND
from ..log import Once
from ..netns import netlink
from ..registry import ContainerRegistry
from ..runtime.records import ContainerRecord
from ..supervisor import TaskSupervisor
from ..threads import worker_threads
from . import conntrack
from .conntrack import ConntrackReader, pack, parse_flow

log = structlog.get_logger("nstap.talkers")

WINDOW = 60.0  # seconds the talkers cover
BUDGET = 0.02  # share of one core a pass may use on average
CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY, CTA_ID = 9, 10, 12
CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES = 1, 2
OTHER = "other"
_NLA = struct.Struct("=HH")
_BE64 = struct.Struct(">Q")
_BE32 = struct.Struct(">I")

Counted = tuple[int, bytes, bytes, bytes, int, int, int, int, int]  # id, orig src, orig dst, reply src, opk, oby, rpk, rby, proto
Totals = list[int]  # bytes out, packets out, bytes in, packets in, flows


def parse_counters(data: bytes, off: int) -> tuple[int, int, int, int, int]:
    """(conntrack id, orig packets, orig bytes, reply packets, reply bytes) of one CT_NEW message."""
    (msg_len,) = struct.unpack_from("=L", data, off)
    end = min(off + msg_len, len(data))
    pos = off + 20
    ct_id = 0
    values = [0, 0, 0, 0]
    while pos + 4 <= end:
        length, kind = _NLA.unpack_from(data, pos)
        if length < 4:
            break
        kind &= conntrack.NLA_TYPE_MASK
        if kind == CTA_ID and length >= 8:
            (ct_id,) = _BE32.unpack_from(data, pos + 4)
        elif kind in (CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY):
            base = 0 if kind == CTA_COUNTERS_ORIG else 2
            p, e = pos + 4, pos + length
            while p + 4 <= e:
                ln, k = _NLA.unpack_from(data, p)
                if ln < 4:
                    break
                k &= conntrack.NLA_TYPE_MASK
                if k in (CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES) and ln >= 12:
                    values[base + (0 if k == CTA_COUNTERS_PACKETS else 1)] = _BE64.unpack_from(data, p + 4)[0]
                p += (ln + 3) & ~3
        pos += (length + 3) & ~3
    return ct_id, values[0], values[1], values[2], values[3]


def counted_flows(reader: ConntrackReader) -> Iterator[Counted]:
    """Every conntrack entry with its id and counters (blocking; consume it to the end)."""
    if reader._sock is None:
        reader._sock = netlink.open_socket(netlink.NETLINK_NETFILTER)
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)
    mtype = (conntrack.NFNL_SUBSYS_CTNETLINK << 8) | conntrack.IPCTNL_MSG_CT_GET
    try:
        for kind, data, off in netlink.request(reader._sock, mtype, body):
            if kind & 0xFF == conntrack.IPCTNL_MSG_CT_NEW:
                flow = parse_flow(data, off)
                ct_id, opk, oby, rpk, rby = parse_counters(data, off)
                yield ct_id, flow.orig_src, flow.orig_dst, flow.reply_src, opk, oby, rpk, rby, flow.proto
    except BaseException:
        if reader._sock is not None:
            reader._sock.close()
            reader._sock = None
        raise


def tally(
    flows: Iterator[Counted] | list[Counted],
    owners: Mapping[bytes, str],
    previous: Mapping[tuple, tuple[int, int, int, int]] | None,
    max_flows: int,
    max_peers: int,
) -> tuple[dict[str, dict[str, Totals]], dict[tuple, tuple[int, int, int, int]], int]:
    """One pass: per container, per peer, the growth since ``previous`` (None: the first pass,
    which only takes the baseline). Returns (growth, this pass's counters, flows not followed)."""
    out: dict[str, dict[str, Totals]] = {}
    seen: dict[tuple, tuple[int, int, int, int]] = {}
    untracked = 0
    pause = ROUND.pause  # in the talkers' thread: it waits out each sampling round (see nstap.gate)
    for n, (ct_id, orig_src, orig_dst, reply_src, opk, oby, rpk, rby, proto) in enumerate(flows):
        if n & 1023 == 1023:
            pause()
        first, second = owners.get(orig_src), owners.get(reply_src)
        if first is None and second is None:
            continue
        key = (ct_id, orig_src, orig_dst, proto)
        if len(seen) >= max_flows:
            untracked += 1
            continue
        seen[key] = (opk, oby, rpk, rby)
        if previous is None:
            continue
        before = previous.get(key, (0, 0, 0, 0))
        d_opk, d_oby, d_rpk, d_rby = (max(0, a - b) for a, b in zip((opk, oby, rpk, rby), before))
        if not (d_opk or d_rpk):
            continue
        if first is not None:  # the container opened it: it sent the original direction
            _add(out, first, conntrack._text(orig_dst), (d_oby, d_opk, d_rby, d_rpk, 0 if key in previous else 1), max_peers)
        if second is not None and second != first:  # it answers it: the client is the original source
            _add(out, second, conntrack._text(orig_src), (d_rby, d_rpk, d_oby, d_opk, 0 if key in previous else 1), max_peers)
    return out, seen, untracked


def _add(out: dict[str, dict[str, Totals]], owner: str, peer: str, values: tuple[int, ...], max_peers: int) -> None:
    peers = out.setdefault(owner, {})
    entry = peers.get(peer)
    if entry is None:
        if len(peers) >= max_peers:
            peer = OTHER
            entry = peers.get(peer)
        if entry is None:
            entry = peers[peer] = [0, 0, 0, 0, 0]
    for i, v in enumerate(values):
        entry[i] += v


def top(buckets: list[dict[str, Totals]], max_peers: int) -> list[dict[str, Any]]:
    """The peers of one container summed over ``buckets``, most bytes first (at most ``max_peers``)."""
    summed: dict[str, Totals] = {}
    for bucket in buckets:
        for peer, values in bucket.items():
            entry = summed.setdefault(peer, [0, 0, 0, 0, 0])
            for i, v in enumerate(values):
                entry[i] += v
    ranked = sorted(summed.items(), key=lambda kv: (-(kv[1][0] + kv[1][2]), kv[0]))[:max_peers]
    return [
        {"peer": peer, "bytes_out": v[0], "packets_out": v[1], "bytes_in": v[2], "packets_in": v[3], "new_flows": v[4], "bytes": v[0] + v[2]}
        for peer, v in ranked
    ]


class TalkerTracker:
    """Keeps a minute of per-peer growth per container from conntrack accounting."""

    def __init__(self, config: Callable[[], TalkersConfig], registry: ContainerRegistry, supervisor: TaskSupervisor, proc_root: Path = Path("/proc")) -> None:
        self.config = config
        self.registry = registry
        self.supervisor = supervisor
        self.proc_root = proc_root
        self.error = "not started"
        self.passes = 0
        self.pass_seconds = 0.0
        self.untracked = 0
        self.buckets: deque[tuple[float, dict[str, dict[str, Totals]]]] = deque()
        self._previous: dict[tuple, tuple[int, int, int, int]] | None = None
        self._reader = ConntrackReader(proc_root)
        self._executor = worker_threads("nstap-talkers")
        self._logged = Once()

    def _acct_path(self) -> Path:
        return self.proc_root / "sys/net/netfilter/nf_conntrack_acct"

    def start(self) -> None:
        """Check (or, with consent, turn on) conntrack accounting, and run the passes."""
        path = self._acct_path()
        try:
            on = path.read_text().strip() == "1"
        except OSError as exc:
            self.error = f"conntrack accounting unavailable: {exc.strerror or exc} ({path})"
            log.warning("talkers_unavailable", error=self.error, fix="modprobe nf_conntrack")
            return
        if not on:
            if not self.config().conntrack_acct:
                self.error = "nf_conntrack_acct is off: set nat.talkers.conntrack_acct: true to let nstap turn it on (16 bytes per conntrack entry)"
                log.info("talkers_off", reason=self.error)
                return
            try:
                path.write_text("1\n")
            except OSError as exc:
                self.error = f"cannot turn on nf_conntrack_acct: {exc.strerror or exc}"
                log.warning("talkers_unavailable", error=self.error)
                return
            log.warning("conntrack_acct_enabled", path=str(path), reason="nat.talkers.conntrack_acct: true", note="counts connections created from now on")
        self.error = ""
        self.supervisor.service("talkers", self._run)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            cfg = self.config()
            owners = self._owners()
            previous = self._previous
            try:
                growth, seen, untracked, cost = await loop.run_in_executor(self._executor, self._pass, owners, previous, cfg)
            except OSError as exc:
                if self._logged.first(str(exc)):
                    log.warning("talkers_pass_failed", error=str(exc))
                await asyncio.sleep(cfg.interval)
                continue
            now = time.time()
            self._previous, self.untracked, self.pass_seconds = seen, untracked, cost
            self.passes += 1
            if previous is not None:
                self.buckets.append((now, growth))
            while self.buckets and self.buckets[0][0] < now - WINDOW:
                self.buckets.popleft()
            await asyncio.sleep(max(cfg.interval, cost / BUDGET))

    def _pass(self, owners: Mapping[bytes, str], previous: Any, cfg: TalkersConfig) -> tuple[Any, Any, int, float]:
        started = time.thread_time()
        growth, seen, untracked = tally(counted_flows(self._reader), owners, previous, cfg.max_flows, cfg.max_peers)
        return growth, seen, untracked, time.thread_time() - started

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

    def talkers_json(self, record: ContainerRecord) -> dict[str, Any]:
        """A container's top talkers over the last minute."""
        ns = self.registry.namespaces().get(record.netns)
        owner = ns.owner.id if ns is not None else record.id
        now = time.time()
        mine = [b.get(owner, {}) for at, b in self.buckets if at >= now - WINDOW]
        covered = (now - self.buckets[0][0] + self.config().interval) if self.buckets else 0.0
        return {
            "container": record.name, "container_id": record.short_id, "runtime": record.runtime,
            "source": "conntrack", "window_seconds": round(min(WINDOW, covered), 1), "error": self.error,
            "peers": top(mine, self.config().max_peers),
            "note": "growth of conntrack's counters between passes: flows that ended between two passes miss their last interval",
            "untracked_flows": self.untracked,
        }

    def close(self) -> None:
        """Stop the pass thread and close the conntrack socket."""
        self._executor.submit(self._reader.close)
        self._executor.shutdown(wait=True)
