"""Every namespace's protocol counters and sockets in use in one pass over the kernel's list of namespaces, once a round.

The protocols sampler's numbers (:data:`nstap.samplers.protocols.PROTOCOL_COUNTERS`) are the
kernel's per-CPU MIB counters of each namespace (``net->mib``). ``/proc/net/snmp`` and
``/proc/net/netstat`` print them whole as text at every read: some 300 numbers through
``vsnprintf`` per namespace per sample, which was a quarter of the event loop thread's CPU beside
200 containers (``perf record -e cpu-clock``, 2026-12-07: ``netstat_seq_show`` 17 %,
``snmp_seq_show`` 8.5 %), for the 28 nstap exports.

Here a raw-tracepoint program run by the daemon with ``BPF_PROG_TEST_RUN`` (under the RCU read
lock) walks the kernel's list of network namespaces from the daemon's own, the initial one, and
writes a batch of records per run (up to BATCH, fewer on hosts of many CPUs) into a
memory-mapped array: each namespace's inode and the 28 counters, each summed over every possible
CPU as the kernel sums them for the files; and the sockets sampler's numbers of ``sockstat`` and
``sockstat6``: the sockets in use per protocol (``net->core.prot_inuse``, per-CPU slots summed as
``sock_prot_inuse_get`` sums them) and TCP's TIME_WAIT count (``tw_refcount - 1``). A run that stops at its batch hands back the list node
it stopped at, and the next run goes on from there if that node is still linked (LOST otherwise:
the pass ends there, and the namespaces after it read their files this round). A pass is one
system call per batch of namespaces, no copy, no text.

What the program needs that bcc's headers cannot give (they need not match the running kernel):
the struct offsets and the counters' enum values come from the kernel's BTF, and each CPU's
per-CPU base from the kernel itself at load (a per-CPU array map's value address on that CPU less
its ``__percpu`` pointer, in a raw tracepoint program run on each CPU with ``BPF_PROG_TEST_RUN``).
Which slot of ``prot_inuse`` is which protocol is set at run time (``proto_register``): the loader
learns it in a thread of a network namespace of its own, from how many sockets of each kind it
opens there (:func:`slots_of`). Before it is handed over the loader checks the pass against its
own namespace's files (each counter of the files between the same counter in a pass before and a
pass after), and the sockets against the learning namespace's ``sockstat`` files (number for
number; if that fails, only the sockets are left out). The protocols and sockets samplers read
the files whenever the pass is not there for their namespace this round. The daemon
never imports bcc: the loader hands over the walk program's and the array's descriptors. x86_64
only (the ``bpf()`` system call's number, the kernel image's address range).
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

from .btf import Btf, BtfError

# The counters' places: (section, field) of PROTOCOL_COUNTERS -> (netns_mib member, enum name).
MIB_FIELDS: dict[tuple[str, str], tuple[str, str]] = {
    ("Ip", "InHdrErrors"): ("ip_statistics", "IPSTATS_MIB_INHDRERRORS"),
    ("Ip", "InAddrErrors"): ("ip_statistics", "IPSTATS_MIB_INADDRERRORS"),
    ("Ip", "InDiscards"): ("ip_statistics", "IPSTATS_MIB_INDISCARDS"),
    ("Ip", "OutDiscards"): ("ip_statistics", "IPSTATS_MIB_OUTDISCARDS"),
    ("Ip", "OutNoRoutes"): ("ip_statistics", "IPSTATS_MIB_OUTNOROUTES"),
    ("Tcp", "ActiveOpens"): ("tcp_statistics", "TCP_MIB_ACTIVEOPENS"),
    ("Tcp", "PassiveOpens"): ("tcp_statistics", "TCP_MIB_PASSIVEOPENS"),
    ("Tcp", "AttemptFails"): ("tcp_statistics", "TCP_MIB_ATTEMPTFAILS"),
    ("Tcp", "EstabResets"): ("tcp_statistics", "TCP_MIB_ESTABRESETS"),
    ("Tcp", "CurrEstab"): ("tcp_statistics", "TCP_MIB_CURRESTAB"),
    ("Tcp", "InSegs"): ("tcp_statistics", "TCP_MIB_INSEGS"),
    ("Tcp", "OutSegs"): ("tcp_statistics", "TCP_MIB_OUTSEGS"),
    ("Tcp", "RetransSegs"): ("tcp_statistics", "TCP_MIB_RETRANSSEGS"),
    ("Tcp", "InErrs"): ("tcp_statistics", "TCP_MIB_INERRS"),
    ("Tcp", "OutRsts"): ("tcp_statistics", "TCP_MIB_OUTRSTS"),
    ("Udp", "InDatagrams"): ("udp_statistics", "UDP_MIB_INDATAGRAMS"),
    ("Udp", "OutDatagrams"): ("udp_statistics", "UDP_MIB_OUTDATAGRAMS"),
    ("Udp", "NoPorts"): ("udp_statistics", "UDP_MIB_NOPORTS"),
    ("Udp", "InErrors"): ("udp_statistics", "UDP_MIB_INERRORS"),
    ("Udp", "RcvbufErrors"): ("udp_statistics", "UDP_MIB_RCVBUFERRORS"),
    ("Udp", "SndbufErrors"): ("udp_statistics", "UDP_MIB_SNDBUFERRORS"),
    ("TcpExt", "ListenOverflows"): ("net_statistics", "LINUX_MIB_LISTENOVERFLOWS"),
    ("TcpExt", "ListenDrops"): ("net_statistics", "LINUX_MIB_LISTENDROPS"),
    ("TcpExt", "TCPBacklogDrop"): ("net_statistics", "LINUX_MIB_TCPBACKLOGDROP"),
    ("TcpExt", "TCPTimeouts"): ("net_statistics", "LINUX_MIB_TCPTIMEOUTS"),
    ("TcpExt", "TCPSynRetrans"): ("net_statistics", "LINUX_MIB_TCPSYNRETRANS"),
    ("TcpExt", "TCPAbortOnTimeout"): ("net_statistics", "LINUX_MIB_TCPABORTONTIMEOUT"),
    ("TcpExt", "TCPRcvQDrop"): ("net_statistics", "LINUX_MIB_TCPRCVQDROP"),
}
# The sockets in use the sockets sampler reads from sockstat and sockstat6, by protocol: nstap's
# name (nstap.samplers.sockets.SOCKSTAT_WANTED) and a socket of that protocol, to learn its slot.
SOCKET_KINDS: tuple[tuple[str, int, int, int], ...] = (
    ("tcp", socket.AF_INET, socket.SOCK_STREAM, 0), ("udp", socket.AF_INET, socket.SOCK_DGRAM, 0),
    ("raw", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP), ("tcp6", socket.AF_INET6, socket.SOCK_STREAM, 0),
    ("udp6", socket.AF_INET6, socket.SOCK_DGRAM, 0), ("raw6", socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6),
)
SOCKET_KEYS = (*(kind[0] for kind in SOCKET_KINDS), "time_wait")  # a record's socket values, in order
LEARN_COUNTS = (3, 5, 7, 9, 11, 13)  # sockets of each kind opened to learn its slot: a count no other moves by
CLONE_NEWNET = 0x40000000
SPAN_WORDS = 16  # counters of one MIB read together (one probe read per CPU), at most
BATCH = 64  # namespaces one run of the walk writes at most (the verifier follows every turn of its loops: its cost grows with it)
BATCH_CPUS = 128  # ... and fewer on a host of many CPUs: batch * CPUs at most this (64 on this 2-CPU VM, 2 on 64 CPUs)
MAX_NAMESPACES = 16384  # namespaces one pass reads at most
DONE, MORE, LOST, NOT_INITIAL = 1, 2, 3, 4  # how a run ended: the list's end, BATCH written, its start unlinked, not in init_net
KERNEL_IMAGE = 0xFFFFFFFF80000000  # x86_64: the kernel's image (init_net, net_namespace_list) is mapped from here
POSSIBLE = Path("/sys/devices/system/cpu/possible")
ONLINE = Path("/sys/devices/system/cpu/online")

PROGRAM = r"""
struct rec { u32 inum; u32 pad; u64 v[NV]; s64 s[NSOCK + 1]; };
struct out { u64 next; u32 n; u32 status; struct rec r[BATCH]; };
struct cpu_bases { u64 b[NCPU]; u32 inuse[NSOCK]; };
struct scratch { s32 v[INUSE_SLOTS]; u64 span[SPAN_WORDS]; };
struct inuse_sums { u64 inum; s64 v[INUSE_SLOTS]; };
BPF_PERCPU_ARRAY(probe, u64, 1);
BPF_ARRAY_OF_MAPS(probe_map, "probe", 1);
BPF_ARRAY(bases, struct cpu_bases, 1);  /* in a map, not on the stack: 512 bytes hold 64 CPUs' */
BPF_ARRAY(scratch, struct scratch, 1);  /* one CPU's sockets in use in every protocol slot, one CPU's counters of a MIB */
BPF_ARRAY(inuse_sums, struct inuse_sums, 1);
BPF_F_TABLE("array", int, struct out, records, 1, 1024 /* BPF_F_MMAPABLE */);

