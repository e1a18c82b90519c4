"""Handles and samplers against real network namespaces made by the test (ip netns + a veth pair)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import math
import operator
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from conftest import NsUnderTest, held_at_a_closed_gate, ping, sh, tool, wait_until
from nstap.instruments import Instruments
from nstap.netns.handles import NamespaceGone, NamespaceOpener
from nstap.netns.links import parse_net_dev
from nstap.registry import ContainerRegistry, WatchedNamespace
from nstap.runtime.records import ContainerRecord
from nstap.samplers import SAMPLERS, HostLinks, SamplerContext
from nstap.samplers.interfaces import InterfaceSampler
from nstap.samplers.protocols import ProtocolSampler
from nstap.samplers.sockets import SocketSampler
from nstap.samples import SampleStore
from nstap.watcher import NamespaceWatcher, WatcherPool
from prometheus_client import CollectorRegistry


@pytest.fixture
def opener() -> Iterator[NamespaceOpener]:
    o = NamespaceOpener()
    yield o
    o.close()


async def test_handles_bind_to_the_namespace_not_the_opener(netns: NsUnderTest, opener: NamespaceOpener) -> None:
    handles = await opener.open(netns.pid)
    try:
        assert handles.inode == os.stat(f"/run/netns/{netns.name}").st_ino
        seen = parse_net_dev(handles.proc["dev"].read())
        direct = parse_net_dev(open(f"/proc/{netns.pid}/net/dev", "rb").read())
        assert set(seen) == set(direct) == {"lo", "eth0"}
        # The opener thread came back: our own handles still see the host's interfaces.
        home = opener.open_home()
        try:
            assert netns.host_if in parse_net_dev(home.proc["dev"].read())
        finally:
            home.close()
    finally:
        handles.close()


async def test_open_refuses_a_pid_in_another_namespace(netns: NsUnderTest, opener: NamespaceOpener) -> None:
    with pytest.raises(NamespaceGone):
        await opener.open(netns.pid, expect_inode=12345)
    with pytest.raises(NamespaceGone):
        await opener.open(2**22 + 12345)  # no such process


async def test_interfaces_both_sides_of_the_veth_match_proc(netns: NsUnderTest, opener: NamespaceOpener) -> None:
    handles = await opener.open(netns.pid)
    host = HostLinks(opener.open_home())
    try:
        sampler = InterfaceSampler(handles, host)
        before = {(i.name, i.side): i for i in sampler.sample()}
        assert before[("eth0", "container")].peer == netns.host_if
        assert before[(netns.host_if, "host")].peer == "eth0"
        assert before[("eth0", "container")].up and before[("eth0", "container")].mtu == 1500
        ping(netns.ns_ip, 20)
        host.new_round()
        after = {(i.name, i.side): i for i in sampler.sample()}
        c0, c1 = before[("eth0", "container")], after[("eth0", "container")]
        h0, h1 = before[(netns.host_if, "host")], after[(netns.host_if, "host")]
        assert c1.rx_packets - c0.rx_packets >= 20 and c1.tx_packets - c0.tx_packets >= 20
        assert h1.tx_packets - h0.tx_packets >= 20 and h1.rx_packets - h0.rx_packets >= 20
        direct = parse_net_dev(open(f"/proc/{netns.pid}/net/dev", "rb").read())["eth0"]
        assert direct[1] >= c1.rx_packets and direct[1] - c1.rx_packets < 5
        # Down on the host side: seen at the next sample through the link-change notification.
        sh(tool("ip"), "link", "set", netns.host_if, "down")
        await asyncio.sleep(0.1)  # the event loop reads the notification, as between two samples
        host.new_round()
        down = {(i.name, i.side): i for i in sampler.sample()}
        assert not down[(netns.host_if, "host")].up
        assert not down[("eth0", "container")].up  # carrier lost on the container side too
    finally:
        handles.close()
        host.close()


async def test_link_changes_are_applied_without_dumping_every_interface(netns: NsUnderTest, opener: NamespaceOpener) -> None:
    """Defect: every announced link change made the next sample dump every interface of the
    namespace again (1,000 interfaces: 20-30 ms of the event loop per sample of a container that
    churns them). The announcements carry the metadata: the table kept from them equals a fresh
    dump, bridge-port announcements (partial metadata, a DELLINK when a port only leaves its
    bridge) included, after one dump only; a lost announcement (over the cap) means one more dump."""
    from nstap.netns import links as links_module
    from nstap.netns.links import LinkTable
    from nstap.netns.netlink import dump_links

    handles = await opener.open(netns.pid)
    table = LinkTable(handles.rtnl, handles.rtnl_events, handles.proc["dev"])
    table.follow(asyncio.get_running_loop())
    ip = ["ip", "netns", "exec", netns.name, tool("ip")]

    def batch(text: str) -> None:
        subprocess.run([*ip, "-force", "-batch", "-"], input=text, text=True, check=True, capture_output=True, timeout=30)

    def fresh() -> dict:
        return {link.name: link for link in dump_links(handles.rtnl)}

    try:
        batch("link add br0 type bridge\nlink set br0 up\n" + "".join(f"link add a{i} type veth peer name b{i}\nlink set a{i} master br0\nlink set a{i} up\n" for i in range(30)))
        await asyncio.sleep(0.1)
        table.refresh()
        for step in range(4):
            batch("".join(f"link add c{step}x{i} type veth peer name d{step}x{i}\nlink set c{step}x{i} up\n" for i in range(10))
                  + "".join(f"link del c{step - 1}x{i}\n" for i in range(10) if step)
                  + f"link set a{step} nomaster\nlink set a{step} mtu 1400\nlink set b{step} name r{step}\n")
            await asyncio.sleep(0.1)  # the event loop keeps the announcements, as between two samples
            assert table.refresh()
            assert table.links() == fresh(), step
        other = f"{netns.name}-other"
        sh(tool("ip"), "netns", "add", other)
        try:  # a veth end moving away changes the other end's IFLA_LINK_NETNSID unannounced
            batch("link add m0 type veth peer name m1\n")
            await asyncio.sleep(0.1)
            table.refresh()
            batch(f"link set m1 netns {other}\n")
            await asyncio.sleep(0.1)
            assert table.refresh() and table.links() == fresh() and table.links()["m0"].link_netnsid >= 0
        finally:
            sh(tool("ip"), "netns", "del", other)
        assert table.dumps == 1 and table.links()["a0"].mtu == 1400 and table.links()["a5"].kind == "veth" and "r1" in table.links()
        # What the loop spent receiving them is the namespace's, taken once (charged to its next sample).
        assert table.take_notified_cpu() > 0 and table.take_notified_cpu() == 0
        assert not table.refresh()
        links_module.CHANGES_CAP, cap = 2000, links_module.CHANGES_CAP
        try:
            batch("".join(f"link set a{i} down\n" for i in range(10, 30)))
            await asyncio.sleep(0.1)
        finally:
            links_module.CHANGES_CAP = cap
        assert table.refresh() and table.dumps == 2 and table.links() == fresh() and not table.links()["a20"].up
    finally:
        table.close()
        handles.close()


LISTENER = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8123))
s.listen(2)
print("listening", flush=True)
time.sleep(120)
"""


