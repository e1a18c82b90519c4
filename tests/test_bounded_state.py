"""State that grows with time has a bound: each structure fed far more keys than its bound."""

from __future__ import annotations

from nstap.ebpf.service import HostDrops
from nstap.log import Once


def test_logged_once_keys_are_bounded() -> None:
    """Defect: the NAT monitor's logged-once set kept every error text it ever logged (errors carry
    names and line numbers: not a bounded set)."""
    once = Once(limit=100)
    assert once.first("a") and not once.first("a")
    for i in range(10_000):
        once.first(f"error {i}")
    assert len(once) == 100
    assert once.first("a")  # forgotten long ago: logged again if it recurs
    assert not once.first("error 9999")


def test_host_drops_remember_only_the_namespaces_of_the_last_read() -> None:
    host = HostDrops()
    for i in range(5_000):  # namespaces come and go
        host.update({i: {"NO_SOCKET": 1}, 1: {"NO_SOCKET": i}}, set())
    assert len(host._last) == 2 and host.totals["NO_SOCKET"] == 4999 + 5000 - 1


def test_incidents_of_a_gone_namespace_are_forgotten() -> None:
    from nstap.detect.base import Finding
    from nstap.detect.incidents import IncidentTracker
    from nstap.registry import WatchedNamespace
    from nstap.runtime.records import ContainerRecord

    tracker = IncidentTracker(None, None, cooldown=0, resolve_after=5)  # type: ignore[arg-type]
    tracker._save = lambda inc, at: None  # no index here: only the maps matter
    for i in range(2_000):
        record = ContainerRecord(id=f"{i:064x}", name=f"c{i}", runtime="docker", pid=1, status="running", image="i").with_netns(1000 + i, 1)
        ns = WatchedNamespace(record.netns, record, (record,))
        tracker.found(ns, Finding("tcp_retransmits", "x"), 1.0)
        tracker.forget(ns.inode, 2.0)
    assert not tracker.incidents and not tracker._of


def test_a_namespace_s_quiet_look_touches_only_its_own_incidents() -> None:
    """Defect: quiet() (called for every namespace's every sample) went through every incident of
    the host to find the namespace's own: with many open incidents a round cost that times the
    number of namespaces. It reads the namespace's own index only."""
    from nstap.detect.base import Finding
    from nstap.detect.incidents import IncidentTracker
    from nstap.registry import WatchedNamespace
    from nstap.runtime.records import ContainerRecord

    class Untouchable(dict):
        def _touched(self, *args):
            raise AssertionError("quiet() went through every incident of the host")

        __iter__ = items = values = keys = __len__ = _touched

    tracker = IncidentTracker(None, None, cooldown=0, resolve_after=5)  # type: ignore[arg-type]
    tracker._save = lambda inc, at: None  # no index here: only the maps matter
    namespaces = []
    for i in range(500):
        record = ContainerRecord(id=f"{i:064x}", name=f"c{i}", runtime="docker", pid=1, status="running", image="i").with_netns(1000 + i, 1)
        namespaces.append(ns := WatchedNamespace(record.netns, record, (record,)))
        for kind in ("tcp_retransmits", "tcp_reset_spike"):
            tracker.found(ns, Finding(kind, "x"), 1.0)
    tracker.incidents = Untouchable(tracker.incidents)
    tracker.quiet(namespaces[7].inode, {"tcp_retransmits"}, 100.0)
    resolved = [(ns.inode, kind) for ns in namespaces for kind, inc in tracker._of[ns.inode].items() if not inc.active]
    assert resolved == [(namespaces[7].inode, "tcp_reset_spike")]


def test_ebpf_entries_of_gone_unwatched_namespaces_are_swept(monkeypatch) -> None:
    """Defect: only a watched namespace's entries were deleted (when its watcher went); those of a
    namespace nstap never watched (a build step's, an `ip netns` one, a container gone before its
    watcher came) stayed in the drop and flow maps for good, filling them on a busy host."""
    from nstap.ebpf import service

    class Maps:
        forgotten: set[int] = set()

        def flow_keys(self) -> list[tuple]:
            return [(7, 1, 2, 2, 0, b""), (8, 1, 2, 2, 0, b"")]

        def forget(self, netns) -> int:
            self.forgotten |= set(netns)
            return len(netns)

    monkeypatch.setattr(service, "live_netns", lambda proc_root="/proc", wanted=None, stop=None: {1, 8})
    ebpf = service.EbpfService("off")
    try:
        ebpf._watched = {2}  # watched: its entries are follow()'s business, even once it is gone
        maps = Maps()
        dead = ebpf._sweep(maps, {0: {"A": 1}, 1: {"A": 1}, 2: {"A": 1}, 3: {"A": 1}})  # type: ignore[arg-type]
        assert maps.forgotten == dead == {3, 7}  # gone and never watched; 0 is no namespace; 1 and 8 live
        assert ebpf.swept_total == 2
    finally:
        ebpf._thread.shutdown()


