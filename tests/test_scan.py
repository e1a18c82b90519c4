"""The /proc/net scanner: plans learnt from recorded files, the C pass and the Python pass agreeing."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nstap.netns import scan
from nstap.netns.links import parse_net_dev
from nstap.samplers.protocols import PROTOCOL_COUNTERS
from nstap.samplers.sockets import SOCKSTAT_WANTED

PROC = Path(__file__).parent / "fixtures" / "proc"


def both(plan: scan.Plan, data: bytes):
    """The answer of the C pass, after checking that the Python pass gives the same."""
    python = scan.scan_py(data, plan.steps, plan.expected, plan.ntokens, plan.nvalues)
    from nstap.netns._scan import scan as c_scan

    compiled = c_scan(data, plan.packed, plan.expected, plan.ntokens, plan.nvalues)
    assert compiled == python, (compiled, python)
    return compiled


def test_the_extension_is_built() -> None:
    """make test builds it (Debian's gcc and Python headers): the daemon's samples use it."""
    assert scan.COMPILED


@pytest.mark.parametrize("name", ["snmp", "netstat"])
def test_table_plan_reads_every_wanted_field(name: str) -> None:
    data = (PROC / name).read_bytes()
    wanted = [(c.section, c.field) for c in PROTOCOL_COUNTERS if c.file == name]
    plan, found = scan.table_plan(data, wanted)
    lines = data.decode().splitlines()
    naive = {}
    for head, values in zip(lines[0::2], lines[1::2]):
        section = head.split(":")[0]
        naive.update({(section, f): int(v) for f, v in zip(head.split()[1:], values.split()[1:])})
    assert found == [i for i, w in enumerate(wanted) if w in naive]
    assert both(plan, data) == tuple(naive[wanted[i]] for i in found)


@pytest.mark.parametrize("name", ["dev", "host-dev"])
def test_dev_plan_reads_every_interface(name: str) -> None:
    data = (PROC / name).read_bytes()
    plan, names = scan.dev_plan(data)
    values = both(plan, data)
    parsed = parse_net_dev(data)
    assert names == list(parsed) and values == tuple(v for n in names for v in parsed[n])


def test_dev_counter_glued_to_the_colon() -> None:
    """/proc/net/dev prints a counter of more than 8 digits right after the colon."""
    data = (b"Inter-|   Receive\n face |bytes\n    lo:       10       1    0    0    0     0          0         0       10       1    0    0    0     0       0          0\n"
            b"  eth0:123456789012   2000    3    4    5     6          7         8   987654     3000    9   10   11    12      13         14\n")
    plan, names = scan.dev_plan(data)
    assert names == ["lo", "eth0"] and both(plan, data)[8:] == (123456789012, 2000, 3, 4, 987654, 3000, 9, 10)


def test_plans_refuse_another_shape() -> None:
    data = (PROC / "dev").read_bytes()
    plan, names = scan.dev_plan(data)
    renamed = data.replace(b"eth0:", b"eth1:")
    more = data + b"  eth9:  1  2  3  4  5  6  7  8  9  10  11  12  13  14  15  16\n"
    fewer = b"\n".join(line for line in data.split(b"\n") if b"lo:" not in line)
    for other in (renamed, more, fewer, data.replace(b" 0 ", b" x ", 1)):
        assert both(plan, other) is None
    snmp = (PROC / "snmp").read_bytes()
    plan, _ = scan.table_plan(snmp, [("Tcp", "RetransSegs")])
    shifted = snmp.replace(b"Tcp: RtoAlgorithm", b"Tcp: NewThing RtoAlgorithm").replace(b"\nTcp: ", b"\nTcp: 7 ", 1)
    assert both(plan, shifted) is None


def test_sockstat_pairs() -> None:
    data = (PROC / "sockstat").read_bytes() + (PROC / "sockstat6").read_bytes()
    plan, found = scan.pairs_plan(data, [(s, k) for s, k, _ in SOCKSTAT_WANTED])
    values = dict(zip((SOCKSTAT_WANTED[i][2] for i in found), both(plan, data)))
    assert set(values) == {"tcp", "time_wait", "udp", "raw", "tcp6", "udp6", "raw6"}


@pytest.mark.parametrize(
    ("token", "value"),
    [(b"0", 0), (b"18446744073709551615", 18446744073709551615), (b"18446744073709551616", None), (b"-1", -1),
     (b"-9223372036854775808", -9223372036854775808), (b"-9223372036854775809", None), (b"-", None), (b"1a", None), (b"123456789012345678901", None)],
)
def test_numbers_at_the_edges(token: bytes, value: int | None) -> None:
    data = b"Tcp: A B\nTcp: 1 " + token + b"\n"
    plan, _ = scan.table_plan(b"Tcp: A B\nTcp: 1 2\n", [("Tcp", "B")])
    assert both(plan, data) == (None if value is None else (value,))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_c_and_python_agree_on_any_bytes(data) -> None:
    """Whatever a file holds (a hostile namespace cannot write these, but a kernel can surprise),
    the two passes give the same answer and neither crashes."""
    base = data.draw(st.sampled_from(["snmp", "netstat", "dev", "sockstat"]))
    original = (PROC / base).read_bytes()
    if base == "dev":
        plan, _ = scan.dev_plan(original)
    elif base == "sockstat":
        plan, _ = scan.pairs_plan(original, [(s, k) for s, k, _ in SOCKSTAT_WANTED])
    else:
        plan, _ = scan.table_plan(original, [(c.section, c.field) for c in PROTOCOL_COUNTERS if c.file == base])
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(0, 6))):
        at = data.draw(st.integers(0, len(mutated)))
        mutated[at:at + data.draw(st.integers(0, 3))] = data.draw(st.binary(max_size=4))
    both(plan, bytes(mutated))
    both(plan, data.draw(st.binary(max_size=200)))
