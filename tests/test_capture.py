"""The capture engine with real tcpdump in a namespace made by the test: live, flight recorder, limits.

The registry entry that points the engine at the namespace is built by hand (there is no
container runtime involved here); everything else — the watcher pool holding the namespace's
descriptor, tcpdump, nsenter, the kernel — is real.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import NsUnderTest, children_of, ping, sh, tool
from nstap.capture.anomaly import AnomalyCaptures
from nstap.capture.engine import CaptureEngine
from nstap.capture.model import CaptureRefused, CaptureSettings, CaptureTarget
from nstap.capture.pcap import read_file, sha256_file
from nstap.capture.ring import Segment, segments_for_window, segments_to_drop
from nstap.capture.store import CaptureStore, Retention
from nstap.index.captures import COMPLETE
from nstap.capture.tcpdump import FilterError, Tools, parse_stats
from nstap.instruments import Instruments
from nstap.netns.handles import NamespaceOpener
from nstap.registry import ContainerRegistry
from nstap.runtime.records import ContainerRecord
from nstap.samplers import SAMPLERS, SamplerContext
from nstap.samples import SampleStore
from nstap.watcher import WatcherPool
from prometheus_client import CollectorRegistry


def tcpdump_read(path: Path, *args: str) -> list[str]:
    """Packets as tcpdump -r prints them (fails the test if tcpdump cannot read the file)."""
    proc = subprocess.run([tool("tcpdump"), "-nn", "-r", str(path), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def seg(first: float, last: float, size: int = 100) -> Segment:
    return Segment(Path(f"/x/{first}"), first, last, size)


def test_ring_keep_and_window_tables() -> None:
    segs = [seg(0, 9), seg(10, 19), seg(20, 29), seg(30, 39)]
    assert segments_to_drop(segs, 3) == segs[:1] and segments_to_drop(segs, 4) == [] and segments_to_drop(segs, 9) == []
    assert segments_for_window(segs, 15, 25) == segs[1:3]
    assert segments_for_window(segs, 9.5, 9.9) == []
    assert segments_for_window(segs, 39, 100) == segs[3:]
    assert segments_for_window([*segs, seg(40, 40, size=0)], 0, 100) == segs  # an empty segment holds nothing


def test_stats_lines() -> None:
    assert parse_stats("tcpdump: 12 packets captured, 24 packets received by filter, 3 packets dropped by kernel") == {
        "captured": 12, "received": 24, "dropped": 3,
    }
    assert parse_stats("12 packets captured\n24 packets received by filter\n0 packets dropped by kernel\n")["dropped"] == 0



async def test_stats_asked_the_moment_tcpdump_starts_do_not_kill_it(netns: NsUnderTest) -> None:
    """SIGUSR1 before tcpdump has set its handlers (or while nsenter still runs) would kill it: a
    ring restarted and asked for a capture at once stopped again (seen in CI). Real tcpdump."""
    from nstap.capture.tcpdump import TcpdumpProcess

    fd = os.open(f"/proc/{netns.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for _ in range(5):
            proc = TcpdumpProcess(Tools.find(snaplen=128, buffer_kib=256).argv(fd))
            await proc.start(pass_fds=(fd,))
            try:
                await proc.request_stats(timeout=0.2)  # before "listening on": latest known, no signal
                assert proc.proc.returncode is None
                for _ in range(100):
                    if proc.listening:
                        break
                    await asyncio.sleep(0.02)
                assert proc.listening, proc.error_text()
                ping(netns.ns_ip, 2)
                stats = await proc.request_stats(timeout=2)  # now asked for real, and answered
                # the 2 pings and their replies reached the filter (tcpdump may not have written all of
                # them out yet when it answers: "captured" lags)
                assert stats["received"] >= 4 and 0 <= stats["captured"] <= stats["received"], stats
                assert proc.proc.returncode is None
            finally:
                await proc.stop()
    finally:
        os.close(fd)


class Bench:
    """A registry, the real watcher pool over it, a store and an engine, for one test namespace."""

    def __init__(self, tmp_path: Path, netns: NsUnderTest, labels: dict[str, str], settings: CaptureSettings) -> None:
        self.registry = ContainerRegistry()
        self.opener = NamespaceOpener()
        context = SamplerContext(interval=0.5, host_links=None, walk_budget=0.00005, max_walk_interval=60.0, max_listen_ports=64)
        self.pool = WatcherPool(self.registry, self.opener, list(SAMPLERS.values()), context, SampleStore(), Instruments(CollectorRegistry()))
        self.record = ContainerRecord(
            id="cd" * 32, name="ringed", runtime="test", pid=netns.pid, status="running", image="none", labels=labels
        ).with_netns(os.stat(f"/proc/{netns.pid}/ns/net").st_ino, 0)
        self.store = CaptureStore(tmp_path, Retention(max_bytes=50 * 1024 * 1024, max_age_seconds=3600))
        self.engine = CaptureEngine(settings, self.store, self.pool, self.registry, tmp_path)
        self.anomalies = AnomalyCaptures(self.engine)
        self.tmp_path = tmp_path

    async def open(self) -> None:
        await self.store.open()
        self.pool.start()

    async def attach(self) -> None:
        """Put the container in the registry and wait until its watcher holds the namespace."""
        self.registry.upsert(self.record)
        for _ in range(100):
            if self.pool.netns_fd(self.record.netns) is not None:
                return
            await asyncio.sleep(0.05)
        pytest.fail("the watcher did not attach")

    async def close(self) -> None:
        await self.engine.stop()
        await self.pool.stop()
        await self.store.close()
        self.opener.close()


@pytest.fixture
async def bench(tmp_path: Path, netns: NsUnderTest):
    """A bench whose namespace is labelled for a flight recorder, attached."""
    b = Bench(tmp_path, netns, {"nstap.capture": "ring"}, CaptureSettings(pre_seconds=3, post_seconds=2, max_concurrent=2, ring="labeled", ring_bytes=1024 * 1024))
    await b.open()
    await b.attach()
    yield b
    await b.close()


@pytest.fixture
async def engine(bench: Bench):
    yield bench.engine, bench.registry, bench.store, bench.record


async def wait_done(store: CaptureStore, capture_id: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = await store.index.captures.get(capture_id)
        if row.state != "running":
            return row
        await asyncio.sleep(0.1)
    pytest.fail("capture did not finish")


def target_of(record: ContainerRecord) -> CaptureTarget:
    return CaptureTarget(record.name, record.short_id, record.runtime, record.netns)


async def test_live_capture_holds_the_traffic_of_its_window(engine, netns: NsUnderTest) -> None:
    eng, _registry, store, record = engine  # not started: no flight recorder, so a live capture
    row = await eng.capture(target_of(record), "manual", post_seconds=2, pre_seconds=5)
    assert row.mode == "live" and row.window_start == row.trigger_at
    await asyncio.sleep(0.5)
    await asyncio.to_thread(ping, netns.ns_ip, 5)
    done = await wait_done(store, row.id)
    path = store.path_of(done)
    assert done.state == COMPLETE and "no flight recorder" in done.error
    assert done.packets >= 10 and done.bytes == path.stat().st_size and done.sha256 == sha256_file(path)
    lines = tcpdump_read(path)
    assert sum("ICMP echo request" in line for line in lines) == 5 and sum("ICMP echo reply" in line for line in lines) == 5
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    _, records = read_file(path)
    assert all(done.window_start <= r.ts <= done.window_end for r in records)


async def test_flight_recorder_capture_starts_before_its_trigger(engine, netns: NsUnderTest) -> None:
    eng, _registry, store, record = engine
    eng.start()
    for _ in range(50):
        if record.netns in eng.rings and eng.rings[record.netns].running:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    await asyncio.to_thread(ping, netns.ns_ip, 4)  # before the trigger
    await asyncio.sleep(1.0)
    await asyncio.sleep(max(0.0, 3.5 - eng.rings[record.netns].reach()))  # the ring holds the whole window
    trigger = time.time()
    row = await eng.capture(target_of(record), "anomaly", kind="test")
    assert row.mode == "ring" and row.window_start == pytest.approx(trigger - 3, abs=0.5)
    await asyncio.to_thread(ping, netns.ns_ip, 3)  # after it
    done = await wait_done(store, row.id)
    assert done.state == COMPLETE and done.error == ""
    _, records = read_file(store.path_of(done))
    before = [r for r in records if r.ts < done.trigger_at]
    after = [r for r in records if r.ts >= done.trigger_at]
    assert len(before) == done.pre_packets >= 8 and len(after) >= 6
    assert all(done.window_start <= r.ts <= done.window_end for r in records)
    lines = tcpdump_read(store.path_of(done), "icmp")
    assert sum("echo request" in line for line in lines) == 7
    assert not done.pre_truncated  # the ring held the whole window
    # An onset long before the ring started: the window reaches back max_pre_seconds at most, and
    # says the ring did not hold all of it; the ring's reach is how long it has run.
    ring = eng.rings[record.netns]
    now = time.time()
    assert 3 < ring.reach(now) < 60 and ring.holds_since() == ring.started_wall
    early = await eng.capture(target_of(record), "anomaly", kind="test", trigger_at=now, onset_at=now - 100, margin=1.0, post_seconds=0.5)
    assert early.onset_at == now - 100 and early.pre_truncated
    assert early.window_start == pytest.approx(now - eng.settings.max_pre_seconds)
    recent = await eng.capture(target_of(record), "anomaly", kind="test", trigger_at=now, onset_at=now - 1.5, margin=0.5, post_seconds=0.5)
    assert not recent.pre_truncated and recent.window_start == pytest.approx(now - 1.5 - 0.5 - eng.settings.pre_seconds)
    for row in (early, recent):
        assert (await wait_done(store, row.id)).state == COMPLETE


async def test_filter_is_checked_and_applied(engine, netns: NsUnderTest) -> None:
    eng, _registry, store, record = engine
    with pytest.raises(FilterError, match="syntax error"):
        await eng.check_filter("tcp port")
    for bad in ("x" * 2000, "icmp\n-w /etc/passwd", "\x00"):
        with pytest.raises(FilterError):
            await eng.check_filter(bad)
    # An expression that looks like an option is an expression (after --), and refused as one.
    with pytest.raises(FilterError):
        await eng.check_filter("-w /tmp/nstap-should-not-exist.pcap")
    assert not Path("/tmp/nstap-should-not-exist.pcap").exists()
    await eng.check_filter("icmp and host 10.213.0.0")
    row = await eng.capture(target_of(record), "manual", post_seconds=2, bpf="icmp[icmptype] == icmp-echoreply")
    await asyncio.sleep(0.5)
    await asyncio.to_thread(ping, netns.ns_ip, 3)
    done = await wait_done(store, row.id)
    lines = tcpdump_read(store.path_of(done))
    assert len(lines) == 3 and all("echo reply" in line for line in lines)
    assert done.error == ""  # a live capture that was not asked for pre-trigger packets


async def test_limits_and_failures(engine, netns: NsUnderTest, tmp_path: Path) -> None:
    eng, _registry, store, record = engine
    rows = [await eng.capture(target_of(record), "manual", post_seconds=1) for _ in range(2)]
    with pytest.raises(CaptureRefused) as refused:
        await eng.capture(target_of(record), "manual", post_seconds=1)
    assert refused.value.status == 429
    for row in rows:
        assert (await wait_done(store, row.id)).state == COMPLETE
    # A namespace nobody watches: refused, nothing entered.
    with pytest.raises(CaptureRefused, match="not watched") as unwatched:
        await eng.capture(CaptureTarget("gone", "000000000000", "test", 1), "manual", post_seconds=1)
    assert unwatched.value.status == 409
    # No tcpdump at all: a clear refusal, not a crash.
    with pytest.raises(Exception, match="not found"):
        Tools.find(256, 1024, tcpdump="tcpdump-that-does-not-exist")


async def test_byte_cap(engine, netns: NsUnderTest) -> None:
    eng, _registry, store, record = engine
    object.__setattr__(eng.settings, "max_bytes", 2000)
    row = await eng.capture(target_of(record), "manual", post_seconds=2)
    await asyncio.sleep(0.3)
    await asyncio.to_thread(ping, netns.ns_ip, 40)
    done = await wait_done(store, row.id)
    assert done.state == COMPLETE and "byte cap" in done.error and done.bytes <= 2000
    assert tcpdump_read(store.path_of(done))


async def wait_ring(eng: CaptureEngine, inode: int, timeout: float = 10.0, other_than=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ring = eng.rings.get(inode)
        if ring is not None and ring.running and ring is not other_than:
            return ring
        await asyncio.sleep(0.1)
    pytest.fail("no running flight recorder")


async def test_a_flight_recorder_whose_tcpdump_dies_is_replaced(engine, netns: NsUnderTest, monkeypatch) -> None:
    monkeypatch.setattr("nstap.capture.fleet.RING_RESTART_DELAY", 1.0)
    eng, _registry, store, record = engine
    eng.start()
    first = await wait_ring(eng, record.netns)
    first.process.proc.kill()  # tcpdump (under nsenter) killed from outside
    for _ in range(20):
        if not first.running:
            break
        await asyncio.sleep(0.1)
    assert not first.running and first.error
    # Meanwhile a capture falls back to a live one instead of failing.
    row = await eng.capture(target_of(record), "manual", post_seconds=1)
    assert row.mode == "live"
    assert (await wait_done(store, row.id)).state == COMPLETE
    second = await wait_ring(eng, record.netns, other_than=first)
    assert eng.fleet.restarts_total == 1 and second.dir != first.dir
    for _ in range(30):  # the dead ring's files are removed
        if not first.dir.exists():
            break
        await asyncio.sleep(0.1)
    assert not first.dir.exists()


async def test_no_flight_recorder_for_a_container_that_opted_out(tmp_path: Path, netns: NsUnderTest) -> None:
    b = Bench(tmp_path, netns, {"nstap.capture": "OFF"}, CaptureSettings(ring="all"))  # the switch vocabulary, any case
    await b.open()
    (tmp_path / "ring" / "123-1").mkdir(parents=True)  # left by a daemon that died
    try:
        await b.attach()
        b.engine.start()
        await asyncio.sleep(0.5)
        assert b.engine.rings == {} and list((tmp_path / "ring").iterdir()) == []
        assert oct((tmp_path / "ring").stat().st_mode & 0o777) == "0o700"
        with pytest.raises(CaptureRefused) as refused:  # the engine vetoes it too, not only the API
            await b.engine.capture(target_of(b.record), "manual", post_seconds=1)
        assert refused.value.status == 403
    finally:
        await b.close()


async def test_filtered_flight_recorder_capture_is_private(engine, netns: NsUnderTest) -> None:
    eng, _registry, store, record = engine
    eng.start()
    await wait_ring(eng, record.netns)
    await asyncio.to_thread(ping, netns.ns_ip, 2)
    row = await eng.capture(target_of(record), "manual", post_seconds=1, bpf="icmp[icmptype] == icmp-echo")
    assert row.mode == "ring"
    done = await wait_done(store, row.id)
    path = store.path_of(done)
    lines = tcpdump_read(path)
    assert done.state == COMPLETE and done.error == "" and len(lines) == 2 and all("echo request" in line for line in lines)
    st = path.stat()
    assert (st.st_uid, oct(st.st_mode & 0o777)) == (0, "0o600")


def tcpdump_children() -> list[int]:
    """tcpdumps started by this test process (setpriv and nsenter exec it in place)."""
    return children_of(os.getpid(), ("tcpdump", "nsenter", "setpriv"))


async def test_ring_whose_namespace_leaves_before_its_tcpdump_started_is_stopped(tmp_path: Path, netns: NsUnderTest) -> None:
    """Defect: the recorder's start ran as its own task, and a stop that came first found no process."""
    b = Bench(tmp_path, netns, {"nstap.capture": "ring"}, CaptureSettings(ring="labeled"))
    await b.open()
    try:
        b.engine.start()
        before = set(tcpdump_children())
        # The moment the engine has decided to start the ring (on attach, before its tcpdump
        # runs), the container goes away.
        b.pool.subscribe(lambda: b.registry.remove(b.record.id) if b.record.netns in b.engine.rings else None)
        b.registry.upsert(b.record)
        for _ in range(100):
            if b.engine.rings or b.registry.get(b.record.id) is None:
                break
            await asyncio.sleep(0.02)
        assert b.registry.get(b.record.id) is None, "the container was not removed at the ring's start"
        for _ in range(100):  # the ring's start and stop tasks run their course
            if not b.engine.fleet._tasks and not b.engine.rings:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert b.engine.rings == {}
        assert set(tcpdump_children()) - before == set(), "a flight recorder's tcpdump was left running"
    finally:
        await b.close()


