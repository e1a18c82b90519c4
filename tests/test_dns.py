"""DNS per container (eBPF tc programs on TCX links): the pure parts with tables, the kernel side
in namespaces the test makes (``ip netns``, a veth pair, the test's own DNS server:
tests/dnsserver.py), and the daemon on real dockerd and podman."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, Containers, free_port, sh, wait_until
from nstap.detect.cause import DNS_EMBEDDED_DOWN, DNS_NXDOMAIN_STORM, DNS_RESOLVER_FAILING, DNS_UPSTREAM_UNREACHABLE, UNKNOWN
from nstap.detect.dns_failures import DnsFailureDetector, dns_cause
from nstap.dns import program, tcx
from nstap.dns.lookups import MAX_TIMEOUT_NAMES, Lookups, Name, Server, Tally
from nstap.dns.service import DnsService
from nstap.samples import NamespaceSample

SERVER = str(ROOT / "tests" / "dnsserver.py")


# -- pure parts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("wire", "name"), [
    (b"\x03www\x07example\x03com\x00", "www.example.com."),
    (b"\x00", "."),
    (b"\x03a.b\x01z\x00", "a\\046b.z."),  # a dot inside a label, escaped as dig does
    (b"\x02\x01\xff\x00", "\\001\\255."),
    (b"\x05abcde\x09abc", "abcde.abc..."),  # cut at NAME_BYTES
    (b"\x3fx", "x..."),
])
def test_names_decode_as_dig_shows_them(wire: bytes, name: str) -> None:
    assert program.decode_name(wire.ljust(program.NAME_BYTES, b"\0") if wire.endswith(b"\0") else wire) == name


def count_item(cookie: int, rcode: int, qtype: int, n: int) -> tuple[bytes, bytes]:
    return program.COUNT_KEY.pack(cookie, rcode, qtype), program.COUNT.pack(n)


def flight_item(cookie: int, port: int, sent_ns: int, name: bytes, forwarded: int = 0, server: str = "10.0.0.2") -> tuple[bytes, bytes]:
    key = program.FLIGHT_KEY.pack(0, socket.inet_aton("10.0.0.9").ljust(16, b"\0"), port, 7, socket.AF_INET, 0)
    value = program.FLIGHT_VALUE.pack(sent_ns, cookie, socket.inet_aton(server).ljust(16, b"\0"), 53, 1, forwarded, len(name), name.ljust(program.NAME_BYTES, b"\0"))
    return key, value


def test_tally_counts_timeouts_and_the_histogram() -> None:
    tally = Tally(timeout=5.0)
    tally.counts([count_item(1, 0, 1, 7), count_item(1, 3, 28, 2), count_item(1, 15, 0, 1), count_item(2, 0, 1, 4)])
    # log2 buckets of microseconds: 9 -> [256, 512) us, 13 -> [4096, 8192) us
    tally.latencies([(program.LATENCY_KEY.pack(1, 9, 0), program.COUNT.pack(3)), (program.LATENCY_KEY.pack(1, 13, 0), program.COUNT.pack(6)),
                     (program.LATENCY_KEY.pack(1, program.SUM_BUCKET, 0), program.COUNT.pack(45_000_000))])
    now = 100 * 10**9
    items = [flight_item(1, 1000, now - 6 * 10**9, b"\x06silent\x04test\x00"), flight_item(1, 1001, now - 1 * 10**9, b"\x04soon\x00"),
             flight_item(1, 1002, now - 9 * 10**9, b"\x03fwd\x00", forwarded=1)]
    expired = tally.expired(items, now, 1000.0)
    assert expired == [(1, items[0][0]), (1, items[2][0])]  # the young one waits; the forwarded one goes, but is not the container's
    one, two = tally.lookups(1), tally.lookups(2)
    assert one.requests == {("NOERROR", "A"): 7, ("NXDOMAIN", "AAAA"): 2, ("other", "other"): 1, ("timeout", "A"): 1}
    assert one.failed() == 4 and one.total() == 11
    assert one.answered == 9 and one.seconds == pytest.approx(0.045)
    assert one.buckets == (0, 3, 3, 9, 9, 9, 9, 9)  # at or under 256 us, 1 ms, 4 ms, 16 ms, ...
    assert two.requests == {("NOERROR", "A"): 4} and two.answered == 0
    assert tally.server_timeouts == {(1, "10.0.0.2", 53): 2}
    assert tally.lookups(1) is tally.lookups(1)  # unchanged: the same object (what a detector keeps)
    tally.forget({1})
    assert tally.lookups(1).total() == 0 and not tally.timeout_names and not tally.server_timeouts


def test_failing_names_are_the_last_minutes_and_the_timed_out_names_are_bounded() -> None:
    tally = Tally(timeout=1.0)
    name = lambda text, rcode, n, last: (program.NAME_KEY.pack(1, rcode, 1, text.ljust(program.NAME_BYTES, b"\0")), program.NAME_VALUE.pack(n, last))  # noqa: E731
    boot = 0.0
    tally.failing([name(b"\x03old\x00", 3, 5, int(1000e9))], boot, 1000.0)
    assert [(n.name, n.count) for n in tally.names[1]] == [("old.", 5)]  # the maps are under a minute old: all of it
    old = name(b"\x03old\x00", 3, 5, int(1000e9))
    stale = tally.failing([old, name(b"\x03new\x00", 2, 2, int(1090e9))], boot, 1090.0)
    assert [(n.name, n.rcode, n.count) for n in tally.names[1]] == [("new.", "SERVFAIL", 2)]  # old: none in the last minute
    assert stale == [(1, old[0])]  # not seen for longer than the window: the daemon deletes it (its room back)
    tally.release(1, 1)
    assert tally.released_changed() == [((1).to_bytes(8, "little"), program.BUDGET.pack(0, 1, 0, 0, 0))] and tally.released_changed() == []
    for i in range(MAX_TIMEOUT_NAMES + 50):
        tally.expired([flight_item(1, 1000 + i % 60000, 0, bytes([5]) + f"n{i:04d}".encode() + b"\x00")], 10**10, 2000.0)
    assert len(tally.timeout_names) == MAX_TIMEOUT_NAMES
    # Timeouts to servers past the namespace's room (not in the map) are not kept.
    for i in range(3000):
        tally.expired([flight_item(1, 2000, 0, b"\x01x\x00", server=f"10.1.{i // 250}.{i % 250}")], 10**10, 2000.0)
    assert len(tally.server_timeouts) == 3001  # and the one of the timed-out names above
    server_key = program.SERVER_KEY.pack(1, socket.inet_aton("10.1.0.7").ljust(16, b"\0"), socket.AF_INET, 53, 0)
    tally.server_list([(server_key, program.SERVER_VALUE.pack(1, 0, 0, 0, 0, 10**10))], 10**10)
    assert tally.server_timeouts == {(1, "10.1.0.7", 53): 1} and tally.servers[1][0].timeouts == 1


def lookups(requests: dict, servers: tuple = (), names: tuple = (), timeout: float = 5.0) -> Lookups:
    return Lookups(requests, (0,) * 8, 0, 0.0, names, servers, timeout)


def server(address: str, queries: int, failures: int = 0, timeouts: int = 0, forwarded: int = 0) -> Server:
    return Server(address, 53, queries, queries - timeouts, failures, timeouts, 0.0, forwarded)


BEFORE = lookups({("NOERROR", "A"): 100}, (server("127.0.0.11", 100), server("10.0.0.2", 100, forwarded=100)))


@pytest.mark.parametrize(("now", "kind", "words"), [
    (lookups({("NOERROR", "A"): 100, ("timeout", "A"): 8}, (server("127.0.0.11", 108, timeouts=8), server("10.0.0.2", 108, timeouts=8, forwarded=108))),
     DNS_UPSTREAM_UNREACHABLE, ("10.0.0.2:53", "forwarded by the embedded resolver", "8 of 8")),
    (lookups({("NOERROR", "A"): 100, ("timeout", "A"): 8}, (server("127.0.0.11", 108, timeouts=8), server("10.0.0.2", 100, forwarded=100))),
     DNS_EMBEDDED_DOWN, ("127.0.0.11", "asked no upstream")),
    (lookups({("NOERROR", "A"): 100, ("SERVFAIL", "A"): 9}, (server("127.0.0.11", 109, failures=9), server("10.0.0.2", 100, forwarded=100)),
             (Name("db.internal.", "SERVFAIL", "A", 9, 0.0),)),
     DNS_RESOLVER_FAILING, ("SERVFAIL from 127.0.0.11:53", "9 of 9", "db.internal.")),
    (lookups({("NOERROR", "A"): 100, ("SERVFAIL", "A"): 9}, (server("127.0.0.11", 109, failures=9), server("10.0.0.2", 109, timeouts=9, forwarded=109))),
     DNS_UPSTREAM_UNREACHABLE, ("SERVFAIL from 127.0.0.11:53", "its upstream 10.0.0.2:53")),
    (lookups({("NOERROR", "A"): 100, ("NXDOMAIN", "A"): 12}, (server("127.0.0.11", 112, failures=12),),
             tuple(Name(f"api.{s}", "NXDOMAIN", "A", 3, 0.0) for s in ("default.svc.cluster.local.", "svc.cluster.local.", "cluster.local.", "corp.")) + (Name("api.", "NXDOMAIN", "A", 0, 0.0),)),
     DNS_NXDOMAIN_STORM, ("'api' tried with 5 search suffixes", "12 NXDOMAIN")),
    (lookups({("NOERROR", "A"): 100, ("NXDOMAIN", "A"): 4}, (server("127.0.0.11", 104, failures=4),), (Name("typo.example.", "NXDOMAIN", "A", 4, 0.0),)),
     DNS_NXDOMAIN_STORM, ("most for typo.example. (4)",)),
    (lookups({("NOERROR", "A"): 120}), UNKNOWN, ()),
])
def test_dns_causes_table(now: Lookups, kind: str, words: tuple[str, ...]) -> None:
    cause = dns_cause(now, BEFORE)
    assert cause.kind == kind, cause
    for word in words:
        assert word in cause.text, cause.text


def sample_at(t: float, requests: dict) -> NamespaceSample:
    return NamespaceSample(1, t, 0.0, dns=lookups(requests))


def run_detector(detector: DnsFailureDetector, series: list[tuple[int, int, int]]) -> list:
    """(seconds, ok so far, timeouts so far) -> the finding of each sample."""
    return [detector.observe(sample_at(1000.0 + t, {("NOERROR", "A"): ok, ("timeout", "A"): bad})) for t, ok, bad in series]


def test_dns_failures_detector_trips_on_a_fault_not_on_the_namespace_s_normal() -> None:
    # 10 lookups/s, none failing for a minute, then 5 of each 10 time out from t=60 s (reaped 5 s later).
    series = [(t, 10 * t, 0) for t in range(60)] + [(t, 600 + 5 * (t - 60), 5 * (t - 60)) for t in range(60, 70)]
    found = run_detector(DnsFailureDetector(0.2), series)
    first = next(i for i, f in enumerate(found) if f is not None)
    assert first == 61  # the first sample with failures (5 >= min_failures), at a 50 % share
    finding = found[first]
    assert finding.kind == "dns_failures" and finding.numbers["rcode_timeout"] == 5 and finding.cause.kind == DNS_UPSTREAM_UNREACHABLE
    assert finding.started_at == pytest.approx(1000.0 + 60 - 5.0)  # the last sample before, less dns.timeout
    # A namespace whose search path always fails half its lookups: its normal, not a fault.
    steady = [(t, 5 * t, 5 * t) for t in range(120)]
    assert run_detector(DnsFailureDetector(0.2), steady)[5] is not None  # timeouts from the start: never normal
    nx_steady = [NamespaceSample(1, 1000.0 + t, 0.0, dns=lookups({("NOERROR", "A"): 5 * t, ("NXDOMAIN", "A"): 5 * t})) for t in range(120)]
    detector = DnsFailureDetector(0.2)
    assert not any(detector.observe(s) for s in nx_steady)  # NXDOMAIN from the start: a search path, judged against itself
    nx_fault = [NamespaceSample(1, 1120.0 + t, 0.0, dns=lookups({("NOERROR", "A"): 600 + t, ("NXDOMAIN", "A"): 600 + 9 * t})) for t in range(1, 5)]
    assert any(detector.observe(s) for s in nx_fault)  # then 90 %: a storm
    # Too few failures to be an incident.
    few = [(t, 10 * t, 0) for t in range(30)] + [(30, 300, 4)]
    assert not any(run_detector(DnsFailureDetector(0.2), few))


# -- the kernel side, in namespaces the test makes ---------------------------------------------------


def netns_exec(ns: str, *argv: str, timeout: float = 60) -> str:
    return sh("ip", "netns", "exec", ns, *argv, timeout=timeout).stdout


def ask(ns: str, server_ip: str, name: str, count: int = 1, qtype: str = "A", tcp: bool = False, timeout: float = 2.0) -> list:
    args = [sys.executable, SERVER, "ask", server_ip, name, "--count", str(count), "--type", qtype, "--timeout", str(timeout)]
    return json.loads(netns_exec(ns, *args, *(["--tcp"] if tcp else [])))


@contextlib.contextmanager
def dns_server(ns: str, bind: str) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, SERVER, "serve", "--bind", bind], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str, str]]:
    """Two client namespaces and a server one: client A (10.98.0.2, fd98::2) and B (10.98.1.2) each
    with a veth to the server namespace (10.98.0.1, fd98::1 / 10.98.1.1); lo up everywhere."""
    tag = f"{os.getpid() % 100000}"
    a, b, s = f"nstap-dnsa-{tag}", f"nstap-dnsb-{tag}", f"nstap-dnss-{tag}"
    for ns in (a, b, s):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    try:
        for ns, net in ((a, 0), (b, 1)):
            sh("ip", "link", "add", f"dq{net}{tag}", "netns", ns, "type", "veth", "peer", "name", f"ds{net}{tag}", "netns", s)
            sh("ip", "-n", ns, "addr", "add", f"10.98.{net}.2/24", "dev", f"dq{net}{tag}")
            sh("ip", "-n", s, "addr", "add", f"10.98.{net}.1/24", "dev", f"ds{net}{tag}")
            sh("ip", "-n", ns, "-6", "addr", "add", f"fd98:{net}::2/64", "dev", f"dq{net}{tag}", "nodad")
            sh("ip", "-n", s, "-6", "addr", "add", f"fd98:{net}::1/64", "dev", f"ds{net}{tag}", "nodad")
            sh("ip", "-n", ns, "link", "set", f"dq{net}{tag}", "up")
            sh("ip", "-n", s, "link", "set", f"ds{net}{tag}", "up")
        yield a, b, s
    finally:
        for ns in (a, b, s):
            sh("ip", "netns", "del", ns, check=False)


def inode_of(ns: str) -> int:
    return os.stat(f"/run/netns/{ns}").st_ino


@contextlib.asynccontextmanager
async def service(timeout: float = 1.0):
    dns = DnsService("on", timeout)
    await dns.load()
    try:
        yield dns
    finally:
        dns.close()


async def follow(dns: DnsService, *names: str, as_inode: dict[str, int] | None = None) -> dict[str, int]:
    """Attach in the namespaces ``names`` (keyed by their inode, or ``as_inode``'s number); wait for the links."""
    fds = {ns: os.open(f"/run/netns/{ns}", os.O_RDONLY) for ns in names}
    try:
        inodes = {ns: (as_inode or {}).get(ns, os.fstat(fd).st_ino) for ns, fd in fds.items()}
        dns.follow({inodes[ns]: fd for ns, fd in fds.items()})
        await asyncio.to_thread(wait_until, lambda: set(inodes.values()) <= set(dns._cookies), 10, 0.05, "links made")
        return inodes
    finally:
        for fd in fds.values():
            os.close(fd)


async def read(dns: DnsService, inode: int) -> Lookups:
    await dns.refresh()
    got = dns.of(inode)
    assert got is not None
    return got


@pytest.mark.docker  # root and bcc, like the other eBPF tests
async def test_lookups_counted_exactly_by_namespace_outcome_and_type(namespaces) -> None:
    a, b, s = namespaces
    async with service(timeout=1.0) as dns:
        inodes = await follow(dns, a, b)
        with dns_server(s, "::"):
            results = [
                *ask(a, "10.98.0.1", "ok.test", 5), *ask(a, "10.98.0.1", "ok.test", 2, qtype="AAAA"), *ask(a, "10.98.0.1", "nxname.test", 3),
                *ask(a, "10.98.0.1", "failing.test", 2), *ask(a, "10.98.0.1", "refused.test"), *ask(a, "10.98.0.1", "slow120.test", 2),
                *ask(a, "fd98:0::1", "ok6.test", 2, qtype="AAAA"), *ask(a, "10.98.0.1", "oktcp.test", 2, tcp=True),
                *ask(a, "10.98.0.1", "silent.test", 2, timeout=0.3),
            ]
            b_results = ask(b, "10.98.1.1", "nxother.test", 4)
        assert [r for r, _ in results].count("NOERROR") == 13 and [r for r, _ in b_results] == ["NXDOMAIN"] * 4
        await asyncio.sleep(1.5)  # the silent ones time out (dns.timeout 1 s)
        got = await read(dns, inodes[a])
        assert got.requests == {
            ("NOERROR", "A"): 9, ("NOERROR", "AAAA"): 4, ("NXDOMAIN", "A"): 3, ("SERVFAIL", "A"): 2, ("REFUSED", "A"): 1, ("timeout", "A"): 2,
        }
        assert (await read(dns, inodes[b])).requests == {("NXDOMAIN", "A"): 4}  # two namespaces never mixed
        # Latency: the two slow lookups took the server's 120 ms (and the client saw the same).
        assert got.answered == 19
        slow = [t for (_, t) in results[13:15]]
        assert all(0.12 <= t < 0.5 for t in slow)
        assert got.buckets[5] - got.buckets[4] == 2  # between 65 ms and 262 ms: exactly the two slow ones
        assert got.buckets[4] == 17  # every other one under 65 ms
        names = {(n.name, n.rcode): n.count for n in got.names}
        assert names == {("nxname.test.", "NXDOMAIN"): 3, ("failing.test.", "SERVFAIL"): 2, ("refused.test.", "REFUSED"): 1, ("silent.test.", "timeout"): 2}
        servers = {(x.address, x.port): x for x in got.servers}
        assert set(servers) == {("10.98.0.1", 53), ("fd98::1", 53)}
        v4 = servers[("10.98.0.1", 53)]
        assert (v4.queries, v4.answers, v4.failures, v4.timeouts) == (19, 17, 6, 2)


@pytest.mark.docker
async def test_a_reused_namespace_inode_starts_from_zero_and_detach_leaves_the_maps_empty(namespaces) -> None:
    a, b, s = namespaces
    async with service() as dns:
        with dns_server(s, "0.0.0.0"):
            inodes = await follow(dns, a)
            ask(a, "10.98.0.1", "nx.test", 3)
            assert (await read(dns, inodes[a])).requests == {("NXDOMAIN", "A"): 3}
            dns.follow({})  # the watcher detached
            await asyncio.to_thread(wait_until, lambda: not any(m.keys() for n, m in dns._maps.items() if n not in ("dns_lost", "dns_changes")), 5, 0.05, "entries deleted")
            # Another namespace on the same inode number (as the kernel reuses them): nothing inherited.
            await follow(dns, b, as_inode={b: inodes[a]})
            ask(b, "10.98.1.1", "ok.test", 2)
            assert (await read(dns, inodes[a])).requests == {("NOERROR", "A"): 2}


@pytest.mark.docker
async def test_once_the_daemon_stops_no_attach_or_detach_starts_and_close_takes_every_link(monkeypatch) -> None:
    """Each link made or closed waits out an RCU grace period in the kernel (some 30 ms a
    namespace): beside 1,000 containers the daemon went on attaching, then detached the watchers'
    namespaces one by one, for 40 s after SIGTERM. Once stopping, the attach under way is the last
    and the watchers' detaches start nothing; close() then takes every link."""
    tag = f"{os.getpid() % 100000}"
    names = [f"nstap-dnsx-{tag}-{i}" for i in range(60)]
    for ns in names:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    attaches: list[int] = []
    real = tcx.attach_namespace
    monkeypatch.setattr(tcx, "attach_namespace", lambda *args: attaches.append(args[2]) or real(*args))
    try:
        async with service() as dns:
            first = await follow(dns, *names[:10])
            fds = {ns: os.open(f"/run/netns/{ns}", os.O_RDONLY) for ns in names}
            try:
                dns.follow({os.fstat(fd).st_ino: fd for fd in fds.values()})  # 50 more to attach
            finally:
                for fd in fds.values():
                    os.close(fd)
            await asyncio.to_thread(wait_until, lambda: len(attaches) > 11, 10, 0.005, "attaching")
            dns.stop_following()
            dns.follow({})  # every watcher detached
            await asyncio.to_thread(lambda: dns._thread.executor.submit(lambda: None).result())  # the thread's work done
            attached = set(dns._links)
            assert 10 < len(attaches) < 30, len(attaches)  # stopped at the next namespace, not after 50 more
            assert set(first.values()) < attached and len(attached) == len(attaches)  # nothing detached
            assert not dns.follow({}) and len(dns._links) == len(attached)
        assert dns._links == {} and dns._ns_fds == {}  # close took them all
    finally:
        for ns in names:
            sh("ip", "netns", "del", ns, check=False)


@pytest.mark.docker
async def test_a_flooding_namespace_is_held_to_its_room_and_the_others_are_counted(namespaces) -> None:
    """A container chooses its lookups: thousands of distinct unanswered ones, or failing names,
    fill the maps every namespace shares only up to its own room; the rest is counted as
    untracked, and a quiet namespace's lookups are counted exactly meanwhile."""
    a, b, s = namespaces
    async with service(timeout=1.0) as dns:
        inodes = await follow(dns, a, b)
        with dns_server(s, "0.0.0.0"):
            # 400 distinct failing names: the namespace keeps 128 of them. (The test's server, a
            # thread per datagram, may drop some of the flood: those are lookups left unanswered.)
            answered = json.loads(netns_exec(a, sys.executable, SERVER, "blast", "10.98.0.1", "nx", "--count", "400", "--linger", "1"))["answers"]
            assert answered > program.MAX_NAMES_PER_NS
            cookie = dns._cookies[inodes[a]].to_bytes(8, "little")
            # Exactly its room, whichever CPUs handled the answers: the program takes a place
            # before it checks (it checked, then added, and two CPUs at once both passed: 129 once in CI).
            names = sum(1 for k in dns._maps["dns_names"].keys() if k[:8] == cookie)
            assert names == program.MAX_NAMES_PER_NS, names
            # 3000 distinct lookups nobody answers: 1024 are followed.
            netns_exec(a, sys.executable, SERVER, "blast", "10.98.0.1", "silent", "--count", "3000", "--linger", "0.2")
            assert [r for r, _ in ask(b, "10.98.1.1", "nxb.test", 3)] == ["NXDOMAIN"] * 3
            held = [v for k, v in dns._maps["dns_inflight"].items() if program.cookie_of("dns_inflight", k, v) == dns._cookies[inodes[a]]]
            assert len(held) == program.MAX_FLIGHTS_PER_NS, len(held)
            flooder = await read(dns, inodes[a])
            unanswered = 400 - answered  # still awaiting their answers, in the namespace's room
            assert flooder.untracked == (answered - names) + (3000 - (len(held) - unanswered))
            assert flooder.requests[("NXDOMAIN", "A")] == answered  # counted all the same
            quiet = await read(dns, inodes[b])
            assert quiet.requests == {("NXDOMAIN", "A"): 3} and [(n.name, n.count) for n in quiet.names] == [("nxb.test.", 3)]
            # Its lookups time out (dns.timeout 1 s) and the room comes back: tracked again.
            await asyncio.sleep(1.5)
            await read(dns, inodes[a])
            ask(a, "10.98.0.1", "okagain.test", 2)
            after = await read(dns, inodes[a])
            assert after.requests[("NOERROR", "A")] == 2 and after.requests[("timeout", "A")] == len(held)


@pytest.mark.docker
async def test_a_namespace_with_many_interfaces_gets_links_on_a_bounded_number(namespaces) -> None:
    """A container makes its own interfaces: each costs two links, so a namespace gets at most
    MAX_INTERFACES of them (lo first), the rest counted and logged."""
    a, _b, _s = namespaces
    for i in range(20):  # 40 interfaces: veth pairs with both ends in the namespace
        sh("ip", "-n", a, "link", "add", f"many{i}a", "type", "veth", "peer", "name", f"many{i}b")
    async with service() as dns:
        inodes = await follow(dns, a)
        links = dns._links[inodes[a]]
        assert len(links.links) == tcx.MAX_INTERFACES and 1 in links.links
        assert links.skipped == 40 + 2 - tcx.MAX_INTERFACES  # lo, the veth to the server and 40 more


@pytest.mark.docker
async def test_the_embedded_resolver_s_forwarded_queries_are_not_the_container_s(namespaces) -> None:
    """Docker's embedded resolver listens at 127.0.0.11 inside the namespace and forwards what it
    does not know upstream from the same namespace: one lookup of the container, two queries on the
    wire. Here a forwarder on 127.0.0.11 in the namespace does the same."""
    a, _b, s = namespaces
    sh("ip", "-n", a, "addr", "add", "127.0.0.11/8", "dev", "lo")
    forwarder = subprocess.Popen(["ip", "netns", "exec", a, sys.executable, "-c", FORWARDER], stdout=subprocess.PIPE, text=True)
    try:
        assert forwarder.stdout is not None and forwarder.stdout.readline().strip() == "ready"
        async with service() as dns:
            inodes = await follow(dns, a)
            with dns_server(s, "0.0.0.0"):
                assert [r for r, _ in ask(a, "127.0.0.11", "via.test", 3)] == ["NOERROR"] * 3
                assert [r for r, _ in ask(a, "127.0.0.11", "nxvia.test", 2)] == ["NXDOMAIN"] * 2
            got = await read(dns, inodes[a])
            assert got.requests == {("NOERROR", "A"): 3, ("NXDOMAIN", "A"): 2}
            servers = {x.address: x for x in got.servers}
            assert (servers["127.0.0.11"].queries, servers["127.0.0.11"].forwarded) == (5, 0)
            assert (servers["10.98.0.1"].queries, servers["10.98.0.1"].forwarded, servers["10.98.0.1"].answers) == (5, 5, 5)
    finally:
        forwarder.kill()
        forwarder.wait()


FORWARDER = r"""
import socket
inside = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); inside.bind(("127.0.0.11", 53))
print("ready", flush=True)
while True:
    data, client = inside.recvfrom(4096)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
        up.settimeout(2); up.sendto(data, ("10.98.0.1", 53))
        try:
            inside.sendto(up.recv(4096), client)
        except OSError:
            pass
"""


# -- the daemon, on real dockerd and podman --------------------------------------------------------

DNS_ON = {"dns": {"mode": "on", "timeout": 1.0}, "detect": {"capture": False}}
SLEEP = ("sleep", "3600")


def ask_in(pid: int, server_ip: str, name: str, count: int = 1, timeout: float = 2.0, qtype: str = "A") -> list:
    """Lookups from inside the container's namespace (the test's client: exact counts)."""
    out = sh("nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, SERVER, "ask", server_ip, name, "--count", str(count),
             "--timeout", str(timeout), "--type", qtype).stdout
    return [r for r, _ in json.loads(out)]


@contextlib.contextmanager
def host_dns_server(bind: str) -> Iterator[None]:
    """The test's DNS server on the host, on ``bind`` (a bridge's gateway address)."""
    proc = subprocess.Popen([sys.executable, SERVER, "serve", "--bind", bind], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def docker_network() -> Iterator[tuple[str, str]]:
    """A user-defined network (Docker's embedded resolver serves it): (name, gateway address).
    Asked for before ``containers``: removed after them."""
    name = f"nstap-dns-{os.urandom(4).hex()}"
    sh("docker", "network", "create", name)
    try:
        config = json.loads(sh("docker", "network", "inspect", name).stdout)[0]["IPAM"]["Config"][0]
        yield name, config["Gateway"]
    finally:
        sh("docker", "network", "rm", name, check=False)


def dns_view(d, cid: str) -> dict:
    status, body = d.api(f"/api/v1/containers/{cid[:12]}/dns")
    assert status == 200, body
    return body


def attached(d, cid: str) -> dict:
    d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=cid[:12]), 20, f"{cid[:12]} watched")
    return wait_until(lambda: (lambda b: b if b["attached"] else None)(dns_view(d, cid)), 20, 0.2, f"DNS links in {cid[:12]}")


