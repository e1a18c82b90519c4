"""Parsers of /proc/net files and runtime inspect answers, against files recorded on a real host."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nstap.netns.links import parse_net_dev
from nstap.runtime.records import RecordError, record_from_inspect
from nstap.samplers.protocols import PROTOCOL_COUNTERS, TableLayout, parse_tables
from nstap.samplers.sockets import parse_sockstat, port_label, walk_interval

FIXTURES = Path(__file__).parent / "fixtures"


def naive_tables(data: bytes) -> dict[tuple[str, str], int]:
    """An independent, obviously-correct reading: zip each header line with its value line."""
    lines = data.decode().splitlines()
    out = {}
    for head, values in zip(lines[0::2], lines[1::2]):
        section = head.split(":")[0]
        for name, value in zip(head.split()[1:], values.split()[1:]):
            out[(section, name)] = int(value)
    return out


def numbered(data: bytes) -> bytes:
    """The same file with every value replaced by a distinct number, so a wrong column shows."""
    lines = data.decode().splitlines()
    out = []
    n = 1000
    for i, line in enumerate(lines):
        if i % 2 == 0:
            out.append(line)
            continue
        prefix, *values = line.split()
        nums = []
        for _ in values:
            n += 1
            nums.append(str(n))
        out.append(" ".join([prefix, *nums]))
    return ("\n".join(out) + "\n").encode()


@pytest.mark.parametrize("name", ["snmp", "netstat"])
def test_protocol_tables_read_the_right_columns(name: str) -> None:
    data = numbered((FIXTURES / "proc" / name).read_bytes())
    wanted = tuple(c for c in PROTOCOL_COUNTERS if c.file == name)
    values, layout = parse_tables(data, wanted, None)
    expected = naive_tables(data)
    assert values == {c.key: expected[(c.section, c.field)] for c in wanted}
    # The layout is reused while the headers are unchanged ...
    again, layout2 = parse_tables(data, wanted, layout)
    assert layout2 is layout and again == values


def test_protocol_layout_rebuilt_when_headers_change() -> None:
    data = (FIXTURES / "proc" / "snmp").read_bytes()
    wanted = tuple(c for c in PROTOCOL_COUNTERS if c.file == "snmp")
    _, layout = parse_tables(data, wanted, None)
    # A kernel with one more Tcp column before RetransSegs: the old layout must not be trusted.
    lines = data.decode().splitlines()
    tcp = next(i for i, line in enumerate(lines) if line.startswith("Tcp:"))
    lines[tcp] = lines[tcp].replace("Tcp: ", "Tcp: NewThing ", 1)
    lines[tcp + 1] = lines[tcp + 1].replace("Tcp: ", "Tcp: 77 ", 1)
    changed = ("\n".join(lines) + "\n").encode()
    values, layout2 = parse_tables(changed, wanted, layout)
    assert layout2 is not layout
    assert values["tcp_retransmitted_segments"] == naive_tables(changed)[("Tcp", "RetransSegs")]


def test_protocol_counter_missing_from_kernel_is_left_out() -> None:
    data = b"Tcp: RtoAlgorithm RetransSegs\nTcp: 1 5\n"
    wanted = tuple(c for c in PROTOCOL_COUNTERS if c.file == "snmp")
    layout = TableLayout(data, wanted)
    values, _ = parse_tables(data, wanted, layout)
    assert values == {"tcp_retransmitted_segments": 5}


def test_net_dev() -> None:
    text = (
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n"
        "    lo:       10       1    0    0    0     0          0         0       10       1    0    0    0     0       0          0\n"
        "  eth0: 123456789012   2000    3    4    5     6          7         8   987654     3000    9   10   11    12      13         14\n"
    )
    parsed = parse_net_dev(text.encode())
    assert parsed["eth0"] == (123456789012, 2000, 3, 4, 987654, 3000, 9, 10)
    assert parsed["lo"] == (10, 1, 0, 0, 10, 1, 0, 0)
    real = parse_net_dev((FIXTURES / "proc" / "dev").read_bytes())
    assert set(real) == {"lo", "eth0"}


def test_sockstat() -> None:
    in_use: dict[str, int] = {}
    v4 = b"sockets: used 9\nTCP: inuse 3 orphan 1 tw 7 alloc 5 mem 2\nUDP: inuse 2 mem 0\nUDPLITE: inuse 0\nRAW: inuse 1\nFRAG: inuse 0 memory 0\n"
    tw, layout = parse_sockstat(v4, in_use)
    assert tw == 7
    _, layout6 = parse_sockstat(b"TCP6: inuse 4\nUDP6: inuse 5\nUDPLITE6: inuse 0\nRAW6: inuse 0\nFRAG6: inuse 0 memory 0\n", in_use)
    assert in_use == {"tcp": 3, "udp": 2, "raw": 1, "tcp6": 4, "udp6": 5, "raw6": 0}
    # The layout is reused for the next read of the same shape, and rebuilt for another shape.
    again: dict[str, int] = {}
    tw2, layout2 = parse_sockstat(v4.replace(b"inuse 3", b"inuse 8").replace(b"tw 7", b"tw 0"), again, layout)
    assert layout2 is layout and tw2 == 0 and again["tcp"] == 8
    other: dict[str, int] = {}
    tw3, layout3 = parse_sockstat(b"sockets: used 1\nTCP: inuse 5 orphan 0 tw 2 alloc 1 mem 0 extra 9\nUDP: inuse 1 mem 0\n", other, layout)
    assert layout3 is not layout and tw3 == 2 and other == {"tcp": 5, "udp": 1}
    real: dict[str, int] = {}
    parse_sockstat((FIXTURES / "proc" / "sockstat").read_bytes(), real)
    assert real["tcp"] == 1


@pytest.mark.parametrize(
    "port, label",
    [(80, "80"), (32767, "32767"), (32768, "ephemeral"), (45000, "ephemeral"), (60999, "ephemeral"), (61000, "61000")],
)
def test_listener_port_labels(port: int, label: str) -> None:
    assert port_label(port, (32768, 60999)) == label


@pytest.mark.parametrize(
    "cost, budget, interval, max_interval, expected",
    [
        (0.005, 0.00005, 1.0, 60.0, 60.0),  # host-wide hash: 5 ms a walk -> capped at a minute
        (0.0025, 0.00005, 1.0, 60.0, 50.0),
        (0.00008, 0.00005, 1.0, 60.0, 1.6),  # own small hash: about every interval
        (0.00001, 0.00005, 1.0, 60.0, 1.0),  # never more often than the interval
        (0.001, 0.0, 1.0, 60.0, 60.0),  # no budget: as rarely as allowed
        (0.002, 0.0001, 0.5, 30.0, 10.0),
    ],
)
def test_walk_interval(cost: float, budget: float, interval: float, max_interval: float, expected: float) -> None:
    assert walk_interval(cost, budget, interval, max_interval) == pytest.approx(expected)


def load(name: str) -> dict:
    return json.loads((FIXTURES / "inspect" / name).read_text())


def test_docker_record_with_compose_labels_and_ports() -> None:
    r = record_from_inspect(load("docker-compose-ports.json"), "docker")
    assert r.runtime == "docker" and len(r.id) == 64 and r.short_id == r.id[:12]
    assert r.compose_project == "shop" and r.compose_service == "web"
    assert r.network_mode == "default"
    assert [n.network for n in r.networks] == ["bridge"] and r.networks[0].ipv4.startswith("172.")
    ports = {(p.container_port, p.protocol, p.host_ip, p.host_port) for p in r.ports}
    assert (80, "tcp", "127.0.0.1", 18080) in ports
    assert any(p[0] == 443 and p[1] == "udp" and p[3] == 18443 for p in ports)
    assert r.enabled and not r.joins_other


def test_docker_joined_and_host_records() -> None:
    joined = record_from_inspect(load("docker-joined.json"), "docker")
    assert joined.joins_other and joined.networks == ()
    host = record_from_inspect(load("docker-host.json"), "docker").with_netns(4026531840, 4026531840)
    assert host.host_network and host.network_mode == "host"


def test_podman_pod_member_record() -> None:
    r = record_from_inspect(load("podman-pod-member.json"), "podman", pod="pod1")
    assert r.pod == "pod1" and r.compose_project == "pod1"
    assert r.joins_other and r.network_mode.startswith("container:")


def test_opt_out_label() -> None:
    data = load("docker-bridge.json")
    data["Config"]["Labels"] = {"nstap.enable": "false"}
    assert not record_from_inspect(data, "docker").enabled
    data["Config"]["Labels"] = {"nstap.enable": "true"}
    assert record_from_inspect(data, "docker").enabled


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(Id="not-hex-at-all-nope"),
        lambda d: d.update(State={"Pid": 0, "Running": True}),
        lambda d: d.update(State="running"),
        lambda d: d.pop("Id"),
    ],
)
def test_bad_inspect_answers_raise_record_error(mutate) -> None:
    data = load("docker-bridge.json")
    mutate(data)
    with pytest.raises(RecordError):
        record_from_inspect(data, "docker")


def test_inspect_answer_that_is_not_an_object() -> None:
    with pytest.raises(RecordError):
        record_from_inspect([], "docker")  # type: ignore[arg-type]
