"""Why the kernel dropped it, per container, and to whom TCP retransmitted: one bcc program for the host.

Two tracepoints, aggregated **in the kernel** (no per-packet event reaches user space):

* ``skb:kfree_skb`` counts drops in a hash map keyed by (network namespace inode, drop reason).
  The namespace is the skb's socket's (``sk->__sk_common.skc_net``) or, without a socket, its
  device's (``dev->nd_net``), read at offsets taken from the running kernel's BTF (the installed
  headers need not match it). Reason names come from the tracepoint's own format file, so a
  kernel that adds reasons needs no change here.
* ``tcp:tcp_retransmit_skb`` counts retransmissions in an LRU map keyed by (namespace, local
  port, remote address, remote port): the top flows of the last minute answer "to whom?".

The program is compiled and attached in a short-lived child (:mod:`nstap.ebpf.loader`), which
hands the perf events and maps over: the daemon never imports bcc or LLVM. It reads the drop map
once per sampling round (one batched lookup for every namespace) and the flow map every
``FLOW_EVERY`` seconds, through bpf(2) (:mod:`nstap.ebpf.maps`). Everything that can be missing
(bcc, the headers it compiles against, BTF, the tracepoints, reasons on kernels before 5.17,
privileges) raises :class:`EbpfUnavailable` with what is missing and the fix.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import btf as btf_mod
from .maps import BpfMap

if TYPE_CHECKING:
    from .loader import Handover

TRACING = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
MAX_DROP_KEYS = 16384  # (namespace, reason) pairs
MAX_FLOWS = 4096  # retransmitting flows kept (least recently used go first)
FLOW_EVERY = 10.0  # seconds between reads of the flow map
FLOW_WINDOW = 60.0  # "the last minute"
TOP_FLOWS = 20
TRACEPOINTS = (("skb:kfree_skb", "on_drop"), ("tcp:tcp_retransmit_skb", "on_retransmit"))  # (tracepoint, function)
# The maps' keys and values as the program lays them out (native byte order, no padding).
DROP_KEY = struct.Struct("=II")  # netns, reason
DROP_COUNT = struct.Struct("=Q")
FLOW_KEY = struct.Struct("=IHHHH16s")  # netns, sport, dport, family, pad, daddr
FLOW_VALUE = struct.Struct("=QQ")  # count, last_ns
MAPS = {"drops": (DROP_KEY.size, DROP_COUNT.size), "retrans": (FLOW_KEY.size, FLOW_VALUE.size), "lost": (4, 8)}

_SYMBOL = re.compile(r"\{\s*(\d+),\s*\"(\w+)\"\s*\}")
_FIELD = re.compile(r"field:([^;]+);\s*offset:(\d+);\s*size:(\d+);")
# (tracepoint, field) -> the #define its offset goes to: read from the format files, not headers.
TP_FIELDS = {
    ("skb/kfree_skb", "skbaddr"): "TP_DROP_SKBADDR",
    ("skb/kfree_skb", "reason"): "TP_DROP_REASON",
    ("tcp/tcp_retransmit_skb", "skaddr"): "TP_RETR_SKADDR",
    ("tcp/tcp_retransmit_skb", "sport"): "TP_RETR_SPORT",
    ("tcp/tcp_retransmit_skb", "dport"): "TP_RETR_DPORT",
    ("tcp/tcp_retransmit_skb", "family"): "TP_RETR_FAMILY",
    ("tcp/tcp_retransmit_skb", "daddr"): "TP_RETR_DADDR",
    ("tcp/tcp_retransmit_skb", "daddr_v6"): "TP_RETR_DADDR_V6",
}

PROGRAM = r"""
#include <uapi/linux/ptrace.h>
#include <linux/socket.h>

struct drop_key { u32 netns; u32 reason; };
BPF_HASH(drops, struct drop_key, u64, MAX_DROP_KEYS);
BPF_ARRAY(lost, u64, 1);  /* drops not counted because the drops map was full */

struct flow_key { u32 netns; u16 sport; u16 dport; u16 family; u16 pad; u8 daddr[16]; };
struct flow_val { u64 count; u64 last_ns; };
BPF_TABLE("lru_hash", struct flow_key, struct flow_val, retrans, MAX_FLOWS);

