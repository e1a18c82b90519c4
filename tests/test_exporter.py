"""The exporter over hand-made samples: series appear, carry their owner's labels, and vanish."""

from __future__ import annotations

import subprocess

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from conftest import tool
from nstap import exporter
from nstap.exporter import ContainerCollector, Family, Labels, render
from nstap.registry import ContainerRegistry
from nstap.runtime.records import ContainerRecord
from nstap.samples import InterfaceCounters, ListenQueue, NamespaceSample, SampleStore, SocketSample
from nstap.samplers.sockets import STATE_NAMES


class Runtime:
    name, kind, version, up, events_total, reconnects_total = "docker", "docker", "28.0", True, 7, 1


def record(cid: str, netns: int, name: str, mode: str = "bridge") -> ContainerRecord:
    return ContainerRecord(id=cid * 32, name=name, runtime="docker", pid=1, status="running", image="img:1", network_mode=mode).with_netns(netns, 1)


def sample(netns: int) -> NamespaceSample:
    iface = InterfaceCounters("eth0", "container", "veth1", True, 1500, 10, 2, 0, 1, 20, 3, 0, 0)
    host = InterfaceCounters("veth1", "host", "eth0", True, 1500, 20, 3, 0, 0, 10, 2, 0, 4)
    states = {"listen": 1, "time_wait": 2, **{s: 0 for s in STATE_NAMES[2:]}}
    sockets = SocketSample({"tcp": 1, "udp": 2, "udp6": 1}, states, 0.0, 0, (ListenQueue("80", 3, 9, 1),), 1.0)
    return NamespaceSample(netns, 1_700_000_000.5, 0.0002, (iface, host), {"tcp_retransmitted_segments": 5, "tcp_established_connections": 1}, sockets)