async def test_capture_enters_the_watched_namespace_even_after_pid_reuse(bench: Bench, netns: NsUnderTest) -> None:
    """Defect: tcpdump entered /proc/<pid>/ns/net; a reused pid pointed it at another namespace."""
    eng, registry, store, record = bench.engine, bench.registry, bench.store, bench.record
    # The container's pid now belongs to a process of the host's namespace (this one), as after
    # pid reuse; the registry entry still names the watched namespace.
    registry.upsert(dataclasses.replace(record, pid=os.getpid()))
    row = await eng.capture(target_of(record), "manual", post_seconds=2)
    assert row.mode == "live"
    await asyncio.sleep(0.5)
    # Traffic only the container's namespace sees: pings to its own loopback, of a size nothing
    # else on this host sends.
    await asyncio.to_thread(sh, "ip", "netns", "exec", netns.name, "ping", "-c", "3", "-i", "0.2", "-s", "1234", "-q", "127.0.0.1")
    done = await wait_done(store, row.id)
    lines = tcpdump_read(store.path_of(done), "icmp")
    assert sum("echo request" in line and "length 1242" in line for line in lines) == 3, lines


async def test_concurrent_requests_never_exceed_max_concurrent(bench: Bench) -> None:
    """Defect: the limit was checked before an await on the store and taken after it."""
    eng, store, record = bench.engine, bench.store, bench.record  # max_concurrent 2
    results = await asyncio.gather(*(eng.capture(target_of(record), "manual", post_seconds=1) for _ in range(10)), return_exceptions=True)
    started = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, CaptureRefused)]
    assert len(started) == 2 and len(refused) == 8 and all(r.status == 429 for r in refused), results
    assert eng.refused_total["concurrency"] == 8
    assert len(await store.index.captures.list()) == 2
    for row in started:
        assert (await wait_done(store, row.id)).state == COMPLETE


