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

    monkeypatch.setattr(service, "live_netns", lambda proc_root="/proc": {1, 8})
    ebpf = service.EbpfService("off")
    try:
        ebpf._watched = {2}  # watched: its entries are follow()'s business, even once it is gone
        maps = Maps()
        counts = ebpf._sweep(maps, {0: {"A": 1}, 1: {"A": 1}, 2: {"A": 1}, 3: {"A": 1}})  # type: ignore[arg-type]
        assert maps.forgotten == {3, 7}  # gone and never watched; 0 is no namespace; 1 and 8 live
        assert sorted(counts) == [0, 1, 2] and ebpf.swept_total == 2
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
    monkeypatch.setattr(service, "live_netns", lambda proc_root="/proc": scans.append(1) or real(proc_root))
    ebpf = service.EbpfService("off")
    try:
        counts = ebpf._sweep(Maps(), {0: {"A": 1}, home: {"A": 1}})  # type: ignore[arg-type]
        assert scans == [] and sorted(counts) == sorted([0, home])
        gone = 4026000001  # no process is in it
        counts = ebpf._sweep(Maps(), {home: {"A": 1}, gone: {"A": 1}})  # type: ignore[arg-type]
        assert scans == [1] and list(counts) == [home] and ebpf.swept_total == 1
    finally:
        ebpf._thread.shutdown()

    assert home in real()