def parse(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_series_follow_the_registry_and_the_store() -> None:
    registry, store = ContainerRegistry(), SampleStore()
    collector = ContainerCollector(registry, store, [Runtime()])
    owner, joiner = record("ab", 5, "web"), record("cd", 5, "side", mode="container:" + "ab" * 32)
    registry.upsert(owner)
    registry.upsert(joiner)
    store.put(sample(5))
    got = parse(collector.render())
    base = (("container", "web"), ("container_id", "abababababab"), ("runtime", "docker"))
    host_labels = tuple(sorted(base + (("interface", "veth1"), ("peer", "eth0"), ("side", "host"))))
    assert got[("nstap_interface_transmit_drops_total", host_labels)] == 4
    assert got[("nstap_tcp_retransmitted_segments_total", tuple(sorted(base)))] == 5
    assert got[("nstap_tcp_established_connections", tuple(sorted(base)))] == 1
    assert got[("nstap_sockets", tuple(sorted(base + (("protocol", "udp"), ("state", "open")))))] == 3
    assert got[("nstap_tcp_listen_queue_length", tuple(sorted(base + (("port", "80"),))))] == 3
    assert got[("nstap_tcp_listen_queue_limit", tuple(sorted(base + (("port", "80"),))))] == 9
    assert got[("nstap_interface_up", host_labels)] == 1 and got[("nstap_interface_mtu_bytes", host_labels)] == 1500
    assert got[("nstap_sockets", tuple(sorted(base + (("protocol", "tcp"), ("state", "time_wait")))))] == 2
    assert got[("nstap_socket_states_timestamp_seconds", tuple(sorted(base)))] == 1_700_000_000.5  # exact: as of the sample
    # Both members are listed with the shared netns; only the owner has series.
    infos = {dict(k[1])["container"]: dict(k[1])["netns"] for k in got if k[0] == "nstap_container_info"}
    assert infos == {"web": "5", "side": "5"}
    assert not [k for k in got if dict(k[1]).get("container") == "side" and k[0] != "nstap_container_info"]
    # The container goes: every one of its series goes with it.
    registry.remove(owner.id)
    registry.remove(joiner.id)
    store.drop(5)
    left = parse(collector.render())
    assert not [k for k in left if ("container_id", "abababababab") in k[1] or ("container_id", "cdcdcdcdcdcd") in k[1]]
    assert left[("nstap_runtime_events_total", (("runtime", "docker"),))] == 7


class Drops:
    """What the exporter reads of the eBPF service (a stand-in: the real one needs the program loaded,
    which tests/test_ebpf.py does)."""

    up, collector, mibs = True, None, None

    def host_counts(self) -> dict[str, int]:
        return {"NO_SOCKET": 2}


def test_kernel_drops_are_a_series_per_reason_from_each_scrapes_counts() -> None:
    registry, store = ContainerRegistry(), SampleStore()
    registry.upsert(record("ab", 5, "web"))
    collector = ContainerCollector(registry, store, [Runtime()], ebpf=Drops())
    base = (("container", "web"), ("container_id", "abababababab"), ("runtime", "docker"))
    for counts in ({"NO_SOCKET": 3, "TCP_CLOSE": 1}, {"NO_SOCKET": 4, "TCP_CLOSE": 1, "OTHERHOST": 7}):
        store.put(sample(5)._replace(kernel_drops=counts))
        got = parse(collector.render())  # the second render reuses the first one's label sets
        drops = {dict(k[1])["reason"]: v for k, v in got.items() if k[0] == "nstap_kernel_drops_total" and set(base) <= set(k[1])}
        assert drops == counts
    assert got[("nstap_host_kernel_drops_total", (("reason", "NO_SOCKET"),))] == 2


def test_rendered_text_passes_promtool() -> None:
    registry, store = ContainerRegistry(), SampleStore()
    registry.upsert(record("ab", 5, 'we"ird\\name'))
    store.put(sample(5))
    text = ContainerCollector(registry, store, [Runtime()]).render()
    proc = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
    assert parse(text)  # and it parses, label escaping included


EDGE_VALUES = (5, 0, -3, 1.5, float("inf"), float("-inf"), float("nan"), True, False, 1e22, -0.0, 1 << 63, (1 << 64) - 1, 1 << 64, -(1 << 63), -(1 << 70))
EDGE_TEXT = ["5", "0", "-3", "1.5", "+Inf", "-Inf", "NaN", "1", "0", "1e+22", "-0.0", str(1 << 63), str((1 << 64) - 1), str(1 << 64), str(-(1 << 63)), str(-(1 << 70))]


def test_render_formats_values() -> None:
    fam = Family("x_total", "counter", "help")
    for v in EDGE_VALUES:
        fam.add(Labels((("a", "1"),)), v)
    lines = render([fam]).decode().splitlines()[2:]
    assert [line.split(" ")[1] for line in lines] == EDGE_TEXT


def test_the_line_formatter_is_built_and_formats_as_family_add() -> None:
    """make test builds the C formatter (the daemon's scrapes use it); it writes every value as
    Family.add does, and as its Python twin does, from a tuple by index and from a dict by key."""
    assert exporter.COMPILED and exporter.put is not exporter.put_py
    from nstap._exposition import put as c_put

    for formatter in (c_put, exporter.put_py):
        body = bytearray(b"kept\n")
        formatter(tuple((body, b"x_total", i) for i in range(len(EDGE_VALUES))), b'{a="1"}', EDGE_VALUES, None)
        assert body.decode().splitlines()[1:] == [f'x_total{{a="1"}} {text}' for text in EDGE_TEXT]
        by_key = bytearray()
        formatter(((by_key, b"a", "x"), (by_key, b"b", "gone"), (by_key, b"c", "none"), (by_key, b"d", "y")), "{é=\"ü\"}".encode(), {"x": 1, "none": None, "y": 2.5}, None)
        assert by_key.decode() == 'a{é="ü"} 1\nd{é="ü"} 2.5\n'
        by_key.clear()
        formatter(((by_key, b"b", "gone"), (by_key, b"c", "none")), b"", {"none": None}, 0)
        assert by_key == b"b 0\nc 0\n"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(), st.floats(), st.booleans()), max_size=8), st.binary(max_size=30), st.data())