async def test_anomaly_captures_per_container_are_limited(tmp_path: Path, netns: NsUnderTest) -> None:
    b = Bench(tmp_path, netns, {}, CaptureSettings(post_seconds=1, max_concurrent=8, max_per_container_per_hour=3))
    await b.open()
    try:
        await b.attach()
        ns = b.pool.watched()[b.record.netns]
        from nstap.index import AnomalyRow

        def anomaly(i: int) -> AnomalyRow:
            now = time.time()
            return AnomalyRow(f"a{i}", "tcp_reset_spike", "ringed", b.record.short_id, "test", ns.inode, now, now)

        b.engine.start()
        ids = await asyncio.gather(*(b.anomalies.for_anomaly(ns, anomaly(i)) for i in range(5)))  # in one tick
        assert sum(i is not None for i in ids) == 3
        assert b.engine.refused_total["per_container_limit"] == 2
        for capture_id in filter(None, ids):
            await wait_done(b.store, capture_id)
        # The container goes: its per-container counts go with it (they would grow for ever) ...
        assert b.engine.captures_total and len(b.engine.quota)
        b.registry.remove(b.record.id)
        assert not b.engine.captures_total
        # ... but not its quota of the hour: a container that crash-loops comes back with the same
        # id and must not get a fresh one each time.
        await b.attach()
        ns = b.pool.watched()[b.record.netns]
        assert await b.anomalies.for_anomaly(ns, anomaly(9)) is None
        # An hour later it is forgotten.
        history = b.engine.quota._started[b.record.short_id]
        history.extend([t - 3700 for t in [history.popleft() for _ in range(len(history))]])
        b.registry.remove(b.record.id)
        assert not len(b.engine.quota)
    finally:
        await b.close()