async def test_accept_queue_fills_and_overflows(netns: NsUnderTest, opener: NamespaceOpener) -> None:
    listener = subprocess.Popen([tool("ip"), "netns", "exec", netns.name, sys.executable, "-c", LISTENER], stdout=subprocess.PIPE, text=True)
    clients: list[socket.socket] = []
    handles = await opener.open(netns.pid)
    try:
        assert listener.stdout.readline().strip() == "listening"
        sockets = SocketSampler(handles, interval=1.0, walk_budget=1.0, max_walk_interval=60.0, max_ports=64)
        protocols = ProtocolSampler(handles)
        first = sockets.sample()
        assert [(q.port, q.length, q.limit) for q in first.listen] == [("8123", 0, 2)]
        overflows_before = protocols.sample()["tcp_listen_overflows"]
        for _ in range(8):  # a listener with backlog 2 that never accepts
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex((netns.ns_ip, 8123))
            clients.append(c)
        await asyncio.sleep(1.5)  # let the kernel complete (and drop) handshakes
        sample = sockets.sample()
        assert [(q.port, q.length, q.limit) for q in sample.listen] == [("8123", 3, 2)]  # backlog + 1
        assert protocols.sample()["tcp_listen_overflows"] > overflows_before
        # Sockets other than listeners exist now (request sockets), at a second sample too: the
        # walk is wanted and counts them.
        assert not sockets.walk_due()
        sockets.sample()
        assert sockets.walk_due()
        result = sockets.walk()
        sockets.walk_done(result)
        assert result[0]["syn_recv"] + result[0]["established"] >= 3
        assert sockets.sample().tcp_states["listen"] == 1
    finally:
        for c in clients:
            c.close()
        listener.kill()
        listener.wait()
        handles.close()


# LISTENER on port 8125, holding each connection until its client closes it, then closing it too
SERVER = LISTENER.replace("8123", "8125").replace("time.sleep(120)\n", """import select
conns = []
while True:
    ready, _, _ = select.select([s, *conns], [], [], 120)
    if not ready:
        break
    for r in ready:
        if r is s:
            conns.append(s.accept()[0])
        elif not r.recv(1):
            conns.remove(r)
            r.close()
""")


