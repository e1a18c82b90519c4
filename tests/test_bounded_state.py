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