async def test_one_container_holds_at_most_half_the_capture_slots(tmp_path: Path, netns: NsUnderTest) -> None:
    from nstap.index import AnomalyRow

    b = Bench(tmp_path, netns, {}, CaptureSettings(post_seconds=1, max_concurrent=4, max_per_container_per_hour=100))
    await b.open()
    try:
        await b.attach()
        ns = b.pool.watched()[b.record.netns]
        now = time.time()
        rows = [AnomalyRow(f"a{i}", f"kind{i}", "ringed", b.record.short_id, "test", ns.inode, now, now) for i in range(5)]
        ids = await asyncio.gather(*(b.anomalies.for_anomaly(ns, row) for row in rows))
        assert sum(i is not None for i in ids) == 2  # two slots stay free for the other containers
        for capture_id in filter(None, ids):
            await wait_done(b.store, capture_id)
        assert await b.anomalies.for_anomaly(ns, AnomalyRow("a9", "k", "ringed", b.record.short_id, "test", ns.inode, now, now))  # freed again
    finally:
        await b.close()


async def test_anomalies_of_one_fault_share_one_capture(tmp_path: Path, netns: NsUnderTest) -> None:
    """One fault trips several detectors (a paused listener: a stalled queue, overflows, SYN-ACK
    retransmissions): the later anomalies get the running capture whose window holds them, not a
    capture slot each; one whose onset it does not reach gets its own."""
    from structlog.testing import capture_logs

    from nstap.index import AnomalyRow

    b = Bench(tmp_path, netns, {}, CaptureSettings(post_seconds=3, max_concurrent=4, max_per_container_per_hour=100))
    await b.open()
    try:
        await b.attach()
        ns = b.pool.watched()[b.record.netns]
        now = time.time()
        first = await b.anomalies.for_anomaly(ns, AnomalyRow("s1", "tcp_accept_stalled", "ringed", b.record.short_id, "test", ns.inode, now, now, started_at=now - 1))
        assert first is not None
        with capture_logs() as logs:
            later = [await b.anomalies.for_anomaly(ns, AnomalyRow(f"s{i}", kind, "ringed", b.record.short_id, "test", ns.inode, now + 0.5, now + 0.5, started_at=now - 1))
                     for i, kind in ((2, "tcp_listen_overflows"), (3, "tcp_syn_recv_stuck"))]
        assert later == [first, first] and b.engine.running_count() == 1
        assert [e["anomaly_id"] for e in logs if e["event"] == "anomaly_capture_shared"] == ["s2", "s3"]
        # Detected before the running (live) capture began: it does not hold it.
        old = await b.anomalies.for_anomaly(ns, AnomalyRow("s4", "k", "ringed", b.record.short_id, "test", ns.inode, now - 5, now - 5, started_at=now - 6))
        assert old not in (None, first) and b.engine.running_count() == 2
        for capture_id in (first, old):
            await wait_done(b.store, capture_id)
    finally:
        await b.close()


