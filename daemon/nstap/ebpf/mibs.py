"""Every namespace's protocol counters in one pass over the kernel's list of namespaces, once a round.

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
CPU as the kernel sums them for the files. A run that stops at its batch hands back the list node
it stopped at, and the next run goes on from there if that node is still linked (LOST otherwise:
the pass ends there, and the namespaces after it read their files this round). A pass is one
system call per batch of namespaces, no copy, no text.

What the program needs that bcc's headers cannot give (they need not match the running kernel):
the struct offsets and the counters' enum values come from the kernel's BTF, and each CPU's
per-CPU base from the kernel itself at load (a per-CPU array map's value address on that CPU less
its ``__percpu`` pointer, in a raw tracepoint program run on each CPU with ``BPF_PROG_TEST_RUN``).
Before it is handed over the loader checks the pass against its own namespace's files (each
counter of the files between the same counter in a pass before and a pass after). The protocols
sampler reads the files whenever the pass is not there for its namespace this round. The daemon
never imports bcc: the loader hands over the walk program's and the array's descriptors. x86_64
only (the ``bpf()`` system call's number, the kernel image's address range).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
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
SPAN_WORDS = 16  # counters of one MIB read together (one probe read per CPU), at most
BATCH = 64  # namespaces one run of the walk writes at most (straight-line code: the verifier's cost grows with it)
BATCH_CPUS = 128  # ... and fewer on a host of many CPUs: batch * CPUs at most this (64 on this 2-CPU VM, 2 on 64 CPUs)
MAX_NAMESPACES = 16384  # namespaces one pass reads at most
DONE, MORE, LOST, NOT_INITIAL = 1, 2, 3, 4  # how a run ended: the list's end, BATCH written, its start unlinked, not in init_net
KERNEL_IMAGE = 0xFFFFFFFF80000000  # x86_64: the kernel's image (init_net, net_namespace_list) is mapped from here
POSSIBLE = Path("/sys/devices/system/cpu/possible")
ONLINE = Path("/sys/devices/system/cpu/online")

PROGRAM = r"""
struct rec { u32 inum; u32 pad; u64 v[NV]; };
struct out { u64 next; u32 n; u32 status; struct rec r[BATCH]; };
struct cpu_bases { u64 b[NCPU]; };
BPF_PERCPU_ARRAY(probe, u64, 1);
BPF_ARRAY_OF_MAPS(probe_map, "probe", 1);
BPF_ARRAY(bases, struct cpu_bases, 1);  /* in a map, not on the stack: 512 bytes hold 64 CPUs' */
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
  if (!bp) return 1;
  u64 net, mib, next, span[SPAN_WORDS];
  struct rec *r;
  BODY
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
        }
        groups: dict[str, list[tuple[int, int]]] = {}  # mib member -> (enum value, record slot)
        for n, key in enumerate(keys):
            member, enum = MIB_FIELDS[key]
            if enum not in enums:
                raise MibUnavailable(f"this kernel has no {enum}")
            groups.setdefault(member, []).append((enums[enum], n))
        reads = []
        for member, wanted in groups.items():
            reads.append(f"mib = 0; bpf_probe_read_kernel(&mib, 8, (char *)net + {mib + btf.path('netns_mib', member)});")
            for cpu in range(ncpu):
                for low, cluster in _clusters(sorted(wanted)):
                    words = cluster[-1][0] - low + 1
                    reads.append(f"bpf_probe_read_kernel(span, {words * 8}, (void *)(mib + bp->b[{cpu}] + {low * 8}));")
                    op = "=" if cpu == 0 else "+="
                    reads.extend(f"r->v[{slot}] {op} span[{index - low}];" for index, slot in cluster)
        one = " ".join(reads)
        body = [
            f"r = &o->r[{i}]; net = node - NET_LIST; r->inum = 0; bpf_probe_read_kernel(&r->inum, 4, (char *)net + NET_INUM); {one} "
            f"o->n = {i + 1}; next = 0; bpf_probe_read_kernel(&next, 8, (void *)node); "
            f"if (!next || next >= KERNEL_IMAGE) {{ o->status = DONE; return 0; }} node = next;"
            for i in range(batch_for(ncpu))
        ]
    except (BtfError, KeyError) as exc:
        raise MibUnavailable(f"kernel BTF: {exc}") from None
    if btf.path("bpf_array", "pptrs") % 8:
        raise MibUnavailable("bpf_array.pptrs is not 8-byte aligned")
    head = "".join(f"#define {k} {v}\n" for k, v in defines.items())
    return head + PROGRAM.replace("BODY", "\n  ".join(body))


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

    def __init__(self, prog_fd: int, records_fd: int, keys: tuple[str, ...], batch: int) -> None:
        self.prog_fd = prog_fd
        self.batch = batch  # records one run writes at most (batch_for the loader's CPUs)
        self.records_fd = records_fd
        self.keys = keys  # nstap's names of the record's counters, in order
        self._record = struct.Struct(f"=II{len(keys)}Q")
        size = OUT_HEAD.size + batch * self._record.size
        self._map = mmap.mmap(records_fd, size + (-size) % mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ)
        os.close(records_fd)  # the mapping keeps the map (and mmap keeps a descriptor of its own)
        self.records_fd = -1
        self._view = memoryview(self._map)
        self._args = (ctypes.c_uint64 * 1)()
        self._attr = _TestRun(prog_fd=prog_fd, ctx_size_in=ctypes.sizeof(self._args), ctx_in=ctypes.addressof(self._args))
        self.passes = 0
        self.cut = 0  # passes that ended before the list's end (a namespace went meanwhile, or too many)

    def read(self) -> dict[int, tuple[int, ...]]:
        """Every namespace's counters now: namespace inode -> the values in :attr:`keys` order.
        A pass cut short (LOST, or MAX_NAMESPACES) has the namespaces before the cut."""
        out: dict[int, tuple[int, ...]] = {}
        record, view, attr, args = self._record, self._view, self._attr, self._args
        head = OUT_HEAD.size
        args[0] = 0
        for _ in range(-(-MAX_NAMESPACES // self.batch)):
            _bpf(BPF_PROG_TEST_RUN, attr)
            node, n, status = OUT_HEAD.unpack_from(view)
            if status == NOT_INITIAL:
                raise OSError(0, "the daemon is not in the initial network namespace")
            for rec in record.iter_unpack(view[head : head + n * record.size]):
                out[rec[0]] = rec[2:]
            if status != MORE:
                if status != DONE:
                    self.cut += 1
                break
            args[0] = node
        else:
            self.cut += 1
        self.passes += 1
        return out

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
    before = mibs.read().get(home)
    files = _files()
    after = mibs.read().get(home)
    if before is None or after is None:
        raise MibUnavailable("the pass did not find the loader's own namespace")
    wrong = [
        f"{section} {field}: {low}..{high} read, {files.get((section, field))} in the files"
        for (section, field), low, high in zip(keys, before, after)
        if (section, field) not in gauges and not low <= files.get((section, field), -1) <= high
    ]
    if wrong:
        raise MibUnavailable("the pass disagrees with /proc/net/snmp and netstat: " + "; ".join(wrong[:4]))


def load(bcc: Any, btf: Btf, keys: list[tuple[str, str]], names: list[str], gauges: set[tuple[str, str]]) -> tuple[Any, dict[str, int], int]:
    """Compile and load the programs, learn each CPU's base and check a pass: (the bcc.BPF object,
    the walk program's and the records map's descriptors by name, the records a run writes).
    MibUnavailable if any of it fails."""
    ncpu = possible_cpus()
    try:
        program = bcc.BPF(text=program_text(btf, keys, ncpu))
        program["probe_map"][ctypes.c_int(0)] = ctypes.c_int(program["probe"].get_fd())
        learn = program.load_func("learn_base", bcc.BPF.RAW_TRACEPOINT)
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
        mibs = MibPass(os.dup(fds["prog:mibs"]), os.dup(fds["map:mib_records"]), tuple(names), batch_for(ncpu))
        try:
            check(mibs, keys, gauges)
        finally:
            mibs.close()  # its own copies: those in fds are handed over
    except (MibUnavailable, OSError) as exc:
        for fd in fds.values():
            os.close(fd)
        raise MibUnavailable(str(exc)) from None
    return program, fds, batch_for(ncpu)