def test_c_and_python_formatters_agree_on_any_values(values, text, data) -> None:
    """Any int (of any width), float or bool, by index or by key, missing or not: the same bytes."""
    from nstap._exposition import put as c_put

    specs_at = [(i, data.draw(st.binary(min_size=1, max_size=10))) for i in range(len(values))]
    keyed = {f"k{i}": v for i, v in enumerate(values) if data.draw(st.booleans())}
    missing = data.draw(st.one_of(st.none(), st.integers(-5, 5)))
    out = []
    for formatter in (c_put, exporter.put_py):
        body = bytearray()
        formatter(tuple((body, name, i) for i, name in specs_at), text, tuple(values), None)
        formatter(tuple((body, name, f"k{i}") for i, name in specs_at), text, keyed, missing)
        out.append(bytes(body))
    assert out[0] == out[1]


def test_a_render_in_python_is_the_same_bytes(monkeypatch) -> None:
    """Where the formatter is not built, a scrape gives the same exposition, byte for byte."""
    registry, store = ContainerRegistry(), SampleStore()
    registry.upsert(record("ab", 5, "wéb"))
    registry.upsert(record("cd", 6, "other"))
    store.put(sample(5)._replace(kernel_drops={"NO_SOCKET": 3, "TCP_CLOSE": 1}))
    idle = SocketSample({"tcp": 1}, {"listen": 1}, 0.0, 0, (), float("inf"))  # the other states left out: 0
    store.put(sample(6)._replace(protocols={"tcp_retransmitted_segments": 1 << 64}, sockets=idle))
    compiled = ContainerCollector(registry, store, [Runtime()], ebpf=Drops())
    first = compiled.exposition()
    assert compiled.exposition() == first  # the second render, from the label sets and specs it kept
    monkeypatch.setattr(exporter, "put", exporter.put_py)
    python = ContainerCollector(registry, store, [Runtime()], ebpf=Drops())
    assert python.exposition() == first and python.exposition() == first
    got, other = parse(first.decode()), (("container", "other"), ("container_id", "cdcdcdcdcdcd"), ("runtime", "docker"))
    assert got[("nstap_tcp_retransmitted_segments_total", other)] == 1 << 64
    assert got[("nstap_sockets", tuple(sorted((*other, ("protocol", "tcp"), ("state", "established")))))] == 0


class Watched:
    """What the exporter reads from the watcher pool: the namespaces with an attached watcher."""

    def __init__(self) -> None:
        self.attached: dict = {}

    def watched(self) -> dict:
        return self.attached


def test_containers_watched_counts_attached_namespaces_only() -> None:
    """Defect: it counted containers eligible for a watcher, attached or not."""
    registry, store, pool = ContainerRegistry(), SampleStore(), Watched()
    collector = ContainerCollector(registry, store, [Runtime()], pool)
    owner, joiner = record("ab", 5, "web"), record("cd", 5, "side", mode="container:" + "ab" * 32)
    registry.upsert(owner)
    registry.upsert(joiner)
    registry.upsert(record("ef", 6, "other"))
    got = parse(collector.render())
    assert got[("nstap_containers_watched", (("runtime", "docker"),))] == 0 and got[("nstap_namespaces_watched", ())] == 0
    pool.attached = {5: registry.namespaces()[5]}
    got = parse(collector.render())
    assert got[("nstap_containers_watched", (("runtime", "docker"),))] == 2 and got[("nstap_namespaces_watched", ())] == 1


def test_hostile_interface_and_port_counts_stay_bounded() -> None:
    """A sample with many interfaces and listener ports renders a bounded number of series."""
    registry, store = ContainerRegistry(), SampleStore()
    registry.upsert(record("ab", 5, "web"))
    collector = ContainerCollector(registry, store, [Runtime()])
    ifaces = tuple(InterfaceCounters(f"d{i}", "container", "", True, 1500, *([i] * 8)) for i in range(65)) + (
        InterfaceCounters("other", "container", "", True, 0, *([1] * 8)),
    )
    states = {"listen": 1, "time_wait": 0, **{s: 0 for s in STATE_NAMES[2:]}}
    listen = tuple(ListenQueue(str(p), 0, 128, 1) for p in range(1000, 1064)) + (ListenQueue("other", 5, 900, 900),)
    store.put(NamespaceSample(5, 1.0, 0.001, ifaces, {}, SocketSample({"tcp": 1000}, states, 0.0, 0, listen, 1.0)))
    got = parse(collector.render())
    mine = [k for k in got if ("container_id", "abababababab") in k[1]]
    assert len(mine) < 66 * 10 + 65 * 2 + 40
    assert got[("nstap_tcp_listen_queue_limit", tuple(sorted((("container", "web"), ("container_id", "abababababab"), ("runtime", "docker"), ("port", "other")))))] == 900