async def test_a_scheduled_walk_waits_for_sockets_seen_at_two_samples(netns: NsUnderTest, opener: NamespaceOpener) -> None:
    """A connection seen at one sample only (a request served between two samples) is not worth a
    walk of the host's hash, which would find it gone; one still there at the next sample is
    walked; retried SYNs (walk_soon) walk at the first sight."""
    server = subprocess.Popen([tool("ip"), "netns", "exec", netns.name, sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    handles = await opener.open(netns.pid)
    clients: list[socket.socket] = []

    def tcp_in_use(count: int) -> None:
        """Wait (5 s at most) until the namespace has ``count`` TCP sockets in use (sockstat)."""
        in_use = lambda: int(handles.proc["sockstat"].read().split(b"TCP: inuse ")[1].split()[0])  # noqa: E731
        wait_until(lambda: in_use() == count, 5, 0.02, f"{count} TCP sockets in use in the namespace")

    def connected() -> None:
        clients.append(socket.create_connection((netns.ns_ip, 8125), timeout=5))
        tcp_in_use(2)  # the listener and the connection

    def closed() -> None:
        clients.pop().close()
        tcp_in_use(1)  # the server closed its end: only the listener is left

    try:
        assert server.stdout.readline().strip() == "listening"
        sockets = SocketSampler(handles, interval=1.0, walk_budget=1.0, max_walk_interval=60.0, max_ports=64)
        sockets.sample()
        assert not sockets.walk_families and not sockets.walk_due()
        connected()
        sockets.sample()
        assert sockets.walk_families and not sockets.walk_due()  # seen once
        closed()
        sockets.sample()
        assert not sockets.walk_families and not sockets.walk_due()
        connected()
        sockets.sample()
        assert not sockets.walk_due()  # seen once again: the earlier sighting does not count
        sockets.sample()
        assert sockets.walk_due()  # still there at the next sample
        counts, _, _ = sockets.walk()
        assert counts["established"] == 1, counts
        closed()
        sockets.sample()
        connected()
        sockets.walk_soon()
        sockets.sample()
        assert sockets.walk_due()  # retried SYNs: at once
    finally:
        for c in clients:
            c.close()
        server.kill()
        server.wait()
        handles.close()


async def test_listeners_are_followed_by_lookups_and_rediscovered(netns: NsUnderTest, opener: NamespaceOpener, monkeypatch) -> None:
    from nstap.netns import netlink

    calls: list[str] = []
    real_dump, real_lookup = netlink.dump_inet, netlink.lookup_inet
    monkeypatch.setattr(netlink, "dump_inet", lambda *a: calls.append("dump") or real_dump(*a))
    monkeypatch.setattr(netlink, "lookup_inet", lambda *a: calls.append("lookup") or real_lookup(*a))
    handles = await opener.open(netns.pid)
    listeners = []
    try:
        sockets = SocketSampler(handles, interval=1.0, walk_budget=1.0, max_walk_interval=60.0, max_ports=64)
        listeners.append(subprocess.Popen([tool("ip"), "netns", "exec", netns.name, sys.executable, "-c", LISTENER], stdout=subprocess.PIPE, text=True))
        assert listeners[0].stdout.readline().strip() == "listening"
        assert [q.port for q in sockets.sample().listen] == ["8123"] and calls == ["dump"]
        calls.clear()
        for _ in range(3):  # nothing changed: one hash probe per known listener, no dump
            assert [(q.port, q.limit) for q in sockets.sample().listen] == [("8123", 2)]
        assert calls == ["lookup"] * 3
        # A second listener: more sockets in use than known listeners, so the hash is dumped again.
        second = LISTENER.replace("8123", "8124")
        listeners.append(subprocess.Popen([tool("ip"), "netns", "exec", netns.name, sys.executable, "-c", second], stdout=subprocess.PIPE, text=True))
        assert listeners[1].stdout.readline().strip() == "listening"
        calls.clear()
        assert sorted(q.port for q in sockets.sample().listen) == ["8123", "8124"] and calls == ["dump"]
        # One goes away: its lookup fails, the hash is dumped again, the other is still there.
        listeners[0].kill()
        listeners[0].wait()
        calls.clear()
        assert [q.port for q in sockets.sample().listen] == ["8124"]
        assert "dump" in calls and not sockets.walk_due()
    finally:
        for p in listeners:
            p.kill()
            p.wait()
        handles.close()


def test_a_lookup_answered_as_before_is_not_parsed_again(monkeypatch) -> None:
    """The kernel answers a lookup of several listeners with one datagram each: each received byte
    for byte as at the last lookup is not parsed again, and when all are, the last list is the
    answer (the socket sampler then returns its last sample). Three listeners on the host's
    loopback, from this process."""
    from nstap.netns import netlink

    held: list[socket.socket] = []
    diag = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4)  # NETLINK_SOCK_DIAG
    try:
        for _ in range(3):
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(4)
            held.append(listener)
        ports = [s.getsockname()[1] for s in held]
        found = {d.port: d for d in netlink.dump_inet(diag, socket.AF_INET, socket.IPPROTO_TCP, 1 << 10) if d.port in ports}
        request = netlink.LookupRequest(socket.AF_INET, socket.IPPROTO_TCP, 1 << 10, [found[port].sockid for port in ports])
        parsed: list[int] = []
        real = netlink._lookup_answers
        monkeypatch.setattr(netlink, "_lookup_answers", lambda *a: parsed.append(1) or real(*a))
        first = netlink.lookup_inet(diag, request)
        assert [a.port for a in first] == ports and len(parsed) == 3  # one datagram per listener
        parsed.clear()
        assert netlink.lookup_inet(diag, request) is first and parsed == []
        # A connection waits in the second one's accept queue: that answer alone is parsed again.
        held.append(socket.create_connection(("127.0.0.1", ports[1]), timeout=2))
        wait_until(lambda: netlink.lookup_inet(diag, request)[1].rqueue == 1, 2)
        parsed.clear()
        moved = netlink.lookup_inet(diag, request)
        assert moved is not first and [a.rqueue for a in moved] == [0, 1, 0]
        assert moved[0] is first[0] and moved[2] is first[2] and parsed == []  # the same parts as the lookup just before
        held[0].close()  # gone: its answer is None, the others are as they were
        gone = netlink.lookup_inet(diag, request)
        assert gone[0] is None and gone[1:] == moved[1:] and parsed == [1]
    finally:
        for s in held:
            s.close()
        diag.close()


async def test_a_port_bound_to_loopback_only_is_told_apart(netns: NsUnderTest, opener: NamespaceOpener) -> None:
    """A port whose every listener is bound to 127.0.0.1 or ::1 is flagged (a published port's
    connections cannot reach it); one that also listens elsewhere, or on every address, is not."""
    script = LISTENER.replace('s = socket.socket()\n', "").replace('s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(("0.0.0.0", 8123))\ns.listen(2)\n', """
kept = []
for family, address, port in ((socket.AF_INET, "127.0.0.1", 8201), (socket.AF_INET6, "::1", 8202), (socket.AF_INET, "0.0.0.0", 8203),
                              (socket.AF_INET, "127.0.0.1", 8204), (socket.AF_INET6, "::", 8204)):
    s = socket.socket(family)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((address, port))
    s.listen(2)
    kept.append(s)
""")
    listener = subprocess.Popen([tool("ip"), "netns", "exec", netns.name, sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    handles = await opener.open(netns.pid)
    try:
        assert listener.stdout.readline().strip() == "listening"
        sockets = SocketSampler(handles, interval=1.0, walk_budget=1.0, max_walk_interval=60.0, max_ports=64)
        got = {q.port: (q.sockets, q.loopback) for q in sockets.sample().listen}
        assert got == {"8201": (1, True), "8202": (1, True), "8203": (1, False), "8204": (2, False)}, got
    finally:
        listener.kill()
        listener.wait()
        handles.close()


async def test_idle_namespace_needs_no_walk(netns: NsUnderTest, opener: NamespaceOpener) -> None:
    handles = await opener.open(netns.pid)
    try:
        sockets = SocketSampler(handles, interval=1.0, walk_budget=0.00005, max_walk_interval=60.0, max_ports=64)
        sample = sockets.sample()
        assert not sockets.walk_due()
        assert sample.tcp_states["established"] == 0 and sample.listen == ()
        # A walk asked for by retried SYNs while there is nothing to walk is not kept: a scheduled
        # walk much later would otherwise pass the host's walk budget as a fault's (nstap.walks).
        sockets.walk_soon()
        sockets.sample()
        assert not sockets.urgent
    finally:
        handles.close()


def make_pool(opener: NamespaceOpener, host: HostLinks | None) -> tuple[WatcherPool, SampleStore, CollectorRegistry]:
    store = SampleStore()
    prom = CollectorRegistry()
    context = SamplerContext(interval=0.2, host_links=host, walk_budget=0.00005, max_walk_interval=60.0, max_listen_ports=64)
    pool = WatcherPool(ContainerRegistry(), opener, list(SAMPLERS.values()), context, store, Instruments(prom))
    return pool, store, prom


def namespace_for(netns: NsUnderTest) -> WatchedNamespace:
    record = ContainerRecord(id="ab" * 32, name="t", runtime="test", pid=netns.pid, status="running", image="i")
    record = record.with_netns(os.stat(f"/proc/{netns.pid}/ns/net").st_ino, 0)
    return WatchedNamespace(record.netns, record, (record,))


async def test_vanishing_namespace_yields_skipped_samples_not_exceptions(netns: NsUnderTest, opener: NamespaceOpener) -> None:
    """A container that disappears mid-sample: its reads fail; the sample is skipped and counted."""
    pool, store, prom = make_pool(opener, None)
    watcher = NamespaceWatcher(namespace_for(netns), pool)
    watcher.handles = await opener.open(netns.pid)
    watcher.samplers = [spec.factory(watcher.handles, pool.context) for spec in pool.specs]
    assert watcher.sample_once() is not None
    # Pull every descriptor out from under the samplers, as a vanished namespace would.
    for sampler in watcher.samplers:
        getattr(sampler, "close", lambda: None)()  # (its notifications are no longer watched)
    watcher.handles.close()
    for _ in range(2):
        sample = watcher.sample_once()
        # What reads the kernel at every sample fails and is skipped; the firewall sampler, which
        # reads only when told of a commit, keeps its last answer.
        assert sample is not None and sample.interfaces is sample.protocols is sample.sockets is None
        assert sample.failed == ("interfaces", "protocols", "sockets")
    for name in ("interfaces", "protocols", "sockets"):
        assert prom.get_sample_value("nstap_sampler_errors_total", {"sampler": name}) == 2


async def test_attach_detach_cycles_leak_nothing(netns: NsUnderTest, opener: NamespaceOpener) -> None:
    host = HostLinks(opener.open_home())
    pool, store, _ = make_pool(opener, host)
    ns = namespace_for(netns)
    try:
        # Garbage of earlier tests (a socket in a cycle) is freed now, not by a collection during
        # the cycles below: the count fell from 42 to 37 once in CI.
        gc.collect()
        fds_before = len(os.listdir("/proc/self/fd"))
        tasks_before = len(asyncio.all_tasks())
        for _ in range(300):
            watcher = NamespaceWatcher(ns, pool)
            task = asyncio.create_task(watcher.run())
            while store.get(ns.inode) is None:
                await asyncio.sleep(0.001)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert store.get(ns.inode) is None
        gc.collect()
        assert len(os.listdir("/proc/self/fd")) == fds_before
        assert len(asyncio.all_tasks()) == tasks_before
    finally:
        await pool.stop()
        host.close()


async def test_watcher_samples_on_its_interval(netns: NsUnderTest, opener: NamespaceOpener) -> None:
    pool, store, prom = make_pool(opener, None)
    seen: list[float] = []
    store.subscribe(lambda s: seen.append(s.taken_at))
    reads: list[float | None] = []  # when the eBPF counts each sample carries were read
    store.subscribe(lambda s: reads.append(s.kernel_drops_at))
    pool.kernel_drops_at = lambda: 1234.5
    task = asyncio.create_task(NamespaceWatcher(namespace_for(netns), pool).run())
    try:
        await asyncio.sleep(1.05)
        assert 5 <= len(seen) <= 7  # at attach, then on every 0.2 s tick
        assert set(reads) == {1234.5}
        gaps = [b - a for a, b in zip(seen, seen[1:])]
        assert 0 <= gaps[0] <= 0.25 and all(0.15 < g < 0.25 for g in gaps[1:]), gaps
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert prom.get_sample_value("nstap_watcher_detaches_total") == 1
    assert time.time() - seen[-1] < 1


class FailingOpener(NamespaceOpener):
    """The real opener, made to fail its first ``failures`` opens with ``errno`` (fault injection:
    a host out of descriptors cannot be arranged for one namespace only)."""

    def __init__(self, failures: int, err: int) -> None:
        super().__init__()
        self.failures = failures
        self.err = err
        self.calls = 0

    async def open(self, pid: int, expect_inode: int | None = None):
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(self.err, os.strerror(self.err))
        return await super().open(pid, expect_inode)


async def test_a_watcher_that_could_not_attach_is_retried(netns: NsUnderTest) -> None:
    """Defect: a failed attach returned for good, and reconciliation skipped the namespace after."""
    import errno

    opener = FailingOpener(failures=3, err=errno.EMFILE)  # every attempt of the first watcher fails
    pool, store, prom = make_pool(opener, None)
    ns = namespace_for(netns)
    pool.registry.upsert(ns.owner)
    pool.start()
    try:
        for _ in range(60):
            if store.get(ns.inode) is not None:
                break
            await asyncio.sleep(0.1)
        assert store.get(ns.inode) is not None, "the namespace was never attached after its first watcher failed"
        assert opener.calls == 4 and ns.inode in pool.watched() and pool.netns_fd(ns.inode) is not None
        assert prom.get_sample_value("nstap_sampler_errors_total", {"sampler": "attach"}) == 1
    finally:
        await pool.stop()
        opener.close()


class BrokenOnce:
    """A sampler that raises an unexpected error on its first sample (fault injection: a bug)."""

    name = "broken"

    def __init__(self) -> None:
        self.calls = 0

    def sample(self):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bug in the first sample")
        return None


async def test_the_first_sample_is_guarded_like_the_others(netns: NsUnderTest, opener: NamespaceOpener) -> None:
    """Defect: the first sample ran outside the ticker's guard; a bug in it killed the watcher."""
    from nstap.samplers import SamplerSpec
    from nstap.supervisor import TaskSupervisor

    store = SampleStore()
    prom = CollectorRegistry()
    context = SamplerContext(interval=0.2, host_links=None, walk_budget=0.00005, max_walk_interval=60.0, max_listen_ports=64)
    broken = BrokenOnce()
    specs = [*SAMPLERS.values(), SamplerSpec("broken", True, "fails once", lambda h, ctx: broken)]
    supervisor = TaskSupervisor()
    pool = WatcherPool(ContainerRegistry(), opener, specs, context, store, Instruments(prom), supervisor)
    ns = namespace_for(netns)
    pool.registry.upsert(ns.owner)
    pool.start()
    try:
        for _ in range(50):
            if broken.calls >= 3:
                break
            await asyncio.sleep(0.05)
        assert broken.calls >= 3 and ns.inode in pool.watched()  # sampled on after the first failed
        assert supervisor.failures["sample"] == 1
    finally:
        await pool.stop()


# -- the sample budget ----------------------------------------------------------------------------


class Burner:
    """A sampler whose sample burns ``ms`` of CPU while ``on`` (fault injection: a namespace whose
    state is expensive to read, without building one)."""

    name = "burner"

    def __init__(self) -> None:
        self.on = False
        self.ms = 6.0
        self.left: int | None = None  # samples to burn before it goes off by itself (None: while on)
        self.items = 1000  # what its state holds while on (work(): more than an ordinary namespace)

    def sample(self):
        if self.on:
            if self.left is not None:
                self.left -= 1
                self.on = self.left > 0
            end = time.thread_time() + self.ms / 1000
            while time.thread_time() < end:
                pass
        return None

    def load(self) -> str:
        return "a burner"

    def work(self) -> int:
        return self.items if self.on else 0


def budget_pool(opener: NamespaceOpener, extra: list, budget: float = 0.002) -> tuple[WatcherPool, SampleStore]:
    from nstap.samplers import SamplerSpec

    store = SampleStore()
    context = SamplerContext(interval=0.1, host_links=None, walk_budget=0.00005, max_walk_interval=60.0, max_listen_ports=64, sample_budget=budget)
    specs = [*SAMPLERS.values(), *(SamplerSpec(s.name, True, "test", lambda h, ctx, s=s: s) for s in extra)]
    return WatcherPool(ContainerRegistry(), opener, specs, context, store, Instruments(CollectorRegistry())), store


def gil_hog(stop) -> None:
    """Pure-Python work in another thread: it takes the GIL from the event loop in 5 ms slices, as
    the daemon's own threads do (NAT rules parsed, a ring read back)."""
    while not stop.is_set():
        sum(i * i for i in range(20000))


async def test_the_budget_judges_the_namespace_cpu_not_the_daemon_busy_elsewhere(netns: NsUnderTest, opener: NamespaceOpener) -> None:
    """Defect: the budget measured a sample's wall time, which counts the time the event loop waits
    for the GIL while another thread of the daemon works. An ordinary namespace was judged
    expensive and sampled every 3-6 s whenever the daemon was busy."""
    import threading

    from structlog.testing import capture_logs

    pool, store = budget_pool(opener, [])
    ns = namespace_for(netns)
    seen: list[float] = []
    store.subscribe(lambda s: seen.append(time.monotonic()))
    ticks: list[float] = []
    pool.ticker.hooks.append(lambda: ticks.append(time.monotonic()))
    stop = threading.Event()
    hogs = [threading.Thread(target=gil_hog, args=(stop,)) for _ in range(2)]
    with capture_logs() as logs:
        for hog in hogs:
            hog.start()
        pool.registry.upsert(ns.owner)
        pool.start()
        try:
            await asyncio.sleep(3)
        finally:
            stop.set()
            for hog in hogs:
                hog.join()
            # Counted before the pool stops: a tick that fires while it stops finds its watcher gone.
            ticked, sampled = len(ticks), len(seen)
            await pool.stop()
    watcher_events = [e for e in logs if e["event"] in ("sampling_slowed", "sampling_restored")]
    assert not watcher_events, watcher_events
    # Sampled on every tick the pool ran (the first sample, at attach, comes before them). How
    # many ticks ran is the host's business: the hogs hold the GIL for 5 ms slices, and on a
    # busy CI host 24 of 30 came within the 3 s. A namespace judged expensive would be sampled on
    # every second tick or fewer.
    assert ticked >= 10, ticks
    assert sampled >= ticked + 1, (sampled, ticked)


async def watched_beside(opener: NamespaceOpener, netns: NsUnderTest, burner: Burner) -> tuple[WatcherPool, NamespaceWatcher, list[float]]:
    """A pool sampling ``netns`` every 0.1 s with the real samplers and ``burner``, on a 5 ms
    budget (15 ms burns against it: the real samplers of an idle namespace take 0.3-1.5 ms of a
    sample here, more now and then); its watcher once attached, and the times of its samples."""
    pool, store = budget_pool(opener, [burner], budget=0.005)
    ns = namespace_for(netns)
    seen: list[float] = []
    store.subscribe(lambda s: seen.append(time.monotonic()))
    pool.registry.upsert(ns.owner)
    pool.start()
    await asyncio.sleep(0.5)
    return pool, pool.watchers[ns.inode].watcher, seen


async def test_a_namespace_is_slowed_on_sustained_cost_and_restored_at_once(netns: NsUnderTest, opener: NamespaceOpener) -> None:
    """One expensive sample does not slow a namespace (a first sample, a garbage collection); three
    in a row do, and the log says which sampler costs and what it reads; one cheap sample restores it."""
    from structlog.testing import capture_logs

    # 15 ms against the 5 ms budget: slowed to every ceil((15 + the real samplers' part) / 5) = 4 ticks.
    burner = Burner()
    burner.ms = 15.0
    with capture_logs() as logs:
        pool, watcher, seen = await watched_beside(opener, netns, burner)
        try:
            # Two expensive samples in a row: not sustained (counted, not timed: a late wake-up of
            # this test would let a third in).
            burner.left, burner.on = 2, True
            while burner.on:
                await asyncio.sleep(0.02)
            burner.left = None
            await asyncio.sleep(0.4)
            assert watcher.every == 1 and not [e for e in logs if e["event"] == "sampling_slowed"]
            # Sustained: 15 ms (and the real samplers' part) against a 5 ms budget -> every 4th tick.
            burner.on = True
            await asyncio.sleep(1.5)
            every = watcher.every
            assert every == 4, every
            slowed = [e for e in logs if e["event"] == "sampling_slowed"]
            assert len(slowed) == 1 and slowed[0]["interval"] == pytest.approx(0.4), slowed
            assert slowed[0]["cause"].startswith("burner ") and slowed[0]["cause"].endswith(": a burner"), slowed
            n = len(seen)
            await asyncio.sleep(1.2)
            assert 2 <= len(seen) - n <= 4  # every 0.4 s
            # Cheap again: restored at its next sample.
            burner.on = False
            await asyncio.sleep(0.55)
            assert watcher.every == 1
            assert [e["event"] for e in logs if e["event"].startswith("sampling_")] == ["sampling_slowed", "sampling_restored"]
            n = len(seen)
            await asyncio.sleep(0.5)
            assert len(seen) - n >= 4
        finally:
            await pool.stop()


async def test_an_ordinary_namespace_is_never_slowed_whatever_its_samples_cost(netns: NsUnderTest, opener: NamespaceOpener) -> None:
    """A namespace whose samples cost more than the budget in CPU while it holds no more than an
    ordinary one (ORDINARY_WORK: here a few listeners and interfaces) is sampled at every tick: its
    cost is the machine's (caches gone cold between ticks on a VM, where the first reads of an
    idle busybox container's files took 0.2-1.2 ms) and not its own. The same cost with much
    work behind it is slowed (the test above)."""
    from structlog.testing import capture_logs

    from nstap.watcher import ORDINARY_WORK

    burner = Burner()
    burner.items = 0  # the cost of a cold machine, not of the namespace's state
    with capture_logs() as logs:
        pool, watcher, seen = await watched_beside(opener, netns, burner)
        try:
            burner.on = True
            await asyncio.sleep(1.0)
            n = len(seen)
            await asyncio.sleep(1.0)
            assert watcher.every == 1 and watcher.work <= ORDINARY_WORK and min(watcher.costs) > 0.005, (watcher.every, watcher.work, list(watcher.costs))
            assert len(seen) - n >= 8  # every 0.1 s tick
            assert not [e for e in logs if e["event"] == "sampling_slowed"]
        finally:
            burner.on = False
            await pool.stop()


class Announcer:
    """A sampler whose namespace made the loop spend ``ms`` of CPU on its link announcements
    between two samples while ``on`` (fault injection: what take_loop_cpu reports of a namespace
    that churns links; the real LinkTable's measure is tested above)."""

    name = "announcer"

    def __init__(self) -> None:
        self.on = False

    def sample(self):
        return None

    def take_loop_cpu(self) -> float:
        return 0.006 if self.on else 0.0

    def work(self) -> int:
        return 200 if self.on else 0  # announcements between two samples


async def test_link_announcements_between_samples_are_charged_to_the_namespace(netns: NsUnderTest, opener: NamespaceOpener) -> None:
    """Defect: the loop's work on a namespace's link announcements, done between its samples, was
    charged to nobody: a container churning links cost the loop without ever being slowed."""
    from structlog.testing import capture_logs

    announcer = Announcer()
    pool, _store = budget_pool(opener, [announcer])
    ns = namespace_for(netns)
    with capture_logs() as logs:
        pool.registry.upsert(ns.owner)
        pool.start()
        try:
            await asyncio.sleep(0.5)
            watcher = pool.watchers[ns.inode].watcher
            assert watcher.every == 1
            announcer.on = True
            await asyncio.sleep(1.0)
            assert watcher.every >= 3, watcher.every
            slowed = [e for e in logs if e["event"] == "sampling_slowed"]
            assert len(slowed) == 1 and slowed[0]["cause"] == "interfaces 6.0 ms: link announcements between samples", slowed
        finally:
            await pool.stop()


async def test_firewall_sampler_is_told_of_changes_and_asks_nothing_otherwise(netns: NsUnderTest, opener: NamespaceOpener, monkeypatch) -> None:
    """An unchanged firewall costs no request per sample (the namespace's nftables notifications say
    when to ask); a commit there, iptables-nft or native nft, is seen at the next sample; legacy
    tables are noticed within LEGACY_EVERY samples."""
    from nstap.netns import netlink
    from nstap.samplers import firewall

    asked = []
    real = netlink.nft_generation
    monkeypatch.setattr(firewall.netlink, "nft_generation", lambda sock: asked.append(1) or real(sock))  # counts the requests
    handles = await opener.open(netns.pid)
    sampler = firewall.FirewallSampler(handles)
    try:
        first = sampler.sample()
        assert len(asked) == 1 and first.generation >= 1 and not first.legacy
        for _ in range(25):
            await asyncio.sleep(0.01)
            assert sampler.sample() is first
        assert len(asked) == 1
        for command in (["nft", "add", "table", "inet", "mine"], ["iptables", "-A", "INPUT", "-p", "tcp", "--dport", "7", "-j", "DROP"]):
            sh("ip", "netns", "exec", netns.name, *command)
            await asyncio.sleep(0.05)  # the loop hears of it
            moved = sampler.sample()
            assert moved.generation > first.generation, (command, moved, first)
            first = moved
        # A commit of 20,000 rules overflows the small notification buffer: still one "changed".
        rules = "*filter\n" + "".join(f"-A INPUT -s 10.9.{i >> 8 & 255}.{i & 255}/32 -j DROP\n" for i in range(20000)) + "COMMIT\n"
        subprocess.run(["ip", "netns", "exec", netns.name, "iptables-restore"], input=rules, text=True, check=True, timeout=60)
        await asyncio.sleep(0.05)
        big = sampler.sample()
        assert big.generation > first.generation
        n = len(asked)
        await asyncio.sleep(0.05)
        assert sampler.sample() is big and len(asked) == n  # drained: quiet again
        # Legacy iptables does not notify: its tables are looked for every LEGACY_EVERY samples.
        sh("ip", "netns", "exec", netns.name, tool("iptables-legacy"), "-t", "filter", "-A", "INPUT", "-j", "ACCEPT")
        seen = [sampler.sample().legacy for _ in range(firewall.LEGACY_EVERY)]
        assert seen[-1] and len(asked) == n
    finally:
        sampler.close()
        handles.close()


class FakeWatcher:
    """What the ticker drives in a watcher (fault-free stand-in: a thousand namespaces cannot be
    made here cheaply; the real watcher is driven by the tests above)."""

    def __init__(self, ms: float) -> None:
        self.ms, self.skip, self.every, self.samples = ms, 0, 1, []

    def sample_guarded(self) -> None:
        end = time.perf_counter() + self.ms / 1000
        while time.perf_counter() < end:
            pass
        self.samples.append(time.monotonic())

    def account(self, cost: float) -> None:
        pass


async def tick_for(ticker, watchers, seconds: float) -> None:
    """Drive ``ticker`` over ``watchers`` for ``seconds``, then stop it."""
    for w in watchers:
        ticker.add(w)
    try:
        await asyncio.sleep(seconds)
    finally:
        ticker.close()


async def test_a_round_of_many_namespaces_leaves_the_loop_to_others_between_slices() -> None:
    """A round of 400 samples of 0.1 ms (40 ms) is cut into 5 ms slices: a callback the loop has
    to run meanwhile (a scrape, an API request, a runtime event) waits at most about a slice, and
    every namespace is still sampled once per tick. (The cyclic GC is held off while it is measured:
    in the whole suite's process, with the heap of 600 tests before it, a full collection alone
    held the loop 25 ms.)"""
    import gc

    from nstap.watcher import Ticker

    gc.collect()
    gc.disable()
    try:
        await _round_in_slices(Ticker(0.2))
    finally:
        gc.enable()


async def _round_in_slices(ticker) -> None:
    watchers = [FakeWatcher(0.1) for _ in range(400)]
    for w in watchers:
        ticker.add(w)
    loop = asyncio.get_running_loop()
    waits = []

    def probe(asked: float) -> None:
        waits.append(loop.time() - asked)

    due = ticker._due  # the first tick
    for k in range(1, 6):  # due while the round runs
        loop.call_at(due + 0.004 * k, probe, due + 0.004 * k)
    try:
        await asyncio.sleep(due - loop.time() + 0.5)
    finally:
        ticker.close()
    assert waits and max(waits) < 0.015, waits
    counts = {len(w.samples) for w in watchers}
    assert max(counts) - min(counts) <= 1 and min(counts) >= 2, counts
    firsts = sorted(w.samples[0] for w in watchers)
    assert firsts[-1] - firsts[0] < 0.2  # one round, spread over slices, within its interval


class ReadingWatcher(FakeWatcher):
    """A namespace's sample as the loop sees it: reads, each a system call that lets the GIL go."""

    def __init__(self, fd: int, reads: int) -> None:
        super().__init__(0)
        self.fd, self.reads, self.ended = fd, reads, []

    def sample_guarded(self) -> None:
        self.samples.append(time.perf_counter())
        for _ in range(self.reads):
            os.pread(self.fd, 65536, 0)
        self.ended.append(time.perf_counter())


async def test_a_round_is_not_slowed_by_python_in_worker_threads() -> None:
    """Defect: beside a worker thread running Python (a hostile container's firewall parsed), each
    read of the round let the GIL go and waited a switch interval (5 ms) to get it back: 300 reads,
    7 ms alone, took 150-400 ms, and ticks were skipped. The ticker closes the round's gate; the
    worker's loop waits at it (nstap.gate), and the round takes what it takes alone."""
    import threading

    from nstap.gate import ROUND
    from nstap.watcher import Ticker

    fd = os.open("/proc/self/net/snmp", os.O_RDONLY)
    stop = threading.Event()
    steps = [0]

    def worker() -> None:  # a parser's loop: Python all along, a pause between steps
        while not stop.is_set():
            ROUND.pause()
            sum(range(300))
            steps[0] += 1

    ticker = Ticker(0.1)
    watchers = [ReadingWatcher(fd, 30) for _ in range(10)]
    thread = threading.Thread(target=worker)
    thread.start()
    try:
        for w in watchers:
            ticker.add(w)
        await asyncio.sleep(1.5)
    finally:
        ticker.close()
        stop.set()
        thread.join()
        os.close(fd)
    rounds = sorted(last - first for first, last in zip(watchers[0].samples, watchers[-1].ended))
    assert len(rounds) >= 10 and rounds[len(rounds) // 2] < 0.03 and steps[0] > 1000, (rounds, steps)


async def test_a_round_longer_than_the_interval_is_late_not_skipped() -> None:
    """A host with more namespaces than one interval can sample: the next round starts as soon as
    the last one ends (and its lateness is counted), instead of waiting for the slot after the one
    it missed, which sampled every namespace every other interval (seen at 1,000 containers:
    31,339 of 60,000 samples)."""
    from nstap.instruments import LoopHistogram
    from nstap.watcher import Ticker

    lag = LoopHistogram("lag", "lag", (0.01, 0.05, 0.1), CollectorRegistry())
    ticker = Ticker(0.1, lag=lag)
    watchers = [FakeWatcher(1.3) for _ in range(100)]  # 130 ms a round
    await tick_for(ticker, watchers, 1.6)
    rounds = min(len(w.samples) for w in watchers)
    # Each round starts as the last one ends (its last sample), not at the slot after the one it
    # missed (up to 70 ms later); measured between rounds, so that other processes preempting
    # this thread (longer rounds) do not matter.
    idle = sorted(watchers[0].samples[k + 1] - watchers[-1].samples[k] for k in range(rounds - 1))
    assert rounds >= 6 and idle[len(idle) // 2] < 0.02, (rounds, idle)
    assert sum(lag.counts[1:]) >= rounds - 3  # late by more than 10 ms, and counted as such


async def test_the_done_hooks_are_told_the_room_left_before_the_next_tick() -> None:
    """A round's done hooks run after the next tick is armed, and ``room()`` is the time until it
    needs the loop again (its early hooks: EARLY before the tick): short after a round that
    filled most of the interval, long after a short one. The full collection uses it to wait for
    a round that leaves it room (nstap.heap; tests/test_heap.py). A tick starts with its early
    hooks (20 ms before its slot here) when nothing keeps it from it; else at its slot."""
    from nstap.watcher import Ticker

    for busy, lead in ((True, 0.02), (False, 0.0)):
        ticker = Ticker(0.2, idle=lambda busy=busy: not busy)
        assert ticker.room() == math.inf  # nothing armed
        rooms: list[tuple[float, float]] = []  # (the round's wall time, the room its done hooks were told)
        loop = asyncio.get_running_loop()
        started = [0.0]
        ticker.hooks.append(lambda started=started: started.__setitem__(0, loop.time()))
        ticker.done_hooks.append(lambda rooms=rooms, started=started, ticker=ticker: rooms.append((loop.time() - started[0], ticker.room())))
        watchers = [FakeWatcher(3.0) for _ in range(30)]  # 90 ms a round
        await tick_for(ticker, watchers, 1.1)
        assert len(rooms) >= 3, rooms
        for took, room in rooms:  # the next tick's early hooks are 200 ms after this one's, less the lead
            assert 0.0 <= room <= 0.2 - lead - took + 0.01, (busy, rooms)
        assert max(room for _, room in rooms) >= 0.03 + 0.02 - lead, rooms  # a round of 90 ms leaves about 90 ms (or 110)


async def test_the_early_hooks_result_is_what_the_ticks_samples_see() -> None:
    """A hook that reads in another thread (the eBPF map read, done when the loop next runs its
    callback) runs before the tick: each tick's samples see the read made for it, not the one of
    the tick before (the drop counts were one interval old: detection a sample late)."""
    from nstap.watcher import Ticker

    ticker = Ticker(0.2)
    loop = asyncio.get_running_loop()
    reads: list[int] = []  # the reads done, in order
    seen: list[tuple[int, int]] = []  # (tick, the latest read done when the tick's sample ran)
    ticks = 0

    def start_read() -> asyncio.Future:  # what EbpfService.new_round does: a worker thread, a done callback
        n = len(reads) + 1
        reading = loop.run_in_executor(None, time.sleep, 0.002)
        reading.add_done_callback(lambda _f: reads.append(n))
        return reading

    class Watcher(FakeWatcher):
        def sample_guarded(self) -> None:
            nonlocal ticks
            ticks += 1
            seen.append((ticks, reads[-1] if reads else 0))

    ticker.early_hooks.append(start_read)
    await tick_for(ticker, [Watcher(0.0)], 1.1)
    assert len(seen) >= 4, seen
    assert all(tick == read for tick, read in seen), seen
    assert ticker.joined == 0  # a read still running when its hook returned: the tick waits for its slot


async def test_a_tick_starts_with_its_early_hooks_when_their_reads_are_done_and_no_worker_is_busy() -> None:
    """Each wake-up of the event loop costs CPU of its own (docs/performance.md, "Wake-ups"): the
    loop woke EARLY before each tick for its early reads and again at the tick. Where those reads
    ran on the loop's own thread (nstap.threads.QuickJob: done as the hook returns) and no worker
    thread has a job that the round's gate would have to stop first, the tick starts in the same
    wake-up, after the reads' done callbacks (its samples see this round's read), its lag counted
    from then. A worker with a job, or a read not done, and the tick waits for its slot."""
    from nstap.instruments import LoopHistogram
    from nstap.threads import worker_threads, workers_idle
    from nstap.watcher import Ticker

    loop = asyncio.get_running_loop()
    busy = [False]
    reads: list[int] = []
    seen: list[tuple[float, int]] = []  # (when in the interval the tick's sample ran, the latest read done)

    def quick_read() -> asyncio.Future:  # a QuickJob run on the loop's thread: done at once
        done = loop.create_future()
        done.set_result(None)
        done.add_done_callback(lambda _f, n=len(reads) + 1: reads.append(n))
        return done

    class Watcher(FakeWatcher):
        def sample_guarded(self) -> None:
            seen.append((loop.time() % 0.2, reads[-1] if reads else 0))

    lag = LoopHistogram("lag", "test", (0.001, 0.01, 0.1), CollectorRegistry())
    ticker = Ticker(0.2, lag=lag, idle=lambda: not busy[0])
    ticker.early_hooks.append(quick_read)
    await tick_for(ticker, [Watcher(0.0)], 1.1)
    assert ticker.joined >= 4 and len(seen) >= 4, (ticker.joined, seen)
    assert all(0.2 - 0.02 - 0.005 <= at < 0.2 for at, _ in seen), seen  # 20 ms before the slot (a tenth of the interval)
    assert [n for _, n in seen] == list(range(1, len(seen) + 1)), seen  # each tick saw its own read
    assert lag.count >= 4 and sum(lag.counts[2:]) == 0, lag.counts  # started when due (its early hooks'), not 20 ms "late"

    # A tick that starts with its hooks is late by what kept it from starting then (here a hook
    # that holds the loop 12 ms), not early by the lead it took.
    lag = LoopHistogram("lag", "test", (0.001, 0.01, 0.1), CollectorRegistry())
    ticker = Ticker(0.2, lag=lag, idle=lambda: not busy[0])
    ticker.early_hooks += [lambda: time.sleep(0.012), quick_read]
    await tick_for(ticker, [Watcher(0.0)], 0.7)
    assert ticker.joined >= 2 and lag.counts[2] == lag.count >= 2, lag.counts

    busy[0] = True
    seen.clear()
    ticker = Ticker(0.2, idle=lambda: not busy[0])
    ticker.early_hooks.append(quick_read)
    await tick_for(ticker, [Watcher(0.0)], 0.7)
    assert ticker.joined == 0 and len(seen) >= 2 and all(at < 0.01 for at, _ in seen), seen  # at the slot

    # A hook that wakes something which gives a worker a job (the NAT monitor's tick, kicked by its
    # hook, starting a conntrack pass): that job gets the lead to reach the gate, the tick its slot.
    busy[0] = False
    seen.clear()

    class Freeing(Watcher):
        def sample_guarded(self) -> None:
            super().sample_guarded()
            busy[0] = False  # the job is done by the tick

    ticker = Ticker(0.2, idle=lambda: not busy[0])
    ticker.early_hooks += [lambda: loop.call_soon(busy.__setitem__, 0, True), quick_read]
    await tick_for(ticker, [Freeing(0.0)], 0.7)
    assert ticker.joined == 0 and len(seen) >= 2 and all(at < 0.01 for at, _ in seen), seen  # at the slot

    # What says that no worker is busy: every job given to the daemon's worker threads, until it
    # finished, failed or was cancelled before it began.
    pool = worker_threads("nstap-test")
    try:
        assert workers_idle()
        gate = threading.Event()
        running = pool.submit(gate.wait, 5)
        queued = pool.submit(time.sleep, 0)
        failing = pool.submit(operator.truediv, 1, 0)
        assert not workers_idle()
        assert queued.cancel()  # cancelled before it began: no longer counted
        gate.set()
        concurrent.futures.wait([running, failing], 5)
        wait_until(workers_idle, 5)  # (the done callbacks run right after the futures are done)
        assert isinstance(failing.exception(), ZeroDivisionError)
    finally:
        pool.shutdown()


async def test_an_early_read_slower_than_the_lead_starts_earlier_and_is_done_at_the_tick() -> None:
    """Defect: the early hooks ran EARLY (50 ms) before the tick whatever their reads took. At
    1,000 containers on a loaded host the eBPF map read took 30-100 ms of wall time: still running
    when the tick came, and the tick waited for it, 25-100 ms late. The ticker now times the reads
    a hook returns and runs the hooks LEAD_FACTOR times the longest recent one before the tick (at
    most a quarter of the interval), while the gate still closes EARLY before it; reads that are
    quick again bring the lead back. (A read stands in as a sleep in a worker thread: what is
    tested is when it starts, not what it reads.)"""
    from nstap.gate import RoundGate
    from nstap.watcher import Ticker

    class FewLeads(Ticker):
        LEADS = 3  # the test forgets slow reads in 3 reads instead of LEADS (128)

    gate = RoundGate()
    ticker = FewLeads(0.4, gate=gate)  # EARLY: 40 ms (a tenth); the lead at most 100 ms
    early = min(ticker.EARLY, ticker.interval / 10)
    loop = asyncio.get_running_loop()
    read_takes = [0.05]
    reads: list[int] = []
    seen: list[tuple[int, int, bool]] = []  # (tick, the latest read done, gate closed) at the tick's sample
    ticks = 0

    def start_read() -> asyncio.Future:
        n = len(reads) + 1
        reading = loop.run_in_executor(None, time.sleep, read_takes[0])
        reading.add_done_callback(lambda _f: reads.append(n))
        return reading

    class Watcher(FakeWatcher):
        def sample_guarded(self) -> None:
            nonlocal ticks
            ticks += 1
            seen.append((ticks, reads[-1] if reads else 0, gate.closed))

    ticker.early_hooks.append(start_read)
    watcher = Watcher(0.0)
    ticker.add(watcher)
    try:
        await asyncio.sleep(2.5)  # 6 ticks of reads taking 50 ms
        slow_lead = ticker.lead()
        slow_seen = list(seen)
        read_takes[0] = 0.001
        await asyncio.sleep(2.0)  # 5 ticks of quick reads
        quick_lead = ticker.lead()
    finally:
        ticker.close()
    # From the third tick on (the first read timed), each tick sees the read made for it.
    assert len(slow_seen) >= 5 and all(tick == read for tick, read, _ in slow_seen[2:]), slow_seen
    assert 0.05 * ticker.LEAD_FACTOR - 0.001 <= slow_lead <= ticker.interval / 4, slow_lead
    assert all(closed for _, _, closed in seen), seen  # the gate closed before every tick, lead or not
    assert quick_lead == early, quick_lead
    assert not gate.closed


async def test_a_read_that_waited_for_its_threads_other_jobs_does_not_move_the_lead() -> None:
    """Defect: at the daemon's start the first eBPF read waited in its thread behind the program's
    load (845 ms beside 50 containers): the lead went to a quarter of the interval for a minute
    (LEADS reads), and the loop woke three times an interval instead of once (the early hooks, the
    gate, the tick). A read is now timed from when it began in its thread; one that is slow
    itself still moves the lead."""
    from nstap.threads import WorkerThread, waited
    from nstap.watcher import Ticker

    thread = WorkerThread("nstap-test")
    try:
        for load, read, moved in ((0.3, 0.001, False), (0.0, 0.03, True)):
            ticker = Ticker(0.2, idle=lambda: False)
            early = min(ticker.EARLY, ticker.interval / 10)
            loads = [load]
            waits: list[float] = []

            def start_read(loads=loads, load=load, read=read, waits=waits) -> asyncio.Future:
                if loads and loads.pop():
                    thread.submit(time.sleep, load)  # the load, given to the thread first
                reading = thread.submit(time.sleep, read)
                reading.add_done_callback(lambda f: waits.append(waited(f)))
                return reading

            ticker.early_hooks.append(start_read)
            await tick_for(ticker, [FakeWatcher(0.0)], 0.9)
            assert len(waits) >= 3 and (waits[0] >= 0.25) is (load > 0), waits
            assert (ticker.lead() > early) is moved, (load, read, ticker.lead(), list(ticker._early_took))
    finally:
        thread.shutdown()


def test_a_slow_early_read_keeps_the_lead_long_for_a_minute_of_quick_ones() -> None:
    """Defect: the lead remembered the last 16 early reads (8 rounds of the eBPF and DNS reads).
    At 1,000 containers the reads took 25 ms at the median and 50-150 ms one time in ten to a
    hundred: 8 rounds after a slow read the lead was back at 45 ms, and the next slow read was
    still running at its tick, which came 21-42 ms late (2 of the 3 late ticks of a trace). A slow read now keeps
    the lead for about a minute of rounds at a 1 s interval (LEADS reads), then quick reads bring
    it back to EARLY."""
    from nstap.watcher import Ticker

    ticker = Ticker(1.0)
    early = min(ticker.EARLY, ticker.interval / 10)
    took = ticker._early_took  # what _run_early's done callbacks append to: each read's wall time
    took.append(0.12)
    took.extend([0.02] * 110)  # 55 rounds of two quick reads
    assert ticker.lead() >= 0.12 * ticker.LEAD_FACTOR - 1e-9, ticker.lead()
    assert ticker.lead() <= ticker.interval / 4
    took.extend([0.02] * ticker.LEADS)
    assert ticker.lead() == early


async def test_the_done_hooks_run_once_a_round_after_its_last_sample() -> None:
    """A done hook (the full garbage collection) runs when a round's last sample is taken, round
    after round: never between a tick and its samples (it would make them late) nor in the
    middle of a round cut into slices."""
    from nstap.watcher import Ticker

    ticker = Ticker(0.2)
    watchers = [FakeWatcher(0.1) for _ in range(120)]  # 12 ms a round: three slices
    done: list[float] = []
    ticker.done_hooks.append(lambda: done.append(time.monotonic()))
    await tick_for(ticker, watchers, 1.1)
    rounds = len(watchers[-1].samples)
    assert rounds >= 4 and len(done) == rounds, (rounds, done)
    for k, at in enumerate(done):
        assert watchers[-1].samples[k] <= at  # after the round's last sample
        if k + 1 < rounds:
            assert at <= watchers[0].samples[k + 1]  # before the next round's first


def test_a_gate_left_closed_stops_workers_no_longer_than_max_wait() -> None:
    """A round that never ends (or a gate left closed by a bug) must not stop the workers' parses
    for good: past MAX_WAIT after it closed, every pause returns at once."""
    import threading

    from nstap.gate import MAX_WAIT, RoundGate

    gate = RoundGate()
    took: list[float] = []

    def worker() -> None:
        started = time.monotonic()
        for _ in range(1000):
            gate.pause()
        took.append(time.monotonic() - started)

    gate.close()
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(10)
    gate.pause()  # the main thread never waits
    assert took and MAX_WAIT * 0.9 <= took[0] < MAX_WAIT + 0.2, took



@pytest.mark.parametrize("loop", ["flows_by_container", "tally", "flows_of"])
def test_host_wide_conntrack_loops_wait_out_the_sampling_round(loop: str) -> None:
    """The host's conntrack table is as large as the host's traffic (100,000 flows and more): the
    Python loops over it, in worker threads, wait at the round's gate like the firewall parses."""
    from nstap.nat import conntrack, talkers

    me, peer = bytes([172, 17, 0, 2]), bytes([10, 0, 0, 1])
    n = 5000
    if loop == "flows_by_container":
        run = lambda: conntrack.flows_by_container([(6, me, peer, 0, 3)] * n, {me: "c1"})  # noqa: E731
    elif loop == "tally":
        run = lambda: talkers.tally([(i, me, peer, peer, 1, 100, 1, 100, 6) for i in range(n)], {me: "c1"}, {}, n, 10)  # noqa: E731
    else:
        flow = conntrack.Flow()
        flow.proto, flow.orig_src, flow.orig_dst, flow.reply_src, flow.reply_dst = 6, me, peer, peer, me
        run = lambda: conntrack.flows_of([flow] * n, {me})  # noqa: E731
    held_at_a_closed_gate(run)


async def test_a_done_hook_that_fails_does_not_stop_the_ticks() -> None:
    """A done hook runs after the next tick is armed: one that raises is the loop's to report,
    and the namespaces are still sampled every interval."""
    from nstap.watcher import Ticker

    ticker = Ticker(0.1)
    watcher = FakeWatcher(0.0)
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))

    def failing() -> None:
        raise RuntimeError("hook failed")

    ticker.done_hooks.append(failing)
    try:
        await tick_for(ticker, [watcher], 0.55)
    finally:
        loop.set_exception_handler(None)
    assert len(watcher.samples) >= 4 and len(errors) >= 4, (watcher.samples, errors)
