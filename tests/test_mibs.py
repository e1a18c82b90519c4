"""Every namespace's protocol counters in one pass over the kernel's list of namespaces (``nstap.ebpf.mibs``).

Real kernel, real program (compiled by the real loader child), real namespaces: a namespace with
TCP traffic on its veth and 150 more with a process each (three runs of the walk, each going on
from the node the one before stopped at). The pass must read what ``/proc/<pid>/net/snmp`` and
``netstat`` say, and the sockets in use and in TIME_WAIT that ``sockstat`` and ``sockstat6`` say
(a process holding sockets of every kind in the namespace with traffic), for every one of them.
The samplers' side (the round's counters taken only when read for this round, the protocols and
sockets samplers going from the pass to the files and back) runs on the same real service and a
real namespace's handles.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from conftest import NsUnderTest, ping, wait_until
from nstap.ebpf import mibs
from nstap.ebpf.service import EbpfService
from nstap.netns.handles import NamespaceOpener
from nstap.samplers.protocols import PROTOCOL_COUNTERS, ProtocolSampler, RoundCounters
from nstap.samplers.sockets import SOCKSTAT_WANTED, SocketSampler

QUIET = 150  # namespaces with a process and no traffic: more than two runs of the walk (BATCH)


def files_of(pid: int) -> tuple[int, ...]:
    """The protocol counters of ``pid``'s namespace as its files say, in PROTOCOL_COUNTERS order."""
    found: dict[tuple[str, str], int] = {}
    for name in ("snmp", "netstat"):
        with open(f"/proc/{pid}/net/{name}") as f:
            lines = f.read().splitlines()
        for header, values in zip(lines[0::2], lines[1::2]):
            section = header.split(":")[0]
            for field, value in zip(header.split()[1:], values.split()[1:]):
                found[(section, field)] = int(value)
    return tuple(found[(c.section, c.field)] for c in PROTOCOL_COUNTERS)


def sockstat_of(pid: int) -> tuple[int, ...]:
    """The sockets in use (and TIME_WAIT) of ``pid``'s namespace as sockstat and sockstat6 say, in
    the pass's SOCKET_KEYS order."""
    return tuple(mibs.sockstat_files(f"/proc/{pid}/net")[key] for key in mibs.SOCKET_KEYS)


HOLDER = """
import socket, sys, time
held = []
def make(family, kind, proto=0, n=1, listen=False, bind=None):
    for _ in range(n):
        s = socket.socket(family, kind, proto)
        held.append(s)
        if bind is not None:
            s.bind(bind)
        if listen:
            s.listen(8)
make(socket.AF_INET, socket.SOCK_STREAM, n=2, listen=True, bind=("0.0.0.0", 0))
make(socket.AF_INET, socket.SOCK_DGRAM, n=3, bind=("0.0.0.0", 0))
make(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP, n=4)
make(socket.AF_INET6, socket.SOCK_STREAM, n=5, listen=True, bind=("::", 0))
make(socket.AF_INET6, socket.SOCK_DGRAM, n=6, bind=("::", 0))
make(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6, n=7)
for _ in range(2):  # two connections closed by their client: in TIME_WAIT
    c = socket.create_connection(("127.0.0.1", held[0].getsockname()[1]))
    a, _ = held[0].accept()
    c.close()
    a.close()
print("ready", flush=True)
time.sleep(300)
"""