def requests_of(body: dict) -> dict:
    return {(r["rcode"], r["qtype"]): r["count"] for r in body["requests"]}


@pytest.mark.docker
def test_docker_lookups_through_the_embedded_resolver_exported_and_shown(nstap, docker_network, containers, docker_image: str) -> None:
    net, gateway = docker_network
    with host_dns_server(gateway):
        d = nstap(DNS_ON)
        asker = containers.docker("--network", net, "--dns", gateway, docker_image, *SLEEP, name="dnsask")
        quiet = containers.docker("--network", net, "--dns", gateway, docker_image, *SLEEP, name="dnsquiet")
        attached(d, asker)
        attached(d, quiet)
        pid = containers.pid("docker", asker)
        quiet_name = Containers.inspect("docker", quiet)["Name"].lstrip("/")
        assert ask_in(pid, "127.0.0.11", "ok.test", 4) == ["NOERROR"] * 4
        assert ask_in(pid, "127.0.0.11", "nxname.test", 3) == ["NXDOMAIN"] * 3
        assert ask_in(pid, "127.0.0.11", quiet_name, 2) == ["NOERROR"] * 2  # dockerd answers for its own containers
        assert ask_in(pid, "127.0.0.11", "ok.test", 2, qtype="AAAA") == ["NOERROR"] * 2
        body = wait_until(lambda: (lambda b: b if sum(requests_of(b).values()) >= 11 else None)(dns_view(d, asker)), 10, 0.3, "lookups counted")
        assert requests_of(body) == {("NOERROR", "A"): 6, ("NXDOMAIN", "A"): 3, ("NOERROR", "AAAA"): 2}
        assert body["answered"] == 11 and body["failed"] == 3 and body["mean_latency_ms"] > 0
        assert [(n["name"], n["rcode"], n["count"]) for n in body["failing_names"]] == [("nxname.test.", "NXDOMAIN", 3)]
        servers = {(s["address"], s["port"]): s for s in body["servers"]}
        embedded = servers[("127.0.0.11", 53)]
        assert (embedded["queries"], embedded["answers"], embedded["via_embedded_resolver"]) == (11, 11, 0)
        upstream = servers[(gateway, 53)]  # what the embedded resolver forwarded: not the container's own names
        assert upstream["queries"] == upstream["via_embedded_resolver"] == 9 and upstream["answers"] == 9
        # The samples carry what the round's read saw (the API read afresh): a round later at most.
        m = d.wait_metric(lambda m: m.value("nstap_dns_request_duration_seconds_count", container_id=asker[:12]) == 11 and m, 5)
        assert m.value("nstap_dns_requests_total", container_id=asker[:12], rcode="NXDOMAIN", qtype="A") == 3
        assert m.value("nstap_collector_up", collector="dns") == 1 and m.value("nstap_dns_untracked_total", container_id=asker[:12]) == 0
        assert m.value("nstap_dns_request_duration_seconds_bucket", container_id=asker[:12], le="+Inf") == 11
        assert not m.find("nstap_dns_requests_total", container_id=quiet[:12])  # never mixed
        assert sum(requests_of(dns_view(d, quiet)).values()) == 0
        # A busybox client (what a container runs): counted as well.
        sh("docker", "exec", asker, "nslookup", "-type=a", "ok.test", check=False)
        wait_until(lambda: requests_of(dns_view(d, asker))[("NOERROR", "A")] >= 7, 10, 0.3, "busybox's lookup counted")
        out = sh(sys.executable, "-m", "nstap", "dns", asker[:12], "--config", str(d.config_path)).stdout
        assert "nxname.test." in out and "127.0.0.11:53" in out and f"{gateway}:53" in out and "NXDOMAIN" in out, out
        # Latency: two lookups the upstream answers after 150 ms each land in the 65-262 ms bucket,
        # and add 300 ms (and the embedded resolver's own few) to the histogram's sum and the server's.
        def latency_state() -> tuple[float, float, float, float, float]:
            m, upstream = d.scrape(), next(s for s in dns_view(d, asker)["servers"] if s["address"] == gateway)
            bucket = lambda le: m.value("nstap_dns_request_duration_seconds_bucket", container_id=asker[:12], le=le)  # noqa: E731
            return (m.value("nstap_dns_request_duration_seconds_count", container_id=asker[:12]), bucket("0.065536"), bucket("0.262144"),
                    m.value("nstap_dns_request_duration_seconds_sum", container_id=asker[:12]), upstream["mean_latency_ms"] * upstream["answers"])
        before = count, fast, slow, total, upstream_ms = wait_until(lambda: (s := latency_state())[0] == 12 and s, 5, 0.2, "the busybox lookup exported")
        assert ask_in(pid, "127.0.0.11", "slow150.test", 2) == ["NOERROR"] * 2
        after = wait_until(lambda: (s := latency_state())[0] == count + 2 and s, 5, 0.2, "the slow lookups exported")
        assert after[1] == fast and after[2] == slow + 2, (before, after)
        assert 0.3 <= after[3] - total < 0.5 and 300 <= after[4] - upstream_ms < 400, (before, after)


