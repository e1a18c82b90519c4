"""Every namespace's protocol counters in one pass of a BPF task iterator, once a round.

The protocols sampler's numbers (:data:`nstap.samplers.protocols.PROTOCOL_COUNTERS`) are the
kernel's per-CPU MIB counters of each namespace (``net->mib``). ``/proc/net/snmp`` and
``/proc/net/netstat`` print them whole as text at every read: some 300 numbers through
``vsnprintf`` per namespace per sample, which was a quarter of the event loop thread's CPU beside
200 containers (``perf record -e cpu-clock``, 2026-12-07: ``netstat_seq_show`` 17 %,
``snmp_seq_show`` 8.5 %), for the 28 nstap exports.

Here a BPF program run by a task iterator visits every task, takes its network namespace once
per pass (an LRU map of the namespaces seen, stamped with the pass's session id) and writes one
binary record per namespace: its inode and the 28 counters, each summed over every possible CPU
as the kernel does for the files. One ``read()`` of the iterator's descriptor is the whole round's
protocol counters.

What the program needs that bcc's headers cannot give (they need not match the running kernel):
the struct offsets and the counters' enum values come from the kernel's BTF, and each CPU's
per-CPU base from the kernel itself at load (a per-CPU array map's value address on that CPU less
its ``__percpu`` pointer, in a raw tracepoint program run on each CPU with ``BPF_PROG_TEST_RUN``).
Before it is handed over the loader checks the pass against its own namespace's files (each
counter of the files between two passes around them): any disagreement and the daemon reads the
files, as it does for a namespace the pass missed (new since the pass) or whenever the pass is not
fresh for the round. The daemon never imports bcc: it creates the iterator with the ``bpf()``
system call on the link the loader handed over.
"""

from __future__ import annotations

import ctypes
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
SEEN_ENTRIES = 16384  # namespaces the program remembers as written in this pass (LRU)
MAX_RECORDS = 2 * SEEN_ENTRIES  # records one pass reads at most (more only if the LRU map thrashed)
READ_BYTES = 1 << 20
POSSIBLE = Path("/sys/devices/system/cpu/possible")
ONLINE = Path("/sys/devices/system/cpu/online")

PROGRAM = r"""
struct nstap_iter_meta { void *seq; u64 session_id; u64 seq_num; };
struct bpf_iter__task { struct nstap_iter_meta *meta; void *task; };
struct rec { u32 inum; u32 pad; u64 v[NV]; };
BPF_PERCPU_ARRAY(probe, u64, 1);
BPF_ARRAY_OF_MAPS(probe_map, "probe", 1);
BPF_ARRAY(bases, u64, NCPU);
BPF_TABLE("lru_hash", u32, u64, seen, SEEN_ENTRIES);

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
  u64 base = addr - pptr;
  bases.update(&cpu, &base);
  return 0;
}

int bpf_iter__task(struct bpf_iter__task *ctx) {
  void *task = ctx->task;
  if (!task) return 0;
  u64 nsproxy = 0, net = 0;
  u32 inum = 0, pid = 0, tgid = 0;
  bpf_probe_read_kernel(&pid, 4, (char *)task + TASK_PID);
  bpf_probe_read_kernel(&tgid, 4, (char *)task + TASK_TGID);
  if (pid != tgid) return 0;  /* a thread: its process's leader is visited too */
  bpf_probe_read_kernel(&nsproxy, 8, (char *)task + TASK_NSPROXY);
  if (!nsproxy) return 0;  /* exiting */
  bpf_probe_read_kernel(&net, 8, (char *)nsproxy + NSPROXY_NET);
  if (!net) return 0;
  bpf_probe_read_kernel(&inum, 4, (char *)net + NET_INUM);
  u64 session = ctx->meta->session_id;
  u64 *was = seen.lookup(&inum);
  if (was && *was == session) return 0;
  u64 base[NCPU];
  for (int c = 0; c < NCPU; c++) {
    int cc = c;
    u64 *b = bases.lookup(&cc);
    base[c] = b ? *b : 0;
  }
  struct rec r = {};
  r.inum = inum;
  u64 mib, x;
  READS
  /* Marked as written only once it is: a record that did not fit in the read's buffer is not
     written, and this task is visited again for the next read. */
  if (bpf_seq_write(ctx->meta->seq, &r, sizeof(r)) == 0)
    seen.update(&inum, &session);
  return 0;
}
"""