@pytest.fixture
def holder(netns: NsUnderTest) -> Iterator[int]:
    """A process in ``netns`` holding sockets of every kind sockstat counts, a different number
    of each, and two connections in TIME_WAIT; its pid."""
    proc = subprocess.Popen(["ip", "netns", "exec", netns.name, sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        wait_until(lambda: sockstat_of(proc.pid)[-1] == 2, 5)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def quiet() -> Iterator[list[int]]:
    """QUIET processes, each in a network namespace of its own (unshare -n)."""
    procs = [subprocess.Popen(["unshare", "--net", "sleep", "300"]) for _ in range(QUIET)]
    try:
        home = os.stat("/proc/self/ns/net").st_ino
        wait_until(lambda: all(os.stat(f"/proc/{p.pid}/ns/net").st_ino != home for p in procs), 10)
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


@pytest.fixture
async def service() -> EbpfService:
    s = EbpfService("on")
    await s.load()
    try:
        assert s.mibs is not None, s.mibs_error
        yield s
    finally:
        s.close()


def tcp_traffic(netns: NsUnderTest) -> None:
    """Connections to a closed port of the namespace (its RSTs: opens, resets) and pings."""
    for _ in range(5):
        with socket.socket() as s:
            s.settimeout(1)
            try:
                s.connect((netns.ns_ip, 9))
            except OSError:
                pass
    ping(netns.ns_ip, 3)


async def test_one_pass_reads_every_namespace_as_its_files_say(service: EbpfService, netns: NsUnderTest, holder: int, quiet: list[int]) -> None:
    tcp_traffic(netns)
    time.sleep(0.2)  # nothing in flight any more
    assert service.mibs is not None
    assert service.mibs.keys == tuple(c.key for c in PROTOCOL_COUNTERS)
    assert service.mibs.socket_keys == mibs.SOCKET_KEYS, "the loader did not learn the protocols' slots"
    counters, sockets = service.mibs.read()
    for pid in [netns.pid, *quiet]:
        inode = os.stat(f"/proc/{pid}/ns/net").st_ino
        assert inode in counters, f"namespace of {pid} missing from the pass ({len(counters)} read)"
        assert counters[inode] == files_of(pid), pid
        assert sockets[inode] == sockstat_of(pid), pid
    inode = os.stat(f"/proc/{netns.pid}/ns/net").st_ino
    busy = dict(zip(service.mibs.keys, counters[inode]))
    assert busy["tcp_resets_sent"] >= 5 and busy["tcp_segments_received"] >= 5, busy  # what was compared was not all zeros
    # ... and a different number of each kind of socket, so that no two kinds can be mistaken
    assert dict(zip(mibs.SOCKET_KEYS, sockets[inode])) == {"tcp": 2, "udp": 3, "raw": 4, "tcp6": 5, "udp6": 6, "raw6": 7, "time_wait": 2}


def test_the_pass_reads_what_the_socket_sampler_reads_from_the_files() -> None:
    """The pass's socket values are sockstat's and sockstat6's, by the socket sampler's names."""
    assert set(mibs.SOCKET_KEYS) == {name for _section, _key, name in SOCKSTAT_WANTED}
    assert mibs.SOCKET_KEYS[-1] == "time_wait"


def test_each_protocols_slot_is_where_its_count_of_sockets_went() -> None:
    before = [0] * 64
    after = list(before)
    for slot, count in zip((1, 2, 4, 9, 10, 12), mibs.LEARN_COUNTS):
        after[slot] += count
    assert mibs.slots_of(before, after) == [1, 2, 4, 9, 10, 12]
    stray = list(after)
    stray[30] += 1  # something else opened a socket meanwhile: which slot is which is not certain
    with pytest.raises(mibs.MibUnavailable, match="slots \\[30\\] moved"):
        mibs.slots_of(before, stray)
    twice = list(after)
    twice[31] += mibs.LEARN_COUNTS[0]  # two slots moved by tcp's count
    with pytest.raises(mibs.MibUnavailable, match="3 tcp sockets opened moved 2 protocol slots"):
        mibs.slots_of(before, twice)
    with pytest.raises(mibs.MibUnavailable, match="moved 0 protocol slots"):
        mibs.slots_of(before, before)


async def test_the_round_gets_only_the_pass_read_for_it(service: EbpfService, netns: NsUnderTest) -> None:
    """counters_for gives the pass started by this round's early hook, and nothing while that read
    is not done: a pass read for an earlier round is a second old."""
    inode = os.stat(f"/proc/{netns.pid}/ns/net").st_ino
    target = RoundCounters()
    reading = service.new_round()
    assert reading is not None
    await asyncio.gather(reading)
    await asyncio.sleep(0)  # its done callback
    service.counters_for(target)
    assert inode in target.values and target.keys == service.mibs.keys
    assert inode in target.sockets and target.socket_keys == mibs.SOCKET_KEYS
    service.new_round()  # the next round's read is not done yet
    service.counters_for(target)
    assert target.values == {} and target.sockets == {}
    await service.refresh()
    service.counters_for(target)
    assert inode in target.values and inode in target.sockets
    target.clear()
    assert target.values == {} and target.sockets == {}


async def test_the_sampler_takes_the_pass_and_reads_the_files_without_it(service: EbpfService, netns: NsUnderTest) -> None:
    opener = NamespaceOpener()
    handles = await opener.open(netns.pid)
    try:
        target = RoundCounters()
        sampler = ProtocolSampler(handles, target)
        from_files = sampler.sample()
        assert tuple(from_files[c.key] for c in PROTOCOL_COUNTERS) == files_of(netns.pid)
        await service.refresh()
        service.counters_for(target)
        passed = sampler.sample()
        assert passed == from_files  # nothing moved: the same numbers either way
        assert sampler.sample() is passed  # the same pass again: the same dict
        tcp_traffic(netns)
        # The pass is what the sampler gives while the round has it, even once the files moved on.
        assert sampler.sample() is passed
        target.clear()
        moved = sampler.sample()
        assert moved["tcp_resets_sent"] >= passed["tcp_resets_sent"] + 5
        await service.refresh()
        service.counters_for(target)
        assert sampler.sample() == moved == dict(zip(target.keys, target.values[handles.inode]))
    finally:
        handles.close()
        opener.close()


async def test_the_socket_sampler_takes_the_pass_and_reads_the_files_without_it(service: EbpfService, netns: NsUnderTest, holder: int) -> None:
    opener = NamespaceOpener()
    handles = await opener.open(netns.pid)
    try:
        target = RoundCounters()
        sampler = SocketSampler(handles, 1.0, 0.0002, 60.0, 32, round_counters=target)
        from_files = sampler.sample()
        assert from_files.in_use == {"tcp": 2, "udp": 3, "raw": 4, "tcp6": 5, "udp6": 6, "raw6": 7}
        assert from_files.tcp_states["time_wait"] == 2
        await service.refresh()
        service.counters_for(target)
        passed = sampler.sample()
        assert passed.in_use == from_files.in_use and passed.tcp_states == from_files.tcp_states
        assert passed.listen == from_files.listen  # the listeners are asked for as before
        assert sampler.sample().in_use is passed.in_use  # the same pass again: the same dict
        # a new socket in the namespace: the pass of this round does not have it, the files do
        more = subprocess.Popen(["ip", "netns", "exec", netns.name, sys.executable, "-c",
                                 "import socket, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', 0)); "
                                 "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
        try:
            assert more.stdout is not None and more.stdout.readline().strip() == "ready"
            assert sampler.sample().in_use["udp"] == 3
            target.clear()
            assert sampler.sample().in_use["udp"] == 4
            await service.refresh()
            service.counters_for(target)
            assert sampler.sample().in_use["udp"] == 4
            assert target.sockets[handles.inode] == sockstat_of(netns.pid)
        finally:
            more.kill()
            more.wait()
    finally:
        handles.close()
        opener.close()


async def test_a_run_from_a_node_no_longer_linked_stops_the_pass(service: EbpfService) -> None:
    """A run handed a node that is not in the list any more (its namespace went between two runs)
    writes nothing and says LOST; a pass cut that way is counted and keeps what it read."""
    reader = service.mibs
    assert reader is not None
    reader._args[0] = 0xFFFF888000000000  # not a list node: its prev cannot be read
    mibs._bpf(mibs.BPF_PROG_TEST_RUN, reader._attr)
    assert mibs.OUT_HEAD.unpack_from(reader._view)[1:] == (0, mibs.LOST)
    home = os.stat("/proc/self/ns/net").st_ino
    cut = reader.cut
    assert home in reader.read()[0] and reader.cut == cut  # a whole pass again


def test_a_host_of_many_cpus_gets_a_program_the_verifier_takes() -> None:
    """Each namespace costs a read per CPU and MIB, and a run's batch is straight-line code: on a
    host of 128 CPUs a batch of 64 would be more than the verifier takes (or than LLVM compiles in
    minutes). The program built for 128 CPUs (batch_for: 1) loads; its runs are not made here (this
    VM has 2 CPUs). In a child, as the daemon does it: bcc stays out of the test process."""
    assert mibs.batch_for(2) == mibs.BATCH and mibs.batch_for(128) == 1
    check = (
        "import bcc\n"
        "from nstap.ebpf import mibs\n"
        "from nstap.ebpf.btf import load\n"
        "from nstap.ebpf.loader import mib_counters\n"
        "program = bcc.BPF(text=mibs.program_text(load(), mib_counters()[0], 128).encode())\n"
        "program.load_func(b'walk', bcc.BPF.RAW_TRACEPOINT)\n"
        "print('loaded')\n"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "loaded", done.stderr[-2000:]