/* Run on each CPU (BPF_PROG_TEST_RUN): that CPU's per-CPU base, the address of the probe map's
   value there less the map's __percpu pointer. The map comes as a pointer from the map of maps;
   reading its struct (and turning the value's address into a number) needs root's pointer leaks. */
int learn_base(void *ctx) {
  int zero = 0;
  void *m = probe_map.lookup(&zero);
  if (!m) return 1;
  u64 head[ARRAY_WORDS] = {};
  bpf_probe_read_kernel(head, sizeof(head), m);
  u64 pptr = head[ARRAY_WORDS - 1];
  u64 *value = bpf_map_lookup_elem(m, &zero);
  if (!value || !pptr) return 2;
  void *vp = value;
  u64 addr = 0;
  bpf_probe_read_kernel(&addr, sizeof(addr), &vp);
  u32 cpu = bpf_get_smp_processor_id();
  struct cpu_bases *all = bases.lookup(&zero);
  if (!all || cpu >= NCPU) return 3;
  all->b[cpu] = addr - pptr;
  return 0;
}

/* Run by the loader in a thread of a namespace of its own (BPF_PROG_TEST_RUN): that namespace's
   sockets in use in every protocol slot (net->core.prot_inuse), summed over every CPU. Which slot
   is which protocol is set at run time (proto_register): the loader learns it from sockets it
   opens there (slots_of). */
