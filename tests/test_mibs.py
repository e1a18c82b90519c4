"""Every namespace's protocol counters in one pass over the kernel's list of namespaces (``nstap.ebpf.mibs``).

Real kernel, real program (compiled by the real loader child), real namespaces: a namespace with
TCP traffic on its veth and 150 more with a process each (three runs of the walk, each going on
from the node the one before stopped at). The pass must read what ``/proc/<pid>/net/snmp`` and
``netstat`` say, for every one of them. The samplers' side
(the round's counters taken only when read for this round, the protocols sampler going from the
pass to the files and back) runs on the same real service and a real namespace's handles.
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


async def test_one_pass_reads_every_namespace_as_its_files_say(service: EbpfService, netns: NsUnderTest, quiet: list[int]) -> None:
    tcp_traffic(netns)
    time.sleep(0.2)  # nothing in flight any more
    assert service.mibs is not None
    assert service.mibs.keys == tuple(c.key for c in PROTOCOL_COUNTERS)
    counters = service.mibs.read()
    for pid in [netns.pid, *quiet]:
        inode = os.stat(f"/proc/{pid}/ns/net").st_ino
        assert inode in counters, f"namespace of {pid} missing from the pass ({len(counters)} read)"
        assert counters[inode] == files_of(pid), pid
    busy = dict(zip(service.mibs.keys, counters[os.stat(f"/proc/{netns.pid}/ns/net").st_ino]))
    assert busy["tcp_resets_sent"] >= 5 and busy["tcp_segments_received"] >= 5, busy  # what was compared was not all zeros


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
    service.new_round()  # the next round's read is not done yet
    service.counters_for(target)
    assert target.values == {}
    await service.refresh()
    service.counters_for(target)
    assert inode in target.values


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
    assert home in reader.read() and reader.cut == cut  # a whole pass again


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