@pytest.mark.docker
def test_dns_failures_anomaly_with_its_cause_and_a_dns_capture(nstap, docker_network, containers, docker_image: str) -> None:
    from test_anomalies import anomaly, finished_capture
    from test_causes_live import get

    net, gateway = docker_network
    with host_dns_server(gateway):
        d = nstap({"dns": {"mode": "on", "timeout": 1.0}, "capture": {"post_seconds": 2}})
        # Its flight recorder holds the lookups from before the onset (over in milliseconds: a live
        # capture started at detection would hold none of them).
        failing = containers.docker("--network", net, "--dns", gateway, "--label", "nstap.capture=ring", docker_image, *SLEEP, name="dnsfail")
        silent = containers.docker("--network", net, "--dns", gateway, docker_image, *SLEEP, name="dnssilent")
        attached(d, failing)
        attached(d, silent)
        d.wait_metric(lambda m: m.value("nstap_flight_recorders_running") == 1, 10, "flight recorder running")
        pid = containers.pid("docker", failing)
        assert ask_in(pid, "127.0.0.11", "ok.test", 3) == ["NOERROR"] * 3
        time.sleep(2)
        assert set(ask_in(pid, "127.0.0.11", "failing.test", 8)) == {"SERVFAIL"}  # the upstream's, relayed by dockerd
        event = anomaly(d, failing, "dns_failures")
        assert event["cause"]["kind"] == DNS_RESOLVER_FAILING and "SERVFAIL from 127.0.0.11:53" in event["cause"]["text"], event["cause"]
        capture = finished_capture(d, event["capture_id"])
        # Each lookup is 2 packets on lo and 2 on eth0 (dockerd's forward), and the ring holds them all.
        assert capture["filter"] == "port 53 or host 127.0.0.11" and capture["packets"] >= 4 * 8, capture
        doc = wait_until(lambda: (lambda e: e if "end" in e else None)(json.loads(get(d, f"/api/v1/captures/{capture['id']}/evidence"))), 30, 0.5)
        names = {(n["name"], n["rcode"]) for n in doc["end"]["dns"]["failing_names"]}
        assert ("failing.test.", "SERVFAIL") in names, doc["end"]["dns"]
        # Straight to the upstream, which stays silent: timeouts, and the cause names it.
        spid = containers.pid("docker", silent)
        assert ask_in(spid, gateway, "silent.test", 6, timeout=0.3) == ["timeout"] * 6
        event = anomaly(d, silent, "dns_failures")
        assert event["cause"]["kind"] == DNS_UPSTREAM_UNREACHABLE and f"{gateway}:53" in event["cause"]["text"], event["cause"]