def test_the_sweep_scans_proc_only_for_namespaces_that_may_be_gone(monkeypatch) -> None:
    """The sweep's /proc scan is a stat per process (some 3,000 beside 1,000 containers, each
    giving the GIL up): not made when the only unwatched namespace is the daemon's own (the host's
    drops, always there)."""
    import os

    from nstap.ebpf import service

    home = os.stat("/proc/self/ns/net").st_ino

    class Maps:
        def flow_keys(self) -> list[tuple]:
            return [(home, 1, 2, 2, 0, b"")]

        def forget(self, netns) -> int:
            return len(netns)

    real = service.live_netns
    scans: list[int] = []
    monkeypatch.setattr(service, "live_netns", lambda proc_root="/proc", wanted=None, stop=None: scans.append(1) or real(proc_root, wanted, stop))
    ebpf = service.EbpfService("off")
    try:
        assert ebpf._sweep(Maps(), {0: {"A": 1}, home: {"A": 1}}) == set()  # type: ignore[arg-type]
        assert scans == []
        gone = 4026000001  # no process is in it
        assert ebpf._sweep(Maps(), {home: {"A": 1}, gone: {"A": 1}}) == {gone}  # type: ignore[arg-type]
        assert scans == [1] and ebpf.swept_total == 1
    finally:
        ebpf._thread.shutdown()

    live = real()
    assert live is not None and home in live


def fake_proc(root, pids: int) -> list[int]:
    """A /proc of ``pids`` processes, each in a namespace of its own: their inodes in the order a scan meets them."""
    import os

    for pid in range(1, pids + 1):
        (root / str(pid) / "ns").mkdir(parents=True)
        (root / str(pid) / "ns" / "net").write_text("")
    (root / "self").mkdir()  # not a process
    return [os.stat(f"{root}/{e.name}/ns/net").st_ino for e in os.scandir(root) if e.name.isdigit()]


def test_the_sweeps_scan_ends_when_every_namespace_it_asks_about_is_found(tmp_path) -> None:
    """Beside 1,000 containers the scan is some 3,000 stats, 80-130 ms in a worker thread on a
    busy host: a namespace still alive (the usual case) ends it where it is found."""
    from nstap.ebpf.service import live_netns

    order = fake_proc(tmp_path, 300)
    assert live_netns(str(tmp_path)) == set(order)
    assert live_netns(str(tmp_path), wanted={order[9], order[4]}) == set(order[:10])
    assert live_netns(str(tmp_path), wanted={order[4], 4026000001}) == set(order)  # one is gone: all of it


def test_the_sweep_gives_up_when_the_rounds_gate_closes(tmp_path) -> None:
    from nstap.ebpf.service import STOP_EVERY, live_netns

    fake_proc(tmp_path, 300)
    looks: list[int] = []
    assert live_netns(str(tmp_path), stop=lambda: looks.append(1) or len(looks) > 2) is None
    assert len(looks) == 3  # every STOP_EVERY processes
    assert live_netns(str(tmp_path), stop=lambda: False) is not None and 300 // STOP_EVERY >= 3


def test_the_sweep_runs_between_rounds_not_in_the_read_before_a_tick(monkeypatch, tmp_path) -> None:
    """Defect: the sweep's scan ran inside the eBPF read that starts just before each tick; beside
    1,000 containers the tick after it was 10-41 ms late every 20 s or so. Now the read reads, and
    the sweep runs after a round, giving up while the round's gate is closed (tried again after the
    next round), and running through it once it is SWEEP_OVERDUE periods late."""
    import asyncio

    from nstap.ebpf import service
    from nstap.gate import ROUND

    scans: list[object] = []
    real = service.live_netns
    monkeypatch.setattr(service, "live_netns", lambda proc_root="/proc", wanted=None, stop=None: scans.append(stop) or real(str(tmp_path), wanted, stop))
    fake_proc(tmp_path, 300)
    gone = 4026000001

    class Collector:
        forgotten: set[int] = set()

        def read(self) -> dict[int, dict[str, int]]:
            return {gone: {"A": 1}}

        def flows_due(self, at: float) -> bool:
            return False

        def flow_keys(self) -> list[tuple]:
            return []

        def forget(self, netns) -> int:
            self.forgotten |= set(netns)
            return len(netns)

    async def run() -> None:
        ebpf = service.EbpfService("off")
        collector = ebpf.collector = Collector()  # type: ignore[assignment]
        try:
            ebpf._swept_at -= service.SWEEP_EVERY
            at, counts, _, _ = ebpf._read(collector, 0)  # type: ignore[arg-type]
            assert counts == {gone: {"A": 1}} and scans == []  # the read does not sweep
            ebpf.counts = counts
            ROUND.close()  # the next tick is near
            ebpf.after_round()
            await ebpf._sweeping
            assert scans[-1] is not None and collector.forgotten == set() and ebpf.counts == counts  # given up
            ROUND.open()
            ebpf.after_round()
            assert ebpf._sweeping is not None
            ebpf.after_round()  # one at a time
            await ebpf._sweeping
            await asyncio.sleep(0)
            assert collector.forgotten == {gone} and ebpf.counts == {} and len(scans) == 2
            ebpf.after_round()
            assert ebpf._sweeping is None  # not due for SWEEP_EVERY
            ebpf._swept_at -= service.SWEEP_OVERDUE * service.SWEEP_EVERY
            ebpf.counts = {gone + 1: {"A": 1}}
            ROUND.close()
            ebpf.after_round()
            await ebpf._sweeping
            await asyncio.sleep(0)
            assert len(scans) == 3 and scans[-1] is None  # overdue: it runs through the gate
            assert collector.forgotten == {gone, gone + 1} and ebpf.counts == {}
        finally:
            ROUND.open()
            ebpf.collector = None
            ebpf._thread.shutdown()

    asyncio.run(run())
