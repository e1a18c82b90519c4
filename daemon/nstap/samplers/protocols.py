"""Protocol sampler: TCP, UDP and IP counters from the namespace's /proc/net/snmp and /proc/net/netstat.

These files hold pairs of lines, a header ("Tcp: RtoAlgorithm RtoMin ...") and its values. Where
each wanted field's value is, and which header tokens must stay what they are, is a scan plan
learnt once per file shape (:mod:`nstap.netns.scan`); a sample is one ``pread`` and one pass over
the bytes per file, and nothing at all is parsed when neither file changed by a byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..netns.handles import NamespaceHandles, ProcFile
from ..netns.scan import table_plan


@dataclass(frozen=True, slots=True)
class ProtocolCounter:
    """One exported kernel counter: where it is read and what it is called."""

    file: str  # "snmp" or "netstat"
    section: str  # "Tcp", "TcpExt", ...
    field: str  # the kernel's name
    key: str  # nstap's name; the metric is nstap_<key>[_total]
    help: str
    gauge: bool = False


PROTOCOL_COUNTERS: tuple[ProtocolCounter, ...] = (
    ProtocolCounter("snmp", "Ip", "InHdrErrors", "ip_receive_header_errors", "IP datagrams discarded for header errors (Ip InHdrErrors)."),
    ProtocolCounter("snmp", "Ip", "InAddrErrors", "ip_receive_address_errors", "IP datagrams discarded for a bad destination address (Ip InAddrErrors)."),
    ProtocolCounter("snmp", "Ip", "InDiscards", "ip_receive_discards", "Received IP datagrams discarded for lack of resources (Ip InDiscards)."),
    ProtocolCounter("snmp", "Ip", "OutDiscards", "ip_send_discards", "Outgoing IP datagrams discarded for lack of resources (Ip OutDiscards)."),
    ProtocolCounter("snmp", "Ip", "OutNoRoutes", "ip_no_route_discards", "Outgoing IP datagrams discarded because no route was found (Ip OutNoRoutes)."),
    ProtocolCounter("snmp", "Tcp", "ActiveOpens", "tcp_active_opens", "TCP connections opened by this namespace (Tcp ActiveOpens)."),
    ProtocolCounter("snmp", "Tcp", "PassiveOpens", "tcp_passive_opens", "TCP connections accepted by this namespace (Tcp PassiveOpens)."),
    ProtocolCounter("snmp", "Tcp", "AttemptFails", "tcp_attempt_fails", "TCP connection attempts that failed (Tcp AttemptFails)."),
    ProtocolCounter("snmp", "Tcp", "EstabResets", "tcp_established_resets", "Established or close-wait TCP connections reset (Tcp EstabResets)."),
    ProtocolCounter("snmp", "Tcp", "CurrEstab", "tcp_established_connections", "TCP connections in ESTABLISHED or CLOSE_WAIT now (Tcp CurrEstab).", gauge=True),
    ProtocolCounter("snmp", "Tcp", "InSegs", "tcp_segments_received", "TCP segments received (Tcp InSegs)."),
    ProtocolCounter("snmp", "Tcp", "OutSegs", "tcp_segments_sent", "TCP segments sent, excluding retransmissions (Tcp OutSegs)."),
    ProtocolCounter("snmp", "Tcp", "RetransSegs", "tcp_retransmitted_segments", "TCP segments retransmitted (Tcp RetransSegs)."),
    ProtocolCounter("snmp", "Tcp", "InErrs", "tcp_receive_errors", "TCP segments received in error (Tcp InErrs)."),
    ProtocolCounter("snmp", "Tcp", "OutRsts", "tcp_resets_sent", "TCP segments sent with the RST flag (Tcp OutRsts)."),
    ProtocolCounter("snmp", "Udp", "InDatagrams", "udp_received_datagrams", "UDP datagrams delivered (Udp InDatagrams)."),
    ProtocolCounter("snmp", "Udp", "OutDatagrams", "udp_sent_datagrams", "UDP datagrams sent (Udp OutDatagrams)."),
    ProtocolCounter("snmp", "Udp", "NoPorts", "udp_no_port_datagrams", "UDP datagrams received for a port nobody listens on (Udp NoPorts)."),
    ProtocolCounter("snmp", "Udp", "InErrors", "udp_receive_errors", "UDP datagrams that could not be delivered (Udp InErrors)."),
    ProtocolCounter("snmp", "Udp", "RcvbufErrors", "udp_receive_buffer_errors", "UDP datagrams dropped because the receive buffer was full (Udp RcvbufErrors)."),
    ProtocolCounter("snmp", "Udp", "SndbufErrors", "udp_send_buffer_errors", "UDP datagrams dropped because the send buffer was full (Udp SndbufErrors)."),
    ProtocolCounter("netstat", "TcpExt", "ListenOverflows", "tcp_listen_overflows", "Connections dropped because a listener's accept queue was full (TcpExt ListenOverflows)."),
    ProtocolCounter("netstat", "TcpExt", "ListenDrops", "tcp_listen_drops", "Connection requests dropped by listeners for any reason (TcpExt ListenDrops)."),
    ProtocolCounter("netstat", "TcpExt", "TCPBacklogDrop", "tcp_backlog_drops", "TCP segments dropped because the socket backlog was full (TcpExt TCPBacklogDrop)."),
    ProtocolCounter("netstat", "TcpExt", "TCPTimeouts", "tcp_timeouts", "TCP retransmission timer expirations (TcpExt TCPTimeouts)."),
    ProtocolCounter("netstat", "TcpExt", "TCPSynRetrans", "tcp_syn_retransmits", "SYN and SYN-ACK retransmissions (TcpExt TCPSynRetrans)."),
    ProtocolCounter("netstat", "TcpExt", "TCPAbortOnTimeout", "tcp_aborts_on_timeout", "TCP connections aborted after too many retransmissions (TcpExt TCPAbortOnTimeout)."),
    ProtocolCounter("netstat", "TcpExt", "TCPRcvQDrop", "tcp_receive_queue_drops", "TCP segments dropped because the receive queue was full (TcpExt TCPRcvQDrop)."),
)


class TableLayout:
    """Where each wanted counter sits in one shape of an snmp/netstat file: a scan plan."""

    __slots__ = ("plan", "keys")

    def __init__(self, data: bytes, wanted: tuple[ProtocolCounter, ...]) -> None:
        self.plan, found = table_plan(data, [(c.section, c.field) for c in wanted])
        self.keys = tuple(wanted[i].key for i in found)  # a counter this kernel lacks is left out

    def read(self, data: bytes) -> dict[str, int] | None:
        """The counters in ``data``; None if the file no longer has this shape."""
        values = self.plan.scan(data)
        return None if values is None else dict(zip(self.keys, values))


def parse_tables(data: bytes, wanted: tuple[ProtocolCounter, ...], layout: TableLayout | None) -> tuple[dict[str, int], TableLayout]:
    """Parse one snmp/netstat file, reusing ``layout`` while it still fits; returns (values, layout)."""
    if layout is not None:
        values = layout.read(data)
        if values is not None:
            return values, layout
    layout = TableLayout(data, wanted)
    values = layout.read(data)
    if values is None:  # a wanted field whose value is not a number
        raise ValueError("unreadable counters")
    return values, layout


_BY_FILE = {
    name: tuple(c for c in PROTOCOL_COUNTERS if c.file == name) for name in ("snmp", "netstat")
}


class RoundCounters:
    """This round's counters of every namespace, read in one pass before the round
    (:mod:`nstap.ebpf.mibs`): namespace inode -> values in :attr:`keys` order, and namespace inode
    -> sockets in use in :attr:`socket_keys` order (the socket sampler's); empty when there is no
    such pass, or it was not read for this round (the samplers read the files then)."""

    __slots__ = ("keys", "values", "socket_keys", "sockets")

    def __init__(self) -> None:
        self.keys: tuple[str, ...] = ()
        self.values: dict[int, tuple[int, ...]] = {}
        self.socket_keys: tuple[str, ...] = ()
        self.sockets: dict[int, tuple[int, ...]] = {}

    def clear(self) -> None:
        """The round is done: a sample outside it reads the files."""
        self.values = {}
        self.sockets = {}


class ProtocolSampler:
    """The counters of :data:`PROTOCOL_COUNTERS` for one namespace: from the round's pass when it
    has this namespace, else from its files."""

    name = "protocols"

    def __init__(self, handles: NamespaceHandles, round_counters: RoundCounters | None = None) -> None:
        self._inode = handles.inode
        self._round = round_counters or RoundCounters()
        self._passed: tuple[int, ...] | None = None  # the pass's values behind _last, if they came from one
        self._files: list[tuple[ProcFile, tuple[ProtocolCounter, ...]]] = [
            (handles.proc[name], wanted) for name, wanted in _BY_FILE.items()
        ]
        self._layouts: list[TableLayout | None] = [None] * len(self._files)
        self._raw: list[bytes] = [b""] * len(self._files)
        self._parts: list[dict[str, int]] = [{} for _ in self._files]
        self._last: dict[str, int] = {}

    def sample(self) -> dict[str, int]:
        """The round's pass for this namespace, the previous dict again if it did not change; else
        read both files now, the previous dict again when neither changed by a byte (and a file
        that did not change is not parsed again)."""
        passed = self._round.values.get(self._inode)
        if passed is not None:
            if passed != self._passed:
                self._passed, self._last = passed, dict(zip(self._round.keys, passed))
                self._raw = [b""] * len(self._files)  # the files' next read is parsed
            return self._last
        self._passed = None
        raw = [f.read() for f, _ in self._files]
        if raw == self._raw:
            return self._last
        out: dict[str, int] = {}
        for n, (_f, wanted) in enumerate(self._files):
            if raw[n] != self._raw[n]:
                self._parts[n], self._layouts[n] = parse_tables(raw[n], wanted, self._layouts[n])
            out.update(self._parts[n])
        self._raw, self._last = raw, out
        return out
