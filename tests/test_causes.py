"""The cause of an anomaly from its window: pure rules as a table, and the vocabulary's bounds."""

from __future__ import annotations

import pytest

from nstap.detect.cause import KINDS, Cause, valid_kind
from nstap.detect.causes import Forward, Link, Listener, Peer, RuleHit, Window, explain

ETH0 = Link("eth0", "container", "veth1a", True, 1500, 0)
VETH = Link("veth1a", "host", "eth0", True, 1500, 0)
HTTP = Listener("80", 0, 128)
DROP_ACKS = RuleHit("filter", "INPUT", 1, "DROP", "-A INPUT -p tcp --dport 80 -m statistic --mode random --probability 0.3 -j DROP", 41)

# name: (window, cause kind, words the sentence must hold)
CASES = {
    "the container's firewall drops the clients' ACKs": (
        Window("tcp_retransmits", "web", counters={"tcp_retransmitted_segments": 30}, firewall=(DROP_ACKS,), firewall_rules=1,
               drops={"NETFILTER_DROP": 41}, links=(ETH0, VETH), listeners=(HTTP,)),
        "firewall_drop", ["filter INPUT rule 1", "--probability 0.3", "41 packets", "dropped"],
    ),
    "a REJECT rule": (
        Window("tcp_reset_spike", "web", firewall=(RuleHit("filter", "INPUT", 2, "REJECT", "-A INPUT -p tcp --dport 81 -j REJECT", 9),), firewall_rules=2),
        "firewall_drop", ["rejected 9 packets", "rule 2"],
    ),
    "netfilter drops, counters not read again yet": (
        Window("kernel_drops", "web", drops={"NETFILTER_DROP": 12}, firewall_rules=1),
        "firewall_drop", ["12 packets", "NETFILTER_DROP"],
    ),
    "a DROP rule that matched nothing in the window is no cause": (
        Window("tcp_retransmits", "web", firewall=(), firewall_rules=3, links=(ETH0, VETH)),
        "unknown", [],
    ),
    "a paused listener": (
        Window("tcp_listen_overflows", "web", counters={"tcp_listen_overflows": 20}, listeners=(Listener("80", 129, 128),), paused="web is paused (docker pause): its processes cannot accept connections"),
        "process_not_accepting", ["web is paused", "port 80 holds 129/128"],
    ),
    "a full accept queue, the process running": (
        Window("tcp_listen_overflows", "web", counters={"tcp_listen_overflows": 7}, listeners=(Listener("80", 5, 5), Listener("81", 0, 128))),
        "accept_queue_full", ["port 80", "5/5", "7 connections"],
    ),
    "overflows with the queue drained since": (
        Window("tcp_listen_overflows", "web", counters={"tcp_listen_overflows": 3}, listeners=(Listener("80", 1, 5),)),
        "accept_queue_full", ["3 connections overflowed"],
    ),
    "the host end of the veth down": (
        Window("interface_down", "web", links=(ETH0, VETH._replace(up=False))),
        "link_down", ["veth1a", "host end of eth0"],
    ),
    "a lowered MTU under large packets": (
        Window("interface_drops", "web", links=(ETH0._replace(mtu=1000, dropped=12), VETH)),
        "mtu", ["MTU 1000", "1500", "12 in the window"],
    ),
    "MTUs that differ but lose nothing do not explain retransmissions": (
        Window("tcp_retransmits", "web", links=(ETH0._replace(mtu=1400), VETH)),
        "unknown", [],
    ),
    "a deleted DNAT": (
        Window("nat_missing", "web", forwards=(Forward("tcp 0.0.0.0:8080 -> 172.17.0.2:80 missing", "missing", ""),)),
        "nat_missing", ["8080", "no DNAT rule"],
    ),
    "a shadowing DNAT": (
        Window("nat_shadowed", "web", forwards=(Forward("tcp 0.0.0.0:8080 -> 172.17.0.2:80 shadowed", "shadowed", "-A PREROUTING -p tcp --dport 8080 -j DNAT --to 10.9.9.9:80"),)),
        "nat_shadowed", ["earlier rule", "10.9.9.9"],
    ),
    "a NAT finding whose forward the monitor no longer lists": (
        Window("nat_stale", "web", numbers={"broken": ["tcp *:8080 -> 172.17.0.9:80 stale"], "rules": ["-A DOCKER ..."]}),
        "nat_stale", ["172.17.0.9", "no container has"],
    ),
    "conntrack full, as the host's own event": (
        Window("conntrack_full", "host", numbers={"entries": 256, "limit": 256, "ratio": 1.0}),
        "conntrack_full", ["256 of 256"],
    ),
    "a container's SYNs lost to a full conntrack table": (
        Window("tcp_syn_sent_stuck", "client", conntrack=(256, 256, 40)),
        "conntrack_full", ["dropped 40 flows"],
    ),
    "a busy but not full conntrack table is no cause": (
        Window("tcp_syn_sent_stuck", "client", conntrack=(100, 256, 0)),
        "unknown", [],
    ),
    "connections to a closed port (eBPF)": (
        Window("tcp_reset_spike", "web", counters={"tcp_resets_sent": 200, "tcp_established_resets": 0}, drops={"NO_SOCKET": 200}, listeners=(HTTP,)),
        "no_listener", ["200 packets", "NO_SOCKET", "listening: 80"],
    ),
    "connections to a closed port (no eBPF)": (
        Window("tcp_reset_spike", "web", counters={"tcp_resets_sent": 150, "tcp_established_resets": 0}, listeners=(HTTP,)),
        "no_listener", ["150 RSTs"],
    ),
    "resets of established connections are not a missing listener": (
        Window("tcp_reset_spike", "web", counters={"tcp_resets_sent": 150, "tcp_established_resets": 140}),
        "unknown", [],
    ),
    "a UDP socket that never reads": (
        Window("udp_receive_buffer_errors", "dns", counters={"udp_receive_buffer_errors": 500}),
        "socket_not_reading", ["500 UDP datagrams"],
    ),
    "retransmissions to a peer whose queue is full": (
        Window("tcp_retransmits", "client", peers=(Peer("web", "172.17.0.3:80", "20261203T000000Z-aa", "tcp_listen_overflows", "port 80's accept queue is full (129/128)"),)),
        "peer_anomaly", ["web (172.17.0.3:80)", "20261203T000000Z-aa", "accept queue is full"],
    ),
    "the server says so too": (
        Window("tcp_listen_overflows", "web", counters={"tcp_listen_overflows": 5}, listeners=(Listener("80", 129, 128),), clients=("client-1", "client-2")),
        "accept_queue_full", ["clients client-1, client-2 retransmit because of it"],
    ),
    "packets to a closed port as the kernel counts them": (
        Window("kernel_drops", "web", drops={"NO_SOCKET": 200, "QUEUE_PURGE": 3}, counters={"tcp_resets_sent": 200}, listeners=(HTTP,)),
        "no_listener", ["200 packets", "NO_SOCKET"],
    ),
    "a full UDP receive buffer as the kernel counts it": (
        Window("kernel_drops", "dns", drops={"SOCKET_RCVBUFF": 194}),
        "socket_not_reading", ["194 UDP datagrams"],
    ),
    "a new kernel drop reason": (
        Window("kernel_drops", "web", drops={"TCP_ZEROWINDOW": 30, "QUEUE_PURGE": 99}),
        "kernel_drop:TCP_ZEROWINDOW", ["30 packets", "TCP_ZEROWINDOW"],
    ),
    "only the reasons a healthy host has": (
        Window("tcp_retransmits", "web", drops={"QUEUE_PURGE": 99, "NOT_SPECIFIED": 3}),
        "unknown", [],
    ),
    "a paused container explains nothing about its link": (
        Window("interface_down", "web", links=(ETH0._replace(up=False), VETH), paused="web is paused (docker pause): its processes cannot accept connections"),
        "link_down", ["eth0"],
    ),
    "the detector's own cause wins over the window's": (
        Window("port_unreachable", "web", hint=Cause("nat_shadowed", "the probe reached another container"), firewall=(DROP_ACKS,), firewall_rules=1),
        "nat_shadowed", ["the probe reached another container"],
    ),
    "but a paused process wins over a full queue the detector saw": (
        Window("tcp_accept_stalled", "web", hint=Cause("accept_queue_full", "port 80 is full"), paused="web is paused (docker pause): its processes cannot accept connections"),
        "process_not_accepting", ["web is paused"],
    ),
    "nothing moved": (
        Window("tcp_retransmits", "web", counters={"tcp_retransmitted_segments": 9}, links=(ETH0, VETH), listeners=(HTTP,)),
        "unknown", [],
    ),
}


@pytest.mark.parametrize("window, kind, words", CASES.values(), ids=CASES.keys())
def test_cause(window: Window, kind: str, words: list[str]) -> None:
    cause = explain(window)
    assert cause.kind == kind, cause
    assert valid_kind(cause.kind)
    for word in words:
        assert word in cause.text, (word, cause.text)
    assert cause.text and "\n" not in cause.text


def test_the_vocabulary_is_bounded() -> None:
    assert valid_kind("kernel_drop:NO_SOCKET") and all(valid_kind(k) for k in KINDS)
    for bad in ("kernel_drop:", "kernel_drop:no socket", "kernel_drop:" + "X" * 65, "firewall", "kernel_drops:NO_SOCKET", 'x"}'):
        assert not valid_kind(bad), bad
