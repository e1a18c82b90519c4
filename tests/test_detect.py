"""Detectors over sequences of samples, label overrides, and the incident tracker's damping."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nstap.capture.store import CaptureStore, Retention
from nstap.detect import DETECTORS, LabelError, build_detectors, parse_override
from nstap.detect.incidents import IncidentTracker
from nstap.detect.interface_down import InterfaceDownDetector
from nstap.detect.interface_errors import InterfaceErrorDetector
from nstap.detect.listen_overflows import ListenOverflowDetector
from nstap.detect.resets import ResetSpikeDetector
from nstap.detect.retransmits import RetransmitDetector
from nstap.detect.syn_sent import SynSentDetector, retransmits_for
from nstap.detect.udp_buffers import UdpBufferDetector
from nstap.registry import WatchedNamespace
from nstap.runtime.records import ContainerRecord
from nstap.samples import FirewallSample, InterfaceCounters, ListenQueue, NamespaceSample, SampleStore, SocketSample


def proto_sample(t: float, **counters: int) -> NamespaceSample:
    return NamespaceSample(1, t, 0.0, protocols=counters)


def run(detector, samples):
    return [detector.observe(s) for s in samples]


def test_retransmit_rate_over_a_window() -> None:
    d = RetransmitDetector(threshold=0.05, window=10, min_segments=20)
    # 10 segments/s, no retransmits for 10 s; then 2 retransmits/s on 10 segments/s.
    seq = [proto_sample(t, tcp_retransmitted_segments=0, tcp_segments_sent=10 * t) for t in range(11)]
    seq += [proto_sample(t, tcp_retransmitted_segments=2 * (t - 10), tcp_segments_sent=10 * t) for t in range(11, 16)]
    found = run(d, seq)
    assert found[:11] == [None] * 11
    hit = next(f for f in found if f is not None)
    assert hit.kind == "tcp_retransmits" and hit.numbers["retransmitted"] >= 2 and 0.05 <= hit.numbers["rate"] <= 0.2


def test_retransmits_need_enough_segments() -> None:
    d = RetransmitDetector(threshold=0.05, window=10, min_segments=20)
    seq = [proto_sample(t, tcp_retransmitted_segments=t, tcp_segments_sent=t) for t in range(8)]  # 50% but tiny
    assert run(d, seq) == [None] * 8


def test_a_lone_retransmission_is_not_an_incident() -> None:
    """CI's e2e run: one retransmission among a quiet container's 16 segments (6 %) tripped the
    long window; ``min_retransmits`` (2) of them are needed, in either window."""
    quiet = [proto_sample(t, tcp_retransmitted_segments=0, tcp_segments_sent=2 * t) for t in range(8)]
    lone = quiet + [proto_sample(8, tcp_retransmitted_segments=1, tcp_segments_sent=15)]
    assert run(RetransmitDetector(threshold=0.05, window=10, min_segments=10), lone) == [None] * 9
    two = quiet + [proto_sample(8, tcp_retransmitted_segments=2, tcp_segments_sent=15)]
    hit = run(RetransmitDetector(threshold=0.05, window=10, min_segments=10), two)[-1]
    assert hit is not None and hit.numbers["retransmitted"] == 2
    assert run(RetransmitDetector(threshold=0.05, window=10, min_segments=10, min_retransmits=1), lone)[-1] is not None


def test_retransmits_after_counter_reset() -> None:
    d = RetransmitDetector(threshold=0.05, window=10, min_segments=1)
    run(d, [proto_sample(0, tcp_retransmitted_segments=100, tcp_segments_sent=1000)])
    assert d.observe(proto_sample(1, tcp_retransmitted_segments=0, tcp_segments_sent=0)) is None


@pytest.mark.parametrize(
    "detector, key, kind",
    [
        (ListenOverflowDetector(min_increase=1), "tcp_listen_overflows", "tcp_listen_overflows"),
        (UdpBufferDetector(min_increase=1), "udp_receive_buffer_errors", "udp_receive_buffer_errors"),
    ],
)
def test_counter_increase_detectors(detector, key: str, kind: str) -> None:
    seq = [proto_sample(0, **{key: 5}), proto_sample(1, **{key: 5}), proto_sample(2, **{key: 9}), proto_sample(3, **{key: 9})]
    found = run(detector, seq)
    assert found[0] is None and found[1] is None and found[3] is None
    assert found[2].kind == kind and 4 in found[2].numbers.values()


def test_listen_overflow_names_the_full_queue() -> None:
    d = ListenOverflowDetector(min_increase=1)
    full = SocketSample({}, {}, 0.0, 0, (ListenQueue("80", 10, 9, 1), ListenQueue("443", 0, 128, 1)), 1.0)
    d.observe(NamespaceSample(1, 0, 0, protocols={"tcp_listen_overflows": 0, "tcp_listen_drops": 0}))
    f = d.observe(NamespaceSample(1, 1, 0, protocols={"tcp_listen_overflows": 3, "tcp_listen_drops": 3}, sockets=full))
    assert f.numbers == {"overflows": 3, "drops": 3, "full_queues": "80 (10/9)"}


def iface(name: str, side: str, up: bool = True, **c: int) -> InterfaceCounters:
    return InterfaceCounters(name, side, "", up, 1500, 0, 0, c.get("rx_errors", 0), c.get("rx_drops", 0), 0, 0, c.get("tx_errors", 0), c.get("tx_drops", 0))


def test_interface_drops_either_side() -> None:
    d = InterfaceErrorDetector(min_increase=1)
    s0 = NamespaceSample(1, 0, 0, interfaces=(iface("eth0", "container"), iface("veth1", "host")))
    s1 = NamespaceSample(1, 1, 0, interfaces=(iface("eth0", "container"), iface("veth1", "host", tx_drops=7)))
    assert d.observe(s0) is None
    f = d.observe(s1)
    assert f.numbers["veth1.host.tx_drops"] == 7 and "veth1 (host)" in f.summary
    assert d.observe(s1) is None  # same object again: nothing moved


def test_interface_down_while_it_lasts() -> None:
    d = InterfaceDownDetector()
    up = NamespaceSample(1, 0, 0, interfaces=(iface("eth0", "container"), iface("veth1", "host")))
    down = NamespaceSample(1, 1, 0, interfaces=(iface("eth0", "container", up=False), iface("veth1", "host", up=False)))
    never = NamespaceSample(1, 0, 0, interfaces=(iface("eth1", "container", up=False),))
    assert d.observe(never) is None  # never seen up: not a transition
    assert d.observe(up) is None
    assert d.observe(down).numbers == {"interfaces": "eth0 (container), veth1 (host)"}
    assert d.observe(down) is not None and d.observe(up) is None


def test_reset_spike_against_baseline() -> None:
    d = ResetSpikeDetector(factor=5, min_rate=10, alpha=0.5)
    seq = []
    total = 0
    for t in range(10):  # a busy service that always resets 20/s
        total += 20
        seq.append(proto_sample(t, tcp_resets_sent=total))
    found = run(d, seq)
    assert any(found[:3]) and not any(found[6:])  # learnt: 20/s is normal here
    total += 400
    assert d.observe(proto_sample(10, tcp_resets_sent=total)).numbers["rate"] == 400


@pytest.mark.parametrize("seconds, retransmits", [(1, 1), (3, 2), (7, 3), (10, 4), (15, 4), (16, 5)])
def test_syn_sent_thresholds(seconds: float, retransmits: int) -> None:
    assert retransmits_for(seconds) == retransmits


def test_syn_sent_stuck() -> None:
    d = SynSentDetector(seconds=3)
    states = {"syn_sent": 2}
    assert d.observe(NamespaceSample(1, 0, 0, sockets=SocketSample({}, states, 0.0, 1, (), 1.0))) is None
    f = d.observe(NamespaceSample(1, 1, 0, sockets=SocketSample({}, states, 0.0, 2, (), 1.0)))
    assert f.numbers == {"syn_sent": 2, "syn_retransmits": 2, "waited_seconds": 2.0} and f.started_at == -1.0


@pytest.mark.parametrize(
    "kind, value, expected",
    [
        ("tcp_retransmits", "off", (False, {})),
        ("tcp_retransmits", " ON ", (True, {})),
        ("tcp_retransmits", "0.2", (True, {"threshold": 0.2})),
        ("tcp_retransmits", "threshold=0.01,min_segments=5", (True, {"threshold": 0.01, "min_segments": 5.0})),
        ("interface_down", "off", (False, {})),
    ],
)
def test_label_overrides(kind: str, value: str, expected) -> None:
    assert parse_override(DETECTORS[kind], value) == expected


@pytest.mark.parametrize(
    ("operator", "label", "running"),
    [
        (None, None, True),
        (None, "off", False),
        (None, "on", True),
        (False, None, False),
        (False, "on", False),  # defect: a container's label switched on what the operator switched off
        (False, "0.2", False),  # a number is "on, with this threshold": off all the same
        (True, "off", False),
    ],
)
def test_the_operators_switch_wins_over_labels(operator, label, running) -> None:
    enabled = {} if operator is None else {"tcp_retransmits": operator}
    labels = {} if label is None else {"nstap.detect.tcp_retransmits": label}
    kinds = [d.kind for d in build_detectors({}, enabled, labels)]
    assert ("tcp_retransmits" in kinds) is running


# Values a container could use to make itself trip endlessly (on a healthy, idle namespace) or
# to break a detector: refused by labels exactly as by the config.
HOSTILE_VALUES = [
    ("tcp_listen_overflows", "0"),  # an increase of 0 trips every sample
    ("tcp_listen_overflows", "min_increase=0"),
    ("interface_drops", "-1"),
    ("udp_receive_buffer_errors", "0.5"),
    ("tcp_retransmits", "0"),  # a ratio of 0
    ("tcp_retransmits", "threshold=-0.1"),
    ("tcp_retransmits", "threshold=nan"),
    ("tcp_retransmits", "threshold=inf"),
    ("tcp_retransmits", "window=0"),
    ("tcp_retransmits", "min_segments=0"),
    ("tcp_reset_spike", "min_rate=0"),
    ("tcp_reset_spike", "alpha=0"),
    ("tcp_reset_spike", "alpha=2"),
    ("tcp_reset_spike", "factor=1e999"),
    ("tcp_syn_sent_stuck", "0"),
    ("tcp_syn_sent_stuck", "-inf"),
]


@pytest.mark.parametrize(
    "kind, value",
    [("tcp_retransmits", "bogus=1"), ("tcp_retransmits", "threshold=x"), ("interface_down", "3"), ("tcp_retransmits", "lots"), ("tcp_retransmits", "0.1,"), *HOSTILE_VALUES],
)
def test_bad_label_overrides(kind: str, value: str) -> None:
    with pytest.raises(LabelError):
        parse_override(DETECTORS[kind], value)


@pytest.mark.parametrize("kind, value", HOSTILE_VALUES)
def test_the_config_refuses_what_labels_refuse(kind: str, value: str) -> None:
    from nstap.config import ConfigError, load_config

    spec = DETECTORS[kind]
    name, _, number = value.rpartition("=")
    params = {name or spec.main: float(number)}
    with pytest.raises(ConfigError, match=f"'detect.detectors'.*{kind}"):
        load_config(None, {"detect": {"detectors": {kind: params}}})


def test_no_default_trips_on_an_idle_namespace() -> None:
    """Every detector, with its defaults and at the edge of every range, stays quiet on an idle namespace."""
    idle = [
        NamespaceSample(
            1, float(t), 0.0,
            interfaces=(iface("eth0", "container"), iface("veth1", "host")),
            protocols={k: 5 for k in (
                "tcp_retransmitted_segments", "tcp_segments_sent", "tcp_listen_overflows", "tcp_listen_drops", "tcp_resets_sent",
                "udp_receive_buffer_errors", "tcp_syn_retransmits", "tcp_passive_opens", "tcp_active_opens", "tcp_segments_received",
            )},
            sockets=SocketSample({"tcp": 1}, {"syn_sent": 0, "syn_recv": 0}, 0.0, 0, (ListenQueue("80", 0, 128, 1),), 1.0),
            kernel_drops={"NETFILTER_DROP": 7, "NO_SOCKET": 3},
            firewall=FirewallSample(4, False),
        )
        for t in range(30)
    ]
    for spec in DETECTORS.values():
        edges = [{}] + [{name: (p.low if not p.low_open else p.low + 1e-9)} for name, p in spec.params.items()] + [{name: p.high} for name, p in spec.params.items()]
        for edge in edges:
            detector = spec.factory(**{**spec.defaults, **edge})
            assert [f for f in run(detector, idle) if f is not None] == [], (spec.kind, edge)


def test_build_detectors_applies_config_then_labels() -> None:
    labels = {"nstap.detect.tcp_retransmits": "threshold=0.5", "nstap.detect.interface_down": "off", "nstap.detect.udp_receive_buffer_errors": "nonsense"}
    detectors = {d.kind: d for d in build_detectors({"tcp_retransmits": {"window": 30}}, {"tcp_reset_spike": False}, labels)}
    assert "interface_down" not in detectors and "tcp_reset_spike" not in detectors
    assert detectors["tcp_retransmits"].threshold == 0.5 and detectors["tcp_retransmits"].window == 30
    assert "udp_receive_buffer_errors" in detectors  # a label it cannot read is ignored, not fatal


def namespace() -> WatchedNamespace:
    r = ContainerRecord(id="ab" * 32, name="web", runtime="docker", pid=1, status="running", image="i").with_netns(9, 1)
    return WatchedNamespace(9, r, (r,))


async def test_incidents_extend_resolve_reopen_and_capture_once(tmp_path: Path) -> None:
    from nstap.detect.base import Finding

    store = CaptureStore(tmp_path, Retention(10**9, 10**9))
    await store.open()
    captures = []

    margins = []

    async def start_capture(ns, row, margin):
        captures.append(row.id)
        margins.append(margin)
        return "cap-1"

    tracker = IncidentTracker(store.index.anomalies, start_capture, cooldown=30, resolve_after=5)
    ns = namespace()
    f = Finding("tcp_retransmits", "bad", {"rate": 0.5}, started_at=98.5)
    first = tracker.found(ns, f, 100, interval=1.0)
    assert first.row.started_at == 98.5 and first.row.to_json()["detected_after"] == 1.5
    for t in range(101, 110):  # ongoing: one event
        assert tracker.found(ns, f, t) is first
    tracker.quiet(9, set(), 112)  # 3 s quiet: still active
    assert first.active
    tracker.quiet(9, set(), 115)  # 6 s quiet: resolved
    assert not first.active and first.row.resolved_at == 115
    assert tracker.found(ns, f, 130) is first and first.active  # within the cooldown: the same event
    tracker.quiet(9, set(), 140)
    later = tracker.found(ns, Finding("tcp_retransmits", "bad", {"rate": 0.5}), 140 + 31)  # after the cooldown: a new one
    assert later is not first
    await tracker.close()
    assert captures == [first.row.id, later.row.id] and margins == [2.0, 0.0]
    rows = {r.id: r for r in await store.index.anomalies.list()}
    assert rows[first.row.id].started_at == 98.5 and rows[later.row.id].started_at == 171  # no onset: detection
    assert rows[first.row.id].findings == 11 and rows[first.row.id].capture_id == "cap-1" and rows[first.row.id].resolved_at == 140
    assert sum(n for k, n in tracker.anomalies_total.items() if k[:4] == ("web", "abababababab", "docker", "tcp_retransmits")) == 2
    assert rows[later.row.id].resolved_at is not None  # closed at shutdown
    await store.close()
    await asyncio.sleep(0)


def test_counts_of_containers_that_left_are_pruned() -> None:
    """Defect: per-container counters and broken-detector sets grew with every container ever seen."""
    from nstap.detect.base import Finding
    from nstap.detect.pipeline import DetectionPipeline
    from nstap.registry import ContainerRegistry

    class Broken:
        kind = "broken"

        def observe(self, sample):
            raise RuntimeError("a detector bug")

    registry = ContainerRegistry()
    tracker = IncidentTracker(None, None, cooldown=0, resolve_after=5)  # type: ignore[arg-type]
    tracker._save = lambda inc, at: None  # no store in this test: only the counts matter
    pipeline = DetectionPipeline(registry, tracker, {}, {})
    pipeline.start(SampleStore())
    records = [
        ContainerRecord(id=f"{i:02x}" * 32, name=f"c{i}", runtime="docker", pid=1, status="running", image="i").with_netns(100 + i, 1)
        for i in range(50)
    ]
    for r in records:
        registry.upsert(r)
        ns = registry.namespaces()[r.netns]
        tracker.found(ns, Finding("tcp_retransmits", "x"), 1.0)
        pipeline._detectors[r.netns] = [Broken()]
        pipeline.on_sample(NamespaceSample(r.netns, 1.0, 0.0))
    assert len(tracker.anomalies_total) == 50 and len(pipeline._broken) == 50
    for r in records[:-1]:
        registry.remove(r.id)
    assert list(tracker.anomalies_total) == [("c49", records[-1].short_id, "docker", "tcp_retransmits", "unknown")]
    assert not pipeline._previous.keys() - {records[-1].netns}  # the samples kept for causes go with their namespaces
    assert pipeline._broken == {(records[-1].netns, "broken")}
    assert set(tracker.incidents) == {(records[-1].netns, "tcp_retransmits")}


def test_detectors_are_built_again_when_a_members_labels_change() -> None:
    """Defect: a namespace's detectors were built once, with the labels of its members at its first
    sample: a sidecar that joined later with nstap.detect.* labels was never heard."""
    from dataclasses import replace

    from nstap.detect.pipeline import DetectionPipeline
    from nstap.registry import ContainerRegistry

    registry = ContainerRegistry()
    tracker = IncidentTracker(None, None, cooldown=0, resolve_after=5)  # type: ignore[arg-type]
    pipeline = DetectionPipeline(registry, tracker, {}, {})
    pipeline.start(SampleStore())
    owner = ContainerRecord(id="aa" * 32, name="web", runtime="docker", pid=1, status="running", image="i").with_netns(7, 1)
    registry.upsert(owner)
    pipeline.on_sample(NamespaceSample(7, 1.0, 0.0))
    assert "tcp_retransmits" in [d.kind for d in pipeline._detectors[7]]
    sidecar = ContainerRecord(id="bb" * 32, name="side", runtime="docker", pid=2, status="running", image="i",
                              network_mode="container:" + "aa" * 32, labels={"nstap.detect.tcp_retransmits": "off"}).with_netns(7, 1)
    registry.upsert(sidecar)
    pipeline.on_sample(NamespaceSample(7, 2.0, 0.0))
    assert "tcp_retransmits" not in [d.kind for d in pipeline._detectors[7]]
    kept = pipeline._detectors[7]
    registry.upsert(replace(owner, labels={"unrelated": "x"}))  # not a detect label: nothing rebuilt
    pipeline.on_sample(NamespaceSample(7, 3.0, 0.0))
    assert pipeline._detectors[7] is kept



async def test_samples_stored_in_one_turn_of_the_loop_are_looked_at_after_it_one_kind_at_a_time() -> None:
    """The pipeline looks at the samples stored in one turn of the event loop (a slice of the round)
    right after it: each detector kind over all of them, then the next (each namespace's own
    instances); a finding reaches the tracker then, and nothing is left pending."""
    from nstap.detect.base import Finding as DetectorFinding
    from nstap.detect.pipeline import DetectionPipeline
    from nstap.registry import ContainerRegistry

    calls: list[tuple[str, int]] = []

    class Recorder:
        def __init__(self, kind: str) -> None:
            self.kind = kind

        def observe(self, sample: NamespaceSample) -> DetectorFinding | None:
            calls.append((self.kind, sample.netns))
            return DetectorFinding("tcp_listen_overflows", "3 listen overflows") if self.kind == "a" and sample.netns == 12 else None

    registry = ContainerRegistry()
    tracker = IncidentTracker(None, None, cooldown=0, resolve_after=5)  # type: ignore[arg-type]
    tracker._save = lambda inc, at: None  # no index in this test: only what reaches the tracker matters
    store = SampleStore()
    pipeline = DetectionPipeline(registry, tracker, {}, {})
    pipeline.start(store)
    for n in (11, 12, 13):
        registry.upsert(ContainerRecord(id=f"{n:02x}" * 32, name=f"c{n}", runtime="docker", pid=1, status="running", image="i").with_netns(n, 1))
        pipeline._detectors[n] = [Recorder("a"), Recorder("b")]
    for n in (11, 12, 13):
        store.put(NamespaceSample(n, 10.0, 0.001))
    assert calls == [] and not tracker.incidents  # stored, not looked at yet: the slice goes on
    await asyncio.sleep(0)
    assert calls == [("a", 11), ("a", 12), ("a", 13), ("b", 11), ("b", 12), ("b", 13)]
    assert list(tracker.incidents) == [(12, "tcp_listen_overflows")]
    assert pipeline._pending == []
    store.put(NamespaceSample(11, 11.0, 0.001))  # the next turn's samples make a batch of their own
    await asyncio.sleep(0)
    assert calls[6:] == [("a", 11), ("b", 11)] and pipeline._pending == []



def test_a_namespace_whose_detectors_cannot_be_built_does_not_stop_the_others_of_its_batch() -> None:
    from nstap.detect.pipeline import DetectionPipeline
    from nstap.registry import ContainerRegistry
    from nstap.supervisor import TaskSupervisor

    registry = ContainerRegistry()
    tracker = IncidentTracker(None, None, cooldown=0, resolve_after=5)  # type: ignore[arg-type]
    supervisor = TaskSupervisor()
    pipeline = DetectionPipeline(registry, tracker, {}, {}, supervisor=supervisor)
    for n in (21, 22):
        registry.upsert(ContainerRecord(id=f"{n:02x}" * 32, name=f"c{n}", runtime="docker", pid=1, status="running", image="i").with_netns(n, 1))
    built = pipeline._build

    def build(netns, ns):
        if netns == 21:
            raise RuntimeError("a bug building its detectors")
        return built(netns, ns)

    pipeline._build = build  # type: ignore[method-assign]
    pipeline.on_samples([NamespaceSample(21, 1.0, 0.0), NamespaceSample(22, 1.0, 0.0)])
    assert 21 not in pipeline._detectors and [d.kind for d in pipeline._detectors[22]] == list(DETECTORS)
    assert pipeline._previous.keys() == {22} and supervisor.failures["detector"] == 1
    pipeline.on_samples([NamespaceSample(21, 2.0, 0.0)])  # tried again at each sample, logged once, counted each time
    assert supervisor.failures["detector"] == 2 and pipeline._broken == {(21, "build")}


# -- onsets and detection latency: a fault at t=10 under steady traffic, sampled once a second ------

FAULT = 10.0


def steady(t: int, faulty: bool, **extra: int) -> NamespaceSample:
    """Steady traffic: 100 segments/s; from the fault on, 20 retransmits/s, listen overflows,
    UDP buffer errors and 50 RST/s."""
    after = max(0, t - int(FAULT)) if faulty else 0
    return proto_sample(
        t, tcp_segments_sent=100 * t, tcp_retransmitted_segments=20 * after, tcp_listen_overflows=3 * after, tcp_listen_drops=3 * after,
        udp_receive_buffer_errors=7 * after, tcp_resets_sent=t // 5 + 50 * after, **extra,
    )


@pytest.mark.parametrize(
    "detector",
    [
        RetransmitDetector(threshold=0.05, window=10, min_segments=10),
        ListenOverflowDetector(min_increase=1),
        UdpBufferDetector(min_increase=1),
        ResetSpikeDetector(factor=5, min_rate=10, alpha=0.05),
    ],
    ids=lambda d: d.kind,
)
def test_a_fault_under_steady_traffic_is_detected_within_two_samples_with_its_onset(detector) -> None:
    findings = [(t, detector.observe(steady(t, faulty=True))) for t in range(30)]
    hits = [(t, f) for t, f in findings if f is not None]
    assert hits, detector.kind
    t, first = hits[0]
    assert FAULT < t <= FAULT + 2, (detector.kind, t)
    assert first.started_at is not None and FAULT - 1.5 <= first.started_at <= FAULT, (detector.kind, first.started_at)
    healthy = type(detector)(**{k: getattr(detector, k) for k in ("threshold", "window", "min_segments", "min_increase", "factor", "min_rate", "alpha") if hasattr(detector, k)})
    assert [f for f in (healthy.observe(steady(t, faulty=False)) for t in range(30)) if f] == []


def test_the_long_window_alone_would_be_late() -> None:
    """Defect: a 10 s ratio diluted by the healthy segments before the fault tripped 9 s late."""
    slow = RetransmitDetector(threshold=0.05, window=10, min_segments=10, short_window=600, short_min_segments=1e12, steady_rate=1e12)
    fast = RetransmitDetector(threshold=0.05, window=10, min_segments=10)
    seq = [proto_sample(t, tcp_segments_sent=100 * t, tcp_retransmitted_segments=6 * max(0, t - 10)) for t in range(30)]
    first = lambda d: next(t for t, s in enumerate(seq) if d.observe(s))  # noqa: E731
    assert first(fast) <= 12 and first(slow) >= 15


def test_one_retransmit_on_an_idle_connection_is_not_an_incident() -> None:
    d = RetransmitDetector(threshold=0.05, window=10, min_segments=10)
    seq = [proto_sample(t, tcp_segments_sent=2 * t, tcp_retransmitted_segments=1 if t >= 20 else 0) for t in range(30)]
    assert [f for f in run(d, seq) if f] == []


def test_retransmit_onset_ignores_an_old_isolated_retransmit() -> None:
    d = RetransmitDetector(threshold=0.05, window=10, min_segments=10)
    seq = [proto_sample(t, tcp_segments_sent=100 * t, tcp_retransmitted_segments=(1 if t >= 3 else 0) + 20 * max(0, t - 10)) for t in range(14)]
    hit = next(f for f in run(d, seq) if f)
    assert hit.started_at == pytest.approx(10 - 0.2)


def test_state_detector_onsets() -> None:
    down = InterfaceDownDetector()
    seq = [NamespaceSample(1, float(t), 0.0, interfaces=(iface("eth0", "container", up=t < 10),)) for t in range(14)]
    hits = [f for f in run(down, seq) if f]
    assert hits and all(f.started_at == 10.0 for f in hits)
    syn = SynSentDetector(seconds=3)
    # A SYN sent at t=10.2 and never answered: retransmitted at 11.2, 13.2, 17.2.
    seq = [
        NamespaceSample(1, float(t), 0.0, sockets=SocketSample({}, {"syn_sent": 1 if t >= 11 else 0}, 0.0, sum(t >= x for x in (11.2, 13.2, 17.2)), (), 1.0))
        for t in range(10, 20)
    ]
    first = next((t, f) for t, f in zip(range(10, 20), run(syn, seq)) if f)
    assert first[0] <= 3 + 10.2 + 2 and 10.2 <= first[1].started_at <= 11.2  # never before the SYN, at most a sample after


def test_interface_drop_onset_is_the_sample_before() -> None:
    d = InterfaceErrorDetector(min_increase=1)
    same = (iface("eth0", "container"), iface("veth1", "host"))
    seq = [NamespaceSample(1, float(t), 0, interfaces=same) for t in range(5)]  # unchanged: the same tuple
    seq.append(NamespaceSample(1, 5.0, 0, interfaces=(iface("eth0", "container"), iface("veth1", "host", rx_drops=3))))
    hit = run(d, seq)[-1]
    assert hit is not None and hit.started_at == 4.0 and hit.numbers["veth1.host.rx_drops"] == 3


def test_retransmit_onset_is_where_the_ratio_left_its_baseline() -> None:
    """A namespace that always retransmits a little (0.5 %): the onset is where the ratio rose, not
    the start of the window (the counter grows at every sample)."""
    d = RetransmitDetector(threshold=0.05, window=10, min_segments=10)
    seq = [proto_sample(t, tcp_segments_sent=1000 * t, tcp_retransmitted_segments=5 * t + 150 * max(0, t - 20)) for t in range(25)]
    hit = next(f for f in run(d, seq) if f)
    assert hit.started_at == pytest.approx(20 - 0.2)


async def test_an_events_cause_is_named_at_detection_kept_when_its_evidence_goes_and_logged_when_it_changes(tmp_path: Path) -> None:
    """The tracker names the cause from the window (here: the host end of the veth down), keeps it
    when the evidence goes (the link back up while the event lasts), takes a detector's own cause
    over the window's, and counts the event under the cause named at detection."""
    from structlog.testing import capture_logs

    from nstap.detect.base import Finding as F
    from nstap.detect.cause import Cause
    from nstap.detect.cause_finder import CauseFinder
    from nstap.registry import ContainerRegistry

    def links(up: bool) -> tuple[InterfaceCounters, ...]:
        return (InterfaceCounters("eth0", "container", "veth9", True, 1500, *[0] * 8), InterfaceCounters("veth9", "host", "eth0", up, 1500, *[0] * 8))

    store = CaptureStore(tmp_path, Retention(10**9, 10**9))
    await store.open()
    tracker = IncidentTracker(store.index.anomalies, None, cooldown=30, resolve_after=5, causes=CauseFinder(ContainerRegistry()))
    ns = namespace()
    before = NamespaceSample(9, 99.0, 0.0, interfaces=links(True))
    down = F("interface_down", "down: veth9", {"interfaces": "veth9"})
    with capture_logs() as logs:
        inc = tracker.found(ns, down, 100.0, sample=NamespaceSample(9, 100.0, 0.0, interfaces=links(False)), previous=before)
        assert (inc.row.cause, inc.row.to_json()["cause"]["text"]) == ("link_down", "interface veth9 (host end of eth0) is down")
        tracker.found(ns, down, 101.0, sample=NamespaceSample(9, 101.0, 0.0, interfaces=links(True)))  # back up: nothing to see
        assert inc.row.cause == "link_down"
        tracker.found(ns, F("interface_down", "x", cause=Cause("mtu", "told by the detector")), 102.0)
        assert (inc.row.cause, inc.row.cause_text) == ("mtu", "told by the detector")
    assert [e["cause"] for e in logs if e["event"] == "anomaly_detected"] == ["link_down"]
    assert [e["cause"] for e in logs if e["event"] == "anomaly_cause"] == ["mtu"]
    assert list(tracker.anomalies_total) == [("web", "abababababab", "docker", "interface_down", "link_down")]
    await tracker.close()
    assert (await store.index.anomalies.get(inc.row.id)).cause == "mtu"
    await store.close()