static __always_inline u32 net_inum(void *net) {
    u32 inum = 0;
    if (net)
        bpf_probe_read_kernel(&inum, sizeof(inum), net + NET_INUM);
    return inum;
}

static __always_inline void *sock_net_of(void *sk) {
    void *net = NULL;
    if (sk)
        bpf_probe_read_kernel(&net, sizeof(net), sk + SK_NET);
    return net;
}

int on_drop(void *ctx) {
    struct drop_key key = {};
    void *skb = *(void **)((char *)ctx + TP_DROP_SKBADDR);
    void *sk = NULL, *dev = NULL, *net = NULL;
    key.reason = *(u32 *)((char *)ctx + TP_DROP_REASON);
    bpf_probe_read_kernel(&sk, sizeof(sk), skb + SKB_SK);
    net = sock_net_of(sk);
    if (!net) {
        bpf_probe_read_kernel(&dev, sizeof(dev), skb + SKB_DEV);
        if (dev)
            bpf_probe_read_kernel(&net, sizeof(net), dev + DEV_NET);
    }
    key.netns = net_inum(net);
    u64 zero = 0;
    u64 *count = drops.lookup_or_try_init(&key, &zero);
    if (count) {
        __sync_fetch_and_add(count, 1);
    } else {
        int first = 0;
        u64 *missed = lost.lookup(&first);
        if (missed)
            __sync_fetch_and_add(missed, 1);
    }
    return 0;
}

