"""The capture engine with real tcpdump in a namespace made by the test: live, flight recorder, limits.

The registry entry that points the engine at the namespace is built by hand (there is no
container runtime involved here); everything else — tcpdump, nsenter, the kernel — is real.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import NsUnderTest, ping, tool
from nstap.capture.engine import CaptureEngine, CaptureRefused, CaptureSettings, CaptureTarget
from nstap.capture.pcap import read_file, sha256_file
from nstap.capture.ring import Segment, segments_for_window, segments_to_drop
from nstap.capture.store import COMPLETE, FAILED, CaptureStore, Retention
from nstap.capture.tcpdump import FilterError, Tools, parse_stats
from nstap.registry import ContainerRegistry
from nstap.runtime.records import ContainerRecord


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


@pytest.fixture
async def engine(tmp_path: Path, netns: NsUnderTest):
    """An engine whose registry holds the test namespace, labelled for a flight recorder."""
    registry = ContainerRegistry()
    record = ContainerRecord(
        id="cd" * 32, name="ringed", runtime="test", pid=netns.pid, status="running", image="none", labels={"nstap.capture": "ring"}
    ).with_netns(os.stat(f"/proc/{netns.pid}/ns/net").st_ino, 0)
    registry.upsert(record)
    store = CaptureStore(tmp_path, Retention(max_bytes=50 * 1024 * 1024, max_age_seconds=3600))
    await store.open()
    settings = CaptureSettings(pre_seconds=3, post_seconds=2, max_concurrent=2, ring="labeled", ring_bytes=1024 * 1024)
    engine = CaptureEngine(settings, store, registry, tmp_path, Path("/proc"))
    yield engine, registry, store, record
    await engine.stop()
    await store.close()


async def wait_done(store: CaptureStore, capture_id: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = await store.get(capture_id)
        if row.state != "running":
            return row
        await asyncio.sleep(0.1)
    pytest.fail("capture did not finish")


def target_of(record: ContainerRecord) -> CaptureTarget:
    return CaptureTarget(record.name, record.short_id, record.runtime, record.netns, record.pid)


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
    # A process that is gone: nsenter fails, the capture fails with what it said.
    gone = CaptureTarget("gone", "000000000000", "test", 1, 2**22 + 17)
    failed = await wait_done(store, (await eng.capture(gone, "manual", post_seconds=1)).id)
    assert failed.state == FAILED and "nsenter" in failed.error
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
    monkeypatch.setattr("nstap.capture.engine.RING_RESTART_DELAY", 1.0)
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
    assert eng.ring_restarts_total == 1 and second.dir != first.dir
    for _ in range(30):  # the dead ring's files are removed
        if not first.dir.exists():
            break
        await asyncio.sleep(0.1)
    assert not first.dir.exists()


async def test_no_flight_recorder_for_a_container_that_opted_out(tmp_path: Path, netns: NsUnderTest) -> None:
    registry = ContainerRegistry()
    record = ContainerRecord(
        id="ef" * 32, name="private", runtime="test", pid=netns.pid, status="running", image="none", labels={"nstap.capture": "off"}
    ).with_netns(os.stat(f"/proc/{netns.pid}/ns/net").st_ino, 0)
    registry.upsert(record)
    store = CaptureStore(tmp_path, Retention(max_bytes=1 << 20, max_age_seconds=3600))
    await store.open()
    eng = CaptureEngine(CaptureSettings(ring="all"), store, registry, tmp_path, Path("/proc"))
    (tmp_path / "ring" / "123-1").mkdir(parents=True)  # left by a daemon that died
    try:
        eng.start()
        await asyncio.sleep(0.5)
        assert eng.rings == {} and list((tmp_path / "ring").iterdir()) == []
        assert oct((tmp_path / "ring").stat().st_mode & 0o777) == "0o700"
    finally:
        await eng.stop()
        await store.close()


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