int learn_inuse(void *ctx) {
  int zero = 0;
  struct cpu_bases *bp = bases.lookup(&zero);
  struct scratch *sc = scratch.lookup(&zero);
  struct inuse_sums *sums = inuse_sums.lookup(&zero);
  if (!bp || !sc || !sums) return 1;
  void *task = (void *)bpf_get_current_task();
  u64 nsproxy = 0, net = 0, prot = 0;
  bpf_probe_read_kernel(&nsproxy, 8, (char *)task + TASK_NSPROXY);
  if (nsproxy)
    bpf_probe_read_kernel(&net, 8, (char *)nsproxy + NSPROXY_NET);
  if (!net) return 2;
  bpf_probe_read_kernel(&prot, 8, (char *)net + NET_PROT_INUSE);
  if (!prot) return 3;
  u32 inum = 0;
  bpf_probe_read_kernel(&inum, 4, (char *)net + NET_INUM);
  sums->inum = inum;
  for (int j = 0; j < INUSE_SLOTS; j++)
    sums->v[j] = 0;
  for (int cpu = 0; cpu < NCPU; cpu++) {
    if (bpf_probe_read_kernel(sc->v, INUSE_BYTES, (void *)(prot + bp->b[cpu] + INUSE_VAL)))
      return 4;
    for (int j = 0; j < INUSE_NR; j++)
      sums->v[j] += sc->v[j];
  }
  return 0;
}

/* Run by the daemon (BPF_PROG_TEST_RUN, under the RCU read lock): the next BATCH namespaces of
   the kernel's list (net_namespace_list), from args[0] (a list node a run before stopped at), or
   from the caller's own namespace, which must be the initial one: it is first in the list, and
   the list's head, the one node that is not in a struct net, is then the only other node in the
   kernel's image (where init_net and the head are; every other namespace is allocated). A node
   handed back that is no longer linked (its namespace went in between) stops the pass: LOST. */