int on_retransmit(void *ctx) {
    struct flow_key key = {};
    void *sk = *(void **)((char *)ctx + TP_RETR_SKADDR);
    key.netns = net_inum(sock_net_of(sk));
    key.sport = *(u16 *)((char *)ctx + TP_RETR_SPORT);
    key.dport = *(u16 *)((char *)ctx + TP_RETR_DPORT);
    key.family = *(u16 *)((char *)ctx + TP_RETR_FAMILY);
    if (key.family == AF_INET)
        bpf_probe_read_kernel(key.daddr, 4, (char *)ctx + TP_RETR_DADDR);
    else
        bpf_probe_read_kernel(key.daddr, 16, (char *)ctx + TP_RETR_DADDR_V6);
    struct flow_val zero = {};
    struct flow_val *value = retrans.lookup_or_try_init(&key, &zero);
    if (value) {
        __sync_fetch_and_add(&value->count, 1);
        value->last_ns = bpf_ktime_get_ns();
    }
    return 0;
}
"""


class EbpfUnavailable(Exception):
    """What the collector needs is missing; the message names it and the fix."""


@dataclass(frozen=True)
class Flow:
    """A flow that retransmitted: in which namespace, to whom, how often in the window."""

    netns: int
    local_port: int
    remote: str
    remote_port: int
    retransmits: int
    last_seen: float

    def to_json(self) -> dict[str, Any]:
        """The flow as the API and the evidence list it."""
        return {"local_port": self.local_port, "remote": self.remote, "remote_port": self.remote_port,
                "retransmits": self.retransmits, "last_seen": round(self.last_seen, 3)}


def tracing_dir() -> Path | None:
    """Where tracefs is mounted, if anywhere."""
    for path in TRACING:
        if (path / "events").is_dir():
            return path
    return None


def reason_names(tracing: Path) -> dict[int, str]:
    """The running kernel's drop reasons, from the kfree_skb tracepoint's format file."""
    fmt = tracing / "events/skb/kfree_skb/format"
    try:
        text = fmt.read_text()
    except OSError as exc:
        raise EbpfUnavailable(f"cannot read {fmt} ({exc.strerror or exc}): mount tracefs (mount -t tracefs nodev /sys/kernel/tracing)") from None
    if "field:enum skb_drop_reason reason" not in text:
        raise EbpfUnavailable("this kernel's kfree_skb tracepoint has no drop reason (Linux 5.17 or later has it)")
    start = text.find("__print_symbolic(REC->reason")
    names = {int(n): name for n, name in _SYMBOL.findall(text[start:])} if start >= 0 else {}
    if not names:
        raise EbpfUnavailable(f"no reason names in {fmt}")
    return names


def field_offsets(tracing: Path) -> dict[str, int]:
    """The offsets of the tracepoint fields the program reads, from their format files."""
    out: dict[str, int] = {}
    for event in sorted({e for e, _ in TP_FIELDS}):
        fmt = tracing / "events" / event / "format"
        try:
            text = fmt.read_text()
        except OSError as exc:
            raise EbpfUnavailable(f"cannot read {fmt}: {exc.strerror or exc}") from None
        fields = {}
        for decl, offset, _size in _FIELD.findall(text):
            name = decl.split("[")[0].split()[-1].lstrip("*")
            fields[name] = int(offset)
        for (ev, name), define in TP_FIELDS.items():
            if ev != event:
                continue
            if name not in fields:
                raise EbpfUnavailable(f"the {event} tracepoint has no field {name!r} on this kernel")
            out[define] = fields[name]
    return out


def need_root() -> str:
    """Loading eBPF needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN)."""
    if os.geteuid() != 0:
        raise EbpfUnavailable("not running as root: loading eBPF needs CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN (or root)")
    return "root"


def need_bcc() -> Any:
    """The bcc module."""
    try:
        import bcc  # noqa: PLC0415 - optional: only this collector needs it
    except ImportError as exc:
        raise EbpfUnavailable(f"bcc is not importable ({exc}): apt-get install python3-bpfcc, and link it into nstap's venv (make run does both)") from None
    return bcc


def need_headers() -> str:
    """The kernel headers bcc compiles against."""
    release = os.uname().release
    build = Path("/lib/modules") / release / "build"
    if not build.exists():
        raise EbpfUnavailable(f"{build} is missing: bcc compiles against kernel headers; install linux-headers-{release} or link a linux-headers tree there (make run does)")
    return str(build.resolve())


def need_tracepoints() -> Path:
    """tracefs, with the two tracepoints the program attaches to."""
    tracing = tracing_dir()
    if tracing is None:
        raise EbpfUnavailable("tracefs is not mounted: mount -t tracefs nodev /sys/kernel/tracing")
    for event in ("skb/kfree_skb", "tcp/tcp_retransmit_skb"):
        if not (tracing / "events" / event).is_dir():
            raise EbpfUnavailable(f"the kernel has no {event} tracepoint")
    return tracing


def need_btf() -> btf_mod.Btf:
    """The running kernel's BTF."""
    try:
        return btf_mod.load()
    except btf_mod.BtfError as exc:
        raise EbpfUnavailable(f"kernel BTF: {exc}") from None


def need_offsets(btf: btf_mod.Btf | None = None) -> btf_mod.Offsets:
    """The struct offsets, from the running kernel's BTF."""
    try:
        return btf_mod.offsets(btf or need_btf())
    except btf_mod.BtfError as exc:
        raise EbpfUnavailable(f"kernel BTF: {exc}") from None


def program_text(tracing: Path, off: btf_mod.Offsets) -> str:
    """The program's C source, with the offsets of this kernel defined in front."""
    defines = {
        "MAX_DROP_KEYS": MAX_DROP_KEYS, "MAX_FLOWS": MAX_FLOWS, "SKB_DEV": off.skb_dev, "SKB_SK": off.skb_sk,
        "DEV_NET": off.dev_net, "SK_NET": off.sk_net, "NET_INUM": off.net_inum,
    }
    defines.update(field_offsets(tracing))
    return "".join(f"#define {k} {v}\n" for k, v in defines.items()) + PROGRAM


def check_prerequisites() -> tuple[Any, Path, btf_mod.Btf]:
    """(the bcc module, tracefs, the kernel's BTF), or EbpfUnavailable naming the first thing missing."""
    need_root()
    bcc = need_bcc()
    need_headers()
    tracing = need_tracepoints()
    reason_names(tracing)
    btf = need_btf()
    need_offsets(btf)
    return bcc, tracing, btf