class MibUnavailable(Exception):
    """The pass cannot run here, or disagreed with the files; the message says why."""


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
            "NV": len(keys), "NCPU": ncpu, "SEEN_ENTRIES": SEEN_ENTRIES,
            "TASK_NSPROXY": btf.path("task_struct", "nsproxy"), "TASK_PID": btf.path("task_struct", "pid"),
            "TASK_TGID": btf.path("task_struct", "tgid"), "NSPROXY_NET": btf.path("nsproxy", "net_ns"),
            "NET_INUM": btf.path("net", "ns", "inum"), "ARRAY_WORDS": btf.path("bpf_array", "pptrs") // 8 + 1,
        }
        reads = []
        for n, key in enumerate(keys):
            member, enum = MIB_FIELDS[key]
            if enum not in enums:
                raise MibUnavailable(f"this kernel has no {enum}")
            where = mib + btf.path("netns_mib", member)
            reads.append(
                f"mib = 0; bpf_probe_read_kernel(&mib, 8, (char *)net + {where}); "
                f"for (int c = 0; c < NCPU; c++) {{ x = 0; bpf_probe_read_kernel(&x, 8, (void *)(mib + base[c] + {enums[enum] * 8})); r.v[{n}] += x; }}"
            )
    except (BtfError, KeyError) as exc:
        raise MibUnavailable(f"kernel BTF: {exc}") from None
    if btf.path("bpf_array", "pptrs") % 8:
        raise MibUnavailable("bpf_array.pptrs is not 8-byte aligned")
    head = "".join(f"#define {k} {v}\n" for k, v in defines.items())
    return head + PROGRAM.replace("READS", "\n  ".join(reads))


class _TestRun(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32), ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32), ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32), ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32), ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
    ]


class _IterCreate(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


SYS_BPF = 321  # x86_64
BPF_PROG_TEST_RUN = 10
BPF_ITER_CREATE = 33
BPF_F_TEST_RUN_ON_CPU = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    result = _libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


class MibPass:
    """The daemon's side: one pass is one iterator created on the link and read to its end."""

    def __init__(self, link_fd: int, keys: tuple[str, ...]) -> None:
        self.link_fd = link_fd
        self.keys = keys  # nstap's names of the record's counters, in order
        self._record = struct.Struct(f"=II{len(keys)}Q")
        self.passes = 0

    def read(self) -> dict[int, tuple[int, ...]]:
        """Every namespace's counters now: namespace inode -> the values in :attr:`keys` order."""
        fd = _bpf(BPF_ITER_CREATE, _IterCreate(self.link_fd, 0))
        chunks = []
        size = 0
        limit = MAX_RECORDS * self._record.size
        try:
            while size < limit:
                chunk = os.read(fd, READ_BYTES)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        whole = len(data) - len(data) % self._record.size
        self.passes += 1
        return {rec[0]: rec[2:] for rec in self._record.iter_unpack(data[:whole])}

    def close(self) -> None:
        if self.link_fd >= 0:
            os.close(self.link_fd)
            self.link_fd = -1


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


def load(bcc: Any, btf: Btf, keys: list[tuple[str, str]], names: list[str], gauges: set[tuple[str, str]]) -> tuple[Any, int]:
    """Compile and load the program, learn each CPU's base, attach the iterator and check a pass:
    (the bcc.BPF object, the iterator link's descriptor). MibUnavailable if any of it fails."""
    ncpu = possible_cpus()
    try:
        program = bcc.BPF(text=program_text(btf, keys, ncpu))
        program["probe_map"][ctypes.c_int(0)] = ctypes.c_int(program["probe"].get_fd())
        learn = program.load_func("learn_base", bcc.BPF.RAW_TRACEPOINT)
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
    try:
        walker = program.load_func("bpf_iter__task", bcc.BPF.TRACING)
    except Exception as exc:  # noqa: BLE001 - as above
        raise MibUnavailable(f"the task iterator did not load: {exc}") from None
    link = bcc.lib.bcc_iter_attach(walker.fd, None, 0)
    if link < 0:
        raise MibUnavailable(f"the task iterator did not attach: {os.strerror(ctypes.get_errno())}")
    try:
        check(MibPass(link, tuple(names)), keys, gauges)
    except (MibUnavailable, OSError) as exc:
        os.close(link)
        raise MibUnavailable(str(exc)) from None
    return program, link