int walk(struct bpf_raw_tracepoint_args *ctx) {
  int zero = 0;
  struct out *o = records.lookup(&zero);
  if (!o) return 1;
  o->n = 0;
  o->next = 0;
  u64 node = ctx->args[0];
  if (!node) {
    void *task = (void *)bpf_get_current_task();
    u64 nsproxy = 0, net = 0;
    bpf_probe_read_kernel(&nsproxy, 8, (char *)task + TASK_NSPROXY);
    if (nsproxy)
      bpf_probe_read_kernel(&net, 8, (char *)nsproxy + NSPROXY_NET);
    node = net + NET_LIST;
    if (!net || node < KERNEL_IMAGE) {
      o->status = NOT_INITIAL;
      return 0;
    }
  } else {
    u64 prev = 0, prev_next = 0;
    bpf_probe_read_kernel(&prev, 8, (void *)(node + 8));
    bpf_probe_read_kernel(&prev_next, 8, (void *)prev);
    if (prev_next != node) {
      o->status = LOST;
      return 0;
    }
  }
  struct cpu_bases *bp = bases.lookup(&zero);
  struct scratch *sc = scratch.lookup(&zero);
  if (!bp || !sc) return 1;
  u64 next, prot;
  s32 tw;
  /* One namespace a turn, BATCH turns at most. A loop, not the turns written out: with the
     sockets' reads, BATCH bodies put the walk's jumps out of a jump's range. */
#pragma clang loop unroll(disable)
  for (int i = 0; i < BATCH; i++) {
    struct rec *r = &o->r[i];
    u64 net = node - NET_LIST;
    r->inum = 0;
    bpf_probe_read_kernel(&r->inum, 4, (char *)net + NET_INUM);
    READ_NS
    o->n = i + 1;
    next = 0;
    bpf_probe_read_kernel(&next, 8, (void *)node);
    if (!next || next >= KERNEL_IMAGE) {
      o->status = DONE;
      return 0;
    }
    node = next;
  }
  o->next = node;
  o->status = MORE;
  return 0;
}
"""


class MibUnavailable(Exception):
    """The pass cannot run here, or disagreed with the files; the message says why."""


def batch_for(ncpu: int) -> int:
    """Namespaces one run writes on a host of ``ncpu`` CPUs: each costs a read per CPU and MIB."""
    return max(1, min(BATCH, BATCH_CPUS // ncpu))


def _clusters(wanted: list[tuple[int, int]]) -> list[tuple[int, list[tuple[int, int]]]]:
    """(enum value, slot)s sorted by value, cut into runs of at most SPAN_WORDS words: one read each."""
    out: list[tuple[int, list[tuple[int, int]]]] = []
    for index, slot in wanted:
        if out and index - out[-1][0] < SPAN_WORDS:
            out[-1][1].append((index, slot))
        else:
            out.append((index, [(index, slot)]))
    return out


def possible_cpus(possible: Path = POSSIBLE, online: Path = ONLINE) -> int:
    """How many CPUs the kernel sums over (``0-N``); MibUnavailable unless every one is online
    (the base of an offline CPU cannot be learnt by running on it)."""
    text = possible.read_text().strip()
    if text != online.read_text().strip():
        raise MibUnavailable(f"CPUs {text} are possible but only {online.read_text().strip()} online")
    first, _, last = text.partition("-")
    if first != "0":
        raise MibUnavailable(f"possible CPUs {text!r} do not start at 0")
    return int(last or first) + 1


def program_text(btf: Btf, keys: list[tuple[str, str]], ncpu: int) -> str:
    """The program's C source for this kernel: offsets and enum values from BTF."""
    enums = btf.enums
    try:
        mib = btf.path("net", "mib")
        defines = {
            "NV": len(keys), "NCPU": ncpu, "SPAN_WORDS": SPAN_WORDS, "BATCH": batch_for(ncpu), "DONE": DONE, "MORE": MORE, "LOST": LOST,
            "NOT_INITIAL": NOT_INITIAL,
            "KERNEL_IMAGE": f"{KERNEL_IMAGE:#x}ULL", "NET_LIST": btf.path("net", "list"),
            "TASK_NSPROXY": btf.path("task_struct", "nsproxy"), "NSPROXY_NET": btf.path("nsproxy", "net_ns"),
            "NET_INUM": btf.path("net", "ns", "inum"), "ARRAY_WORDS": btf.path("bpf_array", "pptrs") // 8 + 1,
            "NSOCK": len(SOCKET_KINDS), "NET_PROT_INUSE": btf.path("net", "core", "prot_inuse"), "INUSE_VAL": btf.path("prot_inuse", "val"),
            "NET_TW": btf.path("net", "ipv4", "tcp_death_row", "tw_refcount"),
        }
        slots = btf.array_length("prot_inuse", "val")
        width = 1 << max(slots - 1, 0).bit_length()  # a power of two: a slot masked with width - 1 stays in the array
        defines.update({"INUSE_NR": slots, "INUSE_SLOTS": width, "INUSE_MASK": width - 1, "INUSE_BYTES": slots * 4})
        groups: dict[str, list[tuple[int, int]]] = {}  # mib member -> (enum value, record slot)
        for n, key in enumerate(keys):
            member, enum = MIB_FIELDS[key]
            if enum not in enums:
                raise MibUnavailable(f"this kernel has no {enum}")
            groups.setdefault(member, []).append((enums[enum], n))
        # Each MIB's per-CPU pointer, then for each CPU (a loop: the program's size does not grow
        # with the host's CPUs) the counters that sit close together in one read each, and the
        # sockets in use as sockstat and sockstat6 print them (sock_prot_inuse_get: the
        # protocol's slot summed over every CPU, 0 if negative); then TCP's TIME_WAIT count
        # (tw_refcount - 1).
        reads = [f"u64 mib{m} = 0; bpf_probe_read_kernel(&mib{m}, 8, (char *)net + {mib + btf.path('netns_mib', member)});"
                 for m, member in enumerate(groups)]
        reads.extend(f"r->v[{n}] = 0;" for n in range(len(keys)))
        reads.extend(f"r->s[{k}] = 0;" for k in range(len(SOCKET_KINDS)))
        reads.append("prot = 0; bpf_probe_read_kernel(&prot, 8, (char *)net + NET_PROT_INUSE);")
        reads.append("#pragma clang loop unroll(disable)\n    for (int cpu = 0; cpu < NCPU; cpu++) { u64 base = bp->b[cpu];")
        for m, wanted in enumerate(groups.values()):
            for low, cluster in _clusters(sorted(wanted)):
                words = cluster[-1][0] - low + 1
                reads.append(f"bpf_probe_read_kernel(sc->span, {words * 8}, (void *)(mib{m} + base + {low * 8}));")
                reads.extend(f"r->v[{slot}] += sc->span[{index - low}];" for index, slot in cluster)
        reads.append("if (prot) { bpf_probe_read_kernel(sc->v, INUSE_BYTES, (void *)(prot + base + INUSE_VAL));")
        reads.extend(f"r->s[{k}] += sc->v[bp->inuse[{k}] & INUSE_MASK];" for k in range(len(SOCKET_KINDS)))
        reads.append("} }")
        reads.extend(f"if (r->s[{k}] < 0) r->s[{k}] = 0;" for k in range(len(SOCKET_KINDS)))
        reads.append(f"tw = 0; bpf_probe_read_kernel(&tw, 4, (char *)net + NET_TW); r->s[{len(SOCKET_KINDS)}] = (s64)tw - 1;")
        one = "\n    ".join(reads)
    except (BtfError, KeyError) as exc:
        raise MibUnavailable(f"kernel BTF: {exc}") from None
    if btf.path("bpf_array", "pptrs") % 8:
        raise MibUnavailable("bpf_array.pptrs is not 8-byte aligned")
    head = "".join(f"#define {k} {v}\n" for k, v in defines.items())
    return head + PROGRAM.replace("READ_NS", one)