class DropCollector:
    """The attached program, held by descriptors the loader child handed over, and what was last
    read from its maps."""

    def __init__(self) -> None:
        self.reasons: dict[int, str] = {}
        self.compile_seconds = 0.0
        self.loader_pid = 0
        self.loader_peak_rss_kib = 0
        self.counts: dict[int, dict[str, int]] = {}  # netns inode -> reason name -> drops so far
        self.read_at = 0.0
        self.read_errors = 0
        self.drops: BpfMap | None = None
        self.retrans: BpfMap | None = None
        self.lost_map: BpfMap | None = None
        self.lost = 0  # drops the program could not count: its drops map was full
        # The drop map as last read (keys, values end to end), its keys unpacked, its counts, and
        # what was made of them: see read().
        self._raw: tuple[bytes, bytes] = (b"", b"")
        self._keys: list[tuple[int, str]] = []
        self._values: list[int] = []
        self._parsed: dict[int, dict[str, int]] = {}
        self._perf_fds: list[int] = []  # the attachments: closing the last descriptor detaches
        self._flow_history: deque[tuple[float, dict[tuple, int]]] = deque()
        self._flows_at = 0.0
        self._flows: dict[tuple, tuple[int, float]] = {}
        self._boot_offset = 0.0

    def take(self, handover: Handover) -> None:
        """Own what the loader handed over (every descriptor: on failure they are closed):
        EbpfUnavailable if it is not the program's."""
        report, fds = handover.report, dict(handover.fds)
        try:
            perf_fds = [fds.pop(f"perf:{tracepoint}") for tracepoint, _ in TRACEPOINTS]
            drops = BpfMap.from_fd(fds.pop("map:drops"), "drops")
            retrans = BpfMap.from_fd(fds.pop("map:retrans"), "retrans")
            lost = BpfMap.from_fd(fds.pop("map:lost"), "lost")
            for bpf_map in (drops, retrans, lost):
                if (bpf_map.key_size, bpf_map.value_size) != MAPS[bpf_map.name]:
                    raise EbpfUnavailable(f"the loader's {bpf_map.name} map has {bpf_map.key_size}-byte keys and "
                                          f"{bpf_map.value_size}-byte values, not {MAPS[bpf_map.name]}")
            reasons = {int(number): str(name) for number, name in report["reasons"].items()}
        except (KeyError, ValueError, AttributeError, OSError) as exc:
            handover.close()
            raise EbpfUnavailable(f"the eBPF loader handed over something else than expected: {type(exc).__name__}: {exc}") from None
        except EbpfUnavailable:
            handover.close()
            raise
        handover.fds = fds  # what is left was not asked for
        handover.close()
        self._perf_fds, self.drops, self.retrans, self.lost_map, self.reasons = perf_fds, drops, retrans, lost, reasons
        self._raw, self._keys, self._values, self._parsed = (b"", b""), [], [], {}
        self.compile_seconds = float(report.get("compile_seconds", 0.0))
        self.loader_pid = handover.pid
        self.loader_peak_rss_kib = int(report.get("peak_rss_kib", 0))
        # bpf_ktime_get_ns is CLOCK_MONOTONIC: wall = monotonic + this
        self._boot_offset = time.time() - time.monotonic()

    def _maps(self) -> tuple[BpfMap, BpfMap]:
        if self.drops is None or self.retrans is None:
            raise RuntimeError("the eBPF collector is not loaded")
        return self.drops, self.retrans

    def read(self) -> dict[int, dict[str, int]]:
        """One batched read of the drop map: drops so far by namespace and reason name.

        Read once a round for every namespace: most counts did not move since the last read. The
        whole read is compared with the one before first. The same bytes give the same mapping
        (the same object, and each namespace's the same object); the same keys in the same order
        (the usual case: the kernel walks the buckets in order, and no reason was new) give new
        mappings only for the namespaces one of whose counts moved, the values compared as
        integers unpacked in C. Only new keys are unpacked and named one by one.
        """
        drops, _ = self._maps()
        raw = drops.raw()
        if self.lost_map is not None:
            self.lost = sum(DROP_COUNT.unpack(value)[0] for _, value in self.lost_map.items())
        if raw != self._raw:
            keys, values = raw
            counts = memoryview(values).cast("Q").tolist() if values else []
            if keys == self._raw[0]:
                out = dict(self._parsed)
                moved: dict[int, dict[str, int]] = {}
                named = self._keys
                for i, count, was in zip(range(len(counts)), counts, self._values):
                    if count != was:
                        netns, reason = named[i]
                        reasons = moved.get(netns)
                        if reasons is None:
                            reasons = moved[netns] = out[netns] = dict(out[netns])
                        reasons[reason] = count
            else:
                names = self.reasons
                named = [(netns, names.get(reason, str(reason))) for netns, reason in DROP_KEY.iter_unpack(keys)]
                out = {}
                for (netns, reason), count in zip(named, counts):
                    out.setdefault(netns, {})[reason] = count
                self._keys = named
            self._raw, self._values, self._parsed = raw, counts, out
        self.counts = self._parsed
        self.read_at = time.time()
        return self._parsed

    def read_flows(self, now: float | None = None) -> None:
        """Read the flow map (every FLOW_EVERY seconds) and keep a minute of history."""
        _, retrans = self._maps()
        now = time.time() if now is None else now
        flows: dict[tuple, tuple[int, float]] = {}
        for key, value in retrans.items():
            netns, sport, dport, family, _pad, daddr = FLOW_KEY.unpack(key)
            count, last_ns = FLOW_VALUE.unpack(value)
            if family == socket.AF_INET:
                remote = socket.inet_ntop(socket.AF_INET, daddr[:4])
            else:
                remote = socket.inet_ntop(socket.AF_INET6, daddr)
            flows[(netns, sport, remote, dport)] = (count, last_ns / 1e9 + self._boot_offset)
        self._flows = flows
        self._flows_at = now
        self._flow_history.append((now, {k: v[0] for k, v in flows.items()}))
        while self._flow_history and now - self._flow_history[0][0] > FLOW_WINDOW + FLOW_EVERY:
            self._flow_history.popleft()

    def flows_due(self, now: float) -> bool:
        """Whether the flow map should be read again."""
        return now - self._flows_at >= FLOW_EVERY

    def top_flows(self, netns: set[int], now: float | None = None, limit: int = TOP_FLOWS) -> list[Flow]:
        """The flows of namespaces ``netns`` that retransmitted in the last minute, most first."""
        now = time.time() if now is None else now
        base: dict[tuple, int] = {}
        for at, counts in self._flow_history:
            if now - at <= FLOW_WINDOW:
                base = counts
                break
        out = []
        for key, (count, last) in self._flows.items():
            if key[0] not in netns or now - last > FLOW_WINDOW:
                continue
            grew = count - base.get(key, 0) if base.get(key, 0) <= count else count
            if grew > 0:
                out.append(Flow(key[0], key[1], key[2], key[3], grew, last))
        out.sort(key=lambda f: (-f.retransmits, -f.last_seen))
        return out[:limit]

    def flow_keys(self) -> list[tuple]:
        """The retransmitting flows' keys as last read (namespace first)."""
        return list(self._flows)

    def forget(self, netns: Collection[int]) -> int:
        """Delete every entry of namespaces ``netns`` from both maps (and from what was read):
        for namespaces no longer watched. Returns how many entries went."""
        netns = set(netns)
        gone = 0
        for bpf_map in self._maps():
            for key in bpf_map.keys():
                if DROP_KEY.unpack_from(key)[0] in netns and bpf_map.delete(key):  # both keys start with the netns
                    gone += 1
        self.counts = {inode: reasons for inode, reasons in self.counts.items() if inode not in netns}
        self._flows = {key: value for key, value in self._flows.items() if key[0] not in netns}
        for i, (at, counts) in enumerate(self._flow_history):
            self._flow_history[i] = (at, {key: value for key, value in counts.items() if key[0] not in netns})
        return gone

    def close(self) -> None:
        """Detach (close the perf events) and let the maps go."""
        for fd in self._perf_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._perf_fds = []
        for bpf_map in (self.drops, self.retrans, self.lost_map):
            if bpf_map is not None:
                with contextlib.suppress(OSError):
                    bpf_map.close()
        self.drops = self.retrans = self.lost_map = None