async def test_a_shared_capture_still_gets_the_host_side_one(tmp_path: Path, netns: NsUnderTest) -> None:
    """Interface drops right after another anomaly of the same fault: the namespace's capture is
    shared, the host end of the veth is captured too, once."""
    from nstap.index import AnomalyRow

    b = Bench(tmp_path, netns, {}, CaptureSettings(post_seconds=3, max_concurrent=4, max_per_container_per_hour=100))
    b.engine.host_peers = lambda inode: [netns.host_if]  # type: ignore[method-assign]
    await b.open()
    try:
        await b.attach()
        ns = b.pool.watched()[b.record.netns]
        now = time.time()
        first = await b.anomalies.for_anomaly(ns, AnomalyRow("r1", "tcp_reset_spike", "ringed", b.record.short_id, "test", ns.inode, now, now, started_at=now - 1))
        drops = [AnomalyRow(f"d{i}", "interface_drops", "ringed", b.record.short_id, "test", ns.inode, now + 0.5, now + 0.5, started_at=now - 1,
                            numbers={f"{netns.host_if}.host.rx_drops": 5}) for i in range(2)]
        assert [await b.anomalies.for_anomaly(ns, row) for row in drops] == [first, first]
        running = [r for r in await b.store.index.captures.list() if r.state == "running"]
        assert sorted((r.side, r.interface) for r in running) == [("container", ""), ("host", netns.host_if)], running
        for r in running:
            await wait_done(b.store, r.id)
    finally:
        await b.close()