class _TestRun(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32), ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32), ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32), ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32), ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
    ]


OUT_HEAD = struct.Struct("=QII")  # struct out: next, n, status; then BATCH records
SYS_BPF = 321  # x86_64
BPF_PROG_TEST_RUN = 10
BPF_F_TEST_RUN_ON_CPU = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    result = _libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


class MibPass:
    """The daemon's side: one pass is runs of the walk program, ``batch`` namespaces each, each run's
    records read from the memory-mapped array it wrote."""

    def __init__(self, prog_fd: int, records_fd: int, keys: tuple[str, ...], batch: int, socket_keys: tuple[str, ...] = ()) -> None:
        self.prog_fd = prog_fd
        self.batch = batch  # records one run writes at most (batch_for the loader's CPUs)
        self.records_fd = records_fd
        self.keys = keys  # nstap's names of the record's counters, in order
        # SOCKET_KEYS if the loader learnt the protocols' slots, else () and the socket values are not read
        self.socket_keys = socket_keys
        self._record = struct.Struct(f"=II{len(keys)}Q{len(SOCKET_KEYS)}q")
        size = OUT_HEAD.size + batch * self._record.size
        self._map = mmap.mmap(records_fd, size + (-size) % mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ)
        os.close(records_fd)  # the mapping keeps the map (and mmap keeps a descriptor of its own)
        self.records_fd = -1
        self._view = memoryview(self._map)
        self._args = (ctypes.c_uint64 * 1)()
        self._attr = _TestRun(prog_fd=prog_fd, ctx_size_in=ctypes.sizeof(self._args), ctx_in=ctypes.addressof(self._args))
        self.passes = 0
        self.cut = 0  # passes that ended before the list's end (a namespace went meanwhile, or too many)

    def read(self) -> tuple[dict[int, tuple[int, ...]], dict[int, tuple[int, ...]]]:
        """Every namespace's counters now: namespace inode -> the values in :attr:`keys` order, and
        namespace inode -> its sockets in :attr:`socket_keys` order (empty without socket keys).
        A pass cut short (LOST, or MAX_NAMESPACES) has the namespaces before the cut."""
        out: dict[int, tuple[int, ...]] = {}
        sockets: dict[int, tuple[int, ...]] = {}
        record, view, attr, args = self._record, self._view, self._attr, self._args
        head = OUT_HEAD.size
        split = 2 + len(self.keys)
        with_sockets = bool(self.socket_keys)
        args[0] = 0
        for _ in range(-(-MAX_NAMESPACES // self.batch)):
            _bpf(BPF_PROG_TEST_RUN, attr)
            node, n, status = OUT_HEAD.unpack_from(view)
            if status == NOT_INITIAL:
                raise OSError(0, "the daemon is not in the initial network namespace")
            for rec in record.iter_unpack(view[head : head + n * record.size]):
                out[rec[0]] = rec[2:split]
                if with_sockets:
                    sockets[rec[0]] = rec[split:]
            if status != MORE:
                if status != DONE:
                    self.cut += 1
                break
            args[0] = node
        else:
            self.cut += 1
        self.passes += 1
        return out, sockets

    def close(self) -> None:
        if self.prog_fd >= 0:
            self._view.release()
            self._map.close()
            os.close(self.prog_fd)
            self.prog_fd = -1


# -- the loader child's side ------------------------------------------------------------------


def _files(pid: str = "self") -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for name in ("snmp", "netstat"):
        lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()
        for header, values in zip(lines[0::2], lines[1::2]):
            section = header.split(":")[0]
            for field, value in zip(header.split()[1:], values.split()[1:]):
                out[(section, field)] = int(value)
    return out


def check(mibs: MibPass, keys: list[tuple[str, str]], gauges: set[tuple[str, str]]) -> None:
    """MibUnavailable unless the pass agrees with this process's namespace's files: every counter
    of the files between the same counter in a pass before and a pass after."""
    home = os.stat("/proc/self/ns/net").st_ino
    before = mibs.read()[0].get(home)
    files = _files()
    after = mibs.read()[0].get(home)
    if before is None or after is None:
        raise MibUnavailable("the pass did not find the loader's own namespace")
    wrong = [
        f"{section} {field}: {low}..{high} read, {files.get((section, field))} in the files"
        for (section, field), low, high in zip(keys, before, after)
        if (section, field) not in gauges and not low <= files.get((section, field), -1) <= high
    ]
    if wrong:
        raise MibUnavailable("the pass disagrees with /proc/net/snmp and netstat: " + "; ".join(wrong[:4]))


def slots_of(before: list[int], after: list[int], counts: tuple[int, ...] = LEARN_COUNTS) -> list[int]:
    """The protocol slot each of ``counts`` went to, from a namespace's sockets in use in every
    slot before and after that many sockets of each kind were opened there (and nothing else): each
    count in exactly one slot, no other slot moved; MibUnavailable otherwise."""
    moved = [a - b for a, b in zip(after, before)]
    slots = []
    for kind, count in zip(SOCKET_KINDS, counts):
        where = [i for i, d in enumerate(moved) if d == count]
        if len(where) != 1:
            raise MibUnavailable(f"{count} {kind[0]} sockets opened moved {len(where)} protocol slots by {count} (slots moved: {moved})")
        slots.append(where[0])
    stray = [i for i, d in enumerate(moved) if d and i not in slots]
    if stray:
        raise MibUnavailable(f"protocol slots {stray} moved though no socket of theirs was opened")
    return slots


def sockstat_files(proc: str = "/proc/thread-self/net") -> dict[str, int]:
    """The calling thread's namespace's sockets in use and TIME_WAIT count, as its sockstat and
    sockstat6 print them, by SOCKET_KEYS name (read as the sockets sampler reads them)."""
    from ..samplers.sockets import parse_sockstat  # noqa: PLC0415 - the loader child's side only

    out: dict[str, int] = {}
    time_wait, _ = parse_sockstat(Path(proc, "sockstat").read_bytes(), out)
    parse_sockstat(Path(proc, "sockstat6").read_bytes(), out)
    out["time_wait"] = time_wait
    return out


class _SocketNamespace(threading.Thread):
    """A thread in a network namespace of its own, with LEARN_COUNTS sockets of each SOCKET_KINDS
    open (which slot each protocol's count is in: slots_of) and then a TCP connection over ``lo``
    in TIME_WAIT, and what its sockstat files say about them; it keeps them until released."""

    def __init__(self, learn_fd: int, sums: Any) -> None:
        super().__init__(name="nstap-mib-sockets", daemon=True)
        self.learn_fd = learn_fd
        self.sums = sums  # the inuse_sums map (bcc)
        self.ready = threading.Event()
        self.release = threading.Event()
        self.error: BaseException | None = None
        self.inum = 0
        self.slots: list[int] = []
        self.files: dict[str, int] = {}

    def _sums(self) -> tuple[int, list[int]]:
        run = _TestRun(prog_fd=self.learn_fd)
        _bpf(BPF_PROG_TEST_RUN, run)
        if run.retval:
            raise MibUnavailable(f"reading a namespace's sockets in use failed ({run.retval})")
        value = self.sums[ctypes.c_int(0)]
        return int(value.inum), list(value.v)

    def run(self) -> None:
        held: list[socket.socket] = []
        try:
            if _libc.unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET): " + os.strerror(ctypes.get_errno()))
            inum, before = self._sums()
            for (_name, family, kind, proto), count in zip(SOCKET_KINDS, LEARN_COUNTS):
                for _ in range(count):
                    sock = socket.socket(family, kind, proto)
                    held.append(sock)
                    if kind == socket.SOCK_STREAM:
                        sock.listen(1)  # hashed (counted in use) when it listens
                    elif kind == socket.SOCK_DGRAM:
                        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))  # ... when it binds
            _, after = self._sums()
            self.slots = slots_of(before, after)
            held.extend(_time_wait())
            self.inum, self.files = inum, sockstat_files()
        except BaseException as exc:  # noqa: BLE001 - handed to the loader, which says why the sockets are not read
            self.error = exc
        finally:
            self.ready.set()
            self.release.wait(60)
            for sock in held:
                sock.close()