@pytest.mark.docker
def test_podman_lookups_to_the_bridge_gateway(nstap, containers, podman_image: str) -> None:
    """Podman's resolver (aardvark-dns with netavark) listens on the bridge's gateway; this host's
    Podman uses CNI, so the test's own server stands there instead: the same path (the container's
    eth0, out and back)."""
    d = nstap(DNS_ON)
    cid = containers.podman("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", podman_image, *SLEEP, name="dnspod")
    gateway = json.loads(sh("podman", "network", "inspect", "podman").stdout)[0]
    gateway = (gateway.get("subnets") or [{}])[0].get("gateway") or gateway["plugins"][0]["ipam"]["ranges"][0][0]["gateway"]
    with host_dns_server(gateway):
        attached(d, cid)
        pid = containers.pid("podman", cid)
        assert ask_in(pid, gateway, "ok.test", 3) == ["NOERROR"] * 3
        assert ask_in(pid, gateway, "refused.test", 2) == ["REFUSED"] * 2
        body = wait_until(lambda: (lambda b: b if sum(requests_of(b).values()) >= 5 else None)(dns_view(d, cid)), 10, 0.3, "lookups counted")
        assert requests_of(body) == {("NOERROR", "A"): 3, ("REFUSED", "A"): 2}
        assert [(s["address"], s["queries"]) for s in body["servers"]] == [(gateway, 5)]
        d.wait_metric(lambda m: m.value("nstap_dns_requests_total", container_id=cid[:12], rcode="REFUSED", qtype="A") == 2, 5)