def test_disabled_families_are_left_out() -> None:
    """metrics.disabled (names and patterns) drops whole families; the others are unchanged."""
    from nstap.config import MetricsConfig
    from nstap.exporter import family_names

    registry, store = ContainerRegistry(), SampleStore()
    registry.upsert(record("ab", 5, "web"))
    ifaces = (InterfaceCounters("eth0", "container", "", True, 1500, *([3] * 8)),)
    states = {"listen": 1, "time_wait": 0, **{s: 0 for s in STATE_NAMES[2:]}}
    store.put(NamespaceSample(5, 1.0, 0.001, ifaces, {"udp_sent_datagrams": 4, "tcp_timeouts": 2, "tcp_segments_sent": 9},
                              SocketSample({"tcp": 1}, states, 0.0, 0, (), 1.0)))
    full = parse(ContainerCollector(registry, store, [Runtime()]).render())
    disabled = MetricsConfig(disabled=("nstap_udp_*", "nstap_interface_up", "nstap_tcp_timeouts_total")).expand()
    assert "nstap_udp_sent_datagrams_total" in disabled and "nstap_udp_no_port_datagrams_total" in disabled
    less = parse(ContainerCollector(registry, store, [Runtime()], disabled=disabled).render())
    gone = {name for name, _ in full} - {name for name, _ in less}
    assert gone == {"nstap_udp_sent_datagrams_total", "nstap_interface_up", "nstap_tcp_timeouts_total"}, gone
    assert {k: v for k, v in full.items() if k[0] not in gone} == less
    # Every family the collector exported is one metrics.disabled may name.
    assert {name for name, _ in full} <= set(family_names())


def test_process_families_match_prometheus_clients_and_count_descriptors_without_listing() -> None:
    """The daemon's process collector exports prometheus-client's process_* families (names, help,
    types); its open-descriptor count is the kernel's (the size of /proc/self/fd) and follows
    descriptors opened and closed, and a directory whose size says nothing is counted entry by entry."""
    import os

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client import ProcessCollector as ClientProcessCollector

    from nstap.exporter import build_registry
    from nstap.instruments import open_fds

    def process_families(registry: CollectorRegistry) -> dict[str, tuple[str, str]]:
        text = generate_latest(registry).decode()
        return {f.name: (f.type, f.documentation) for f in text_string_to_metric_families(text) if f.name.startswith("process_")}

    client = CollectorRegistry()
    ClientProcessCollector(registry=client)
    ours = process_families(build_registry())
    assert ours == process_families(client) and len(ours) == 6

    def exported_fds() -> float:
        text = generate_latest(build_registry()).decode()
        return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "process_open_fds")

    before = open_fds()
    assert os.stat("/proc/self/fd").st_size == before > 0  # this kernel counts them (6.2+)
    assert before == len(os.listdir("/proc/self/fd")) - 1  # the listing holds one more while it lists
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(300)]
    try:
        assert open_fds() == before + 300
        assert exported_fds() == before + 300
    finally:
        for fd in fds:
            os.close(fd)
    assert open_fds() == before
    # /proc/self/task reports size 0: the fallback counts its entries (this process's threads).
    assert os.stat("/proc/self/task").st_size == 0
    assert open_fds("/proc/self/task") == len(os.listdir("/proc/self/task")) >= 1