def _time_wait() -> list[socket.socket]:
    """``lo`` up, and one connection over it closed by its client first: in TIME_WAIT (the
    listener is kept, and returned)."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
        flags = struct.unpack("16sh", fcntl.ioctl(ctl, siocgifflags, struct.pack("16sh", b"lo", 0)))[1]
        fcntl.ioctl(ctl, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname(), timeout=2) as client:
            server, _ = listener.accept()
            client.close()
            server.close()
    except OSError:
        listener.close()
        raise
    deadline = time.monotonic() + 2
    while sockstat_files().get("time_wait") != 1:
        if time.monotonic() > deadline:
            raise MibUnavailable("no TCP connection in TIME_WAIT in the namespace learnt from")
        time.sleep(0.01)
    return [listener]


def learn_sockets(program: Any, learn_fd: int, mibs: MibPass) -> None:
    """Learn each protocol's slot of sockets in use (in a namespace of a thread of this process),
    set the slots for the walk, and check that a pass reads what that namespace's sockstat files
    say; MibUnavailable if any of it fails (the daemon then reads the files)."""
    learner = _SocketNamespace(learn_fd, program["inuse_sums"])
    learner.start()
    try:
        if not learner.ready.wait(30):
            raise MibUnavailable("learning the protocols' slots took more than 30 s")
        if learner.error is not None:
            error = learner.error
            raise MibUnavailable(str(error) if isinstance(error, MibUnavailable) else f"learning the protocols' slots: {type(error).__name__}: {error}")
        bases = program["bases"]
        value = bases[ctypes.c_int(0)]
        for k, slot in enumerate(learner.slots):
            value.inuse[k] = slot
        bases[ctypes.c_int(0)] = value
        read = mibs.read()[1].get(learner.inum)
        want = tuple(learner.files.get(key, -1) for key in SOCKET_KEYS)
        if read != want:
            raise MibUnavailable(f"the pass read sockets {dict(zip(SOCKET_KEYS, read or ()))}, sockstat says {learner.files}")
    finally:
        learner.release.set()
        learner.join(10)


def load(
    bcc: Any, btf: Btf, keys: list[tuple[str, str]], names: list[str], gauges: set[tuple[str, str]],
) -> tuple[Any, dict[str, int], int, tuple[str, ...], str]:
    """Compile and load the programs, learn each CPU's base and check a pass: (the bcc.BPF object,
    the walk program's and the records map's descriptors by name, the records a run writes, the
    socket keys and why they are empty if they are). MibUnavailable if the counters' part fails;
    the sockets' part is left out (no socket keys) if it fails alone."""
    ncpu = possible_cpus()
    try:
        program = bcc.BPF(text=program_text(btf, keys, ncpu))
        program["probe_map"][ctypes.c_int(0)] = ctypes.c_int(program["probe"].get_fd())
        learn = program.load_func("learn_base", bcc.BPF.RAW_TRACEPOINT)
        learn_inuse = program.load_func("learn_inuse", bcc.BPF.RAW_TRACEPOINT)
        walk = program.load_func("walk", bcc.BPF.RAW_TRACEPOINT)
    except MibUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - bcc raises plain Exception on a failed compile or load
        raise MibUnavailable(f"the MIB program did not compile or load: {exc}") from None
    for cpu in range(ncpu):
        run = _TestRun(prog_fd=learn.fd, flags=BPF_F_TEST_RUN_ON_CPU, cpu=cpu)
        try:
            _bpf(BPF_PROG_TEST_RUN, run)
        except OSError as exc:
            raise MibUnavailable(f"learning CPU {cpu}'s per-CPU base: {exc.strerror}") from None
        if run.retval:
            raise MibUnavailable(f"learning CPU {cpu}'s per-CPU base failed ({run.retval})")
    fds = {"prog:mibs": os.dup(walk.fd), "map:mib_records": os.dup(program["records"].get_fd())}
    try:
        mibs = MibPass(os.dup(fds["prog:mibs"]), os.dup(fds["map:mib_records"]), tuple(names), batch_for(ncpu), SOCKET_KEYS)
        try:
            check(mibs, keys, gauges)
            try:
                learn_sockets(program, learn_inuse.fd, mibs)
            except (MibUnavailable, OSError) as exc:
                socket_keys: tuple[str, ...] = ()
                sockets_error = str(exc)
            else:
                socket_keys, sockets_error = SOCKET_KEYS, ""
        finally:
            mibs.close()  # its own copies: those in fds are handed over
    except (MibUnavailable, OSError) as exc:
        for fd in fds.values():
            os.close(fd)
        raise MibUnavailable(str(exc)) from None
    return program, fds, batch_for(ncpu), socket_keys, sockets_error