@pytest.mark.docker
def test_without_bcc_dns_degrades_and_on_refuses_to_start(nstap, tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "nobcc" / "bcc"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("bcc hidden by the test")\n')
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    d = nstap({"dns": {"mode": "auto"}, "ebpf": "off"})
    event = wait_until(lambda: d.events("dns_unavailable"), 15, message="dns_unavailable logged")[0]
    assert "bcc is not importable" in event["error"]
    assert len(d.events("dns_unavailable")) == 1
    m = d.wait_metric(lambda m: m.value("nstap_collector_up", collector="dns") == 0 and m, 5)
    assert m.value("nstap_namespaces_watched") is not None
    config = tmp_path / "on.yaml"
    config.write_text(f"dns: {{mode: 'on'}}\nebpf: 'off'\ndata_dir: {tmp_path / 'on'}\nmetrics_listen: 127.0.0.1:{free_port()}\napi_listen: 127.0.0.1:{free_port()}\n")
    proc = subprocess.run([sys.executable, "-m", "nstap", "run", "--config", str(config)], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(fake.parent)})
    assert proc.returncode == 2 and "dns.mode: on, but bcc is not importable" in proc.stderr
    # nstap doctor says the same, with the fix: DEGRADED with mode auto, MISSING (exit 1) with on.
    for mode, status, code in (("auto", "DEGRADED", 0), ("on", "MISSING", 1)):
        (tmp_path / f"doctor-{mode}.yaml").write_text(f"dns: {{mode: '{mode}'}}\ndata_dir: {tmp_path / 'doctor'}\n")
        proc = subprocess.run([sys.executable, "-m", "nstap", "doctor", "--json", "--config", str(tmp_path / f"doctor-{mode}.yaml")], capture_output=True,
                              text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(fake.parent)})
        [dns] = [c for c in json.loads(proc.stdout)["checks"] if c["feature"] == "dns"]
        assert (dns["check"], dns["status"]) == ("DNS program", status) and "bcc is not importable" in dns["detail"], dns
        assert "eBPF checks above" in dns["fix"] and proc.returncode == code, (proc.returncode, proc.stdout)