def test_a_reload_of_metrics_disabled_applies_to_the_next_scrape() -> None:
    """metrics.disabled set again (a reload): a family turned back on is exported with its values,
    one turned off goes, and the socket lines kept from the scrapes before still land."""
    registry, store = ContainerRegistry(), SampleStore()
    registry.upsert(record("ab", 5, "web"))
    store.put(sample(5))
    collector = ContainerCollector(registry, store, [Runtime()], disabled=frozenset({"nstap_interface_receive_bytes_total"}))
    base = (("container", "web"), ("container_id", "abababababab"), ("runtime", "docker"))
    host = tuple(sorted(base + (("interface", "veth1"), ("peer", "eth0"), ("side", "host"))))
    tcp_tw = tuple(sorted(base + (("protocol", "tcp"), ("state", "time_wait"))))
    before = parse(collector.render())
    assert ("nstap_interface_receive_bytes_total", host) not in before and before[("nstap_sockets", tcp_tw)] == 2
    collector.disabled = frozenset({"nstap_interface_mtu_bytes"})
    after = parse(collector.render())
    assert after[("nstap_interface_receive_bytes_total", host)] == 20
    assert ("nstap_interface_mtu_bytes", host) not in after
    assert after[("nstap_sockets", tcp_tw)] == 2 and after == parse(collector.render())


def test_the_samples_part_and_the_rest_make_the_whole_exposition() -> None:
    """What a scrape rendered ahead serves (api/ahead.py): the samples' families made ahead and the
    rest at the scrape are the full exposition, each family in one part only, and either part
    rendered alone keeps its label sets (the same bytes however the parts alternate)."""
    registry, store = ContainerRegistry(), SampleStore()
    registry.upsert(record("ab", 5, "web"))
    registry.upsert(record("cd", 6, "other"))
    store.put(sample(5)._replace(kernel_drops={"NO_SOCKET": 3, "TCP_CLOSE": 1}))
    store.put(sample(6))
    collector = ContainerCollector(registry, store, [Runtime()], ebpf=Drops())
    scrape = collector.snapshot()
    whole = collector.exposition(scrape)
    samples, rest = collector.exposition(scrape, exporter.SAMPLES), collector.exposition(scrape, exporter.STATE)
    assert samples + rest == whole
    names = [{f.name for f in text_string_to_metric_families(part.decode())} for part in (samples, rest)]
    assert not names[0] & names[1]
    assert {"nstap_interface_receive_bytes", "nstap_kernel_drops", "nstap_sockets"} <= names[0]
    assert {"nstap_container_info", "nstap_host_kernel_drops", "nstap_build_info"} <= names[1]
    for _ in range(2):
        assert collector.exposition(scrape, exporter.SAMPLES) == samples
        assert collector.exposition(scrape, exporter.STATE) == rest
    assert collector.exposition(scrape) == whole


def fleet_collector(n: int) -> ContainerCollector:
    registry, store = ContainerRegistry(), SampleStore()
    for i in range(n):
        registry.upsert(record(f"{i:02x}", 100 + i, f"web{i}"))
        store.put(sample(100 + i)._replace(kernel_drops={"NO_SOCKET": i, "TCP_CLOSE": 1}))
    return ContainerCollector(registry, store, [Runtime()], ebpf=Drops())


def test_a_render_neither_keeps_its_text_nor_holds_it_twice() -> None:
    """The families kept from one render to the next (their bodies are reused) are emptied once the
    text is made: at 1,000 containers they held the last scrape's ~10 MB of sample lines between
    scrapes. And written piece by piece (a scrape's gzip), the text is never joined into one
    buffer: the peak of a render is about the text once, not two or three times."""
    import tracemalloc

    collector = fleet_collector(200)
    scrape = collector.snapshot()
    text = collector.exposition(scrape)  # label sets made and kept: the steady state
    pieces: list[bytes] = []
    collector.write(lambda piece: pieces.append(bytes(piece)), scrape)
    assert b"".join(pieces) == text  # the same text, piece by piece
    written = [0]
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        collector.write(lambda piece: None, scrape)
        peak_from = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        collector.write(lambda piece: written.__setitem__(0, written[0] + len(piece)), scrape)
        held, peak = tracemalloc.get_traced_memory()
        assert written[0] == len(text) > 1_000_000
        # What tracing sees held now is the label caches' dicts replaced since it began (~0.1 of
        # the text here), and the text if the families kept it.
        assert held - start < 0.5 * len(text), (held - start, len(text))
        assert peak - peak_from < 1.3 * len(text), (peak - peak_from, len(text))  # never joined
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        assert collector.exposition(scrape) == text
        held = tracemalloc.get_traced_memory()[0]
        assert held - before < 0.2 * len(text), (held - before, len(text))  # exposition: the joined text, freed here
    finally:
        tracemalloc.stop()