async def test_host_side_captures_count_in_the_containers_share(tmp_path: Path, netns: NsUnderTest) -> None:
    """Defect: an interface_drops anomaly's second capture, on the host end of the veth, did not
    count in its container's share: a storm of them held every capture slot. (The host end is
    named here rather than read from a sample; both captures are real tcpdumps.)"""
    from nstap.index import AnomalyRow

    b = Bench(tmp_path, netns, {}, CaptureSettings(post_seconds=1, max_concurrent=4, max_per_container_per_hour=100))
    b.engine.host_peers = lambda inode: [netns.host_if]  # type: ignore[method-assign]
    await b.open()
    try:
        await b.attach()
        ns = b.pool.watched()[b.record.netns]
        now = time.time()
        # Each detected before the running (live) capture began: none can share it, each needs a slot.
        rows = [AnomalyRow(f"d{i}", "interface_drops", "ringed", b.record.short_id, "test", ns.inode, now - 5 * i, now - 5 * i,
                           numbers={f"{netns.host_if}.host.rx_drops": 5}) for i in range(3)]
        ids = [await b.anomalies.for_anomaly(ns, row) for row in rows]
        running = [r for r in await b.store.index.captures.list() if r.state == "running"]
        assert len(running) == 2 and {r.side for r in running} == {"container", "host"}, running  # its share: half the slots
        assert ids[0] is not None and ids[1:] == [None, None]
        for r in running:
            await wait_done(b.store, r.id)
    finally:
        await b.close()