@pytest.mark.docker
def test_an_interface_added_later_gets_its_links(nstap, docker_network, containers, docker_image: str) -> None:
    """``docker network connect`` gives a running container a new interface: its next sample shows
    it, and the lookups that leave through it are counted."""
    net, gateway = docker_network
    d = nstap(DNS_ON)
    cid = containers.docker(docker_image, *SLEEP, name="dnslater")
    before = attached(d, cid)["interfaces"]  # lo, eth0 (and tunl0, sit0 where those modules are loaded)
    assert before >= 2
    # read before the connect: a sample taken between the connect and a later read links eth1 first
    sh("docker", "network", "connect", net, cid)
    d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=cid[:12], interface="eth1"), 10, "eth1 sampled")
    wait_until(lambda: dns_view(d, cid)["interfaces"] == before + 1, 10, 0.2, "links on eth1")
    pid = containers.pid("docker", cid)
    with host_dns_server(gateway):
        def counted():
            ask_in(pid, gateway, "later.test", 1)
            return sum(requests_of(dns_view(d, cid)).values())
        wait_until(counted, 10, 0.5, f"a lookup through eth1 counted {[e for e in d.logs() if e.get('level') in ('warning', 'error')]}")
    n = sum(requests_of(dns_view(d, cid)).values())
    with host_dns_server(gateway):
        assert ask_in(pid, gateway, "later.test", 3) == ["NOERROR"] * 3
    assert sum(requests_of(dns_view(d, cid)).values()) == n + 3
