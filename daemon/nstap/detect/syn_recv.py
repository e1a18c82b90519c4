"""Half-open connections on the server side: SYN-ACKs retransmitted, handshakes never completed.

The twin of ``tcp_syn_sent_stuck``, seen from the listener. When the client's final ACK never
arrives (SYN-ACKs dropped on the way back, the client's ACKs dropped in this namespace's firewall)
the listener retransmits its SYN-ACK (TcpExt TCPSynRetrans: 1 s after the first, and again at each
retransmitted SYN) while Tcp PassiveOpens, the handshakes it completed, stands still.

Read from two counters every sample, no socket walk: TCPSynRetrans also counts this namespace's
own SYN retransmissions as a client, so they are taken for SYN-ACKs only in a namespace with a
listener that opened no connection of its own over the window (ActiveOpens still), or whose last
socket walk, within the window, found connections in SYN_RECV and none in SYN_SENT.
"""

from __future__ import annotations

from collections import deque

from ..samples import NamespaceSample
from .base import Finding, Param, increase

KIND = "tcp_syn_recv_stuck"
PARAMS = {
    "min_retransmits": Param(3.0, 1.0, 1e12, help="SYN-ACK retransmissions over the window (one lost SYN-ACK makes 2)"),
    "window": Param(2.0, 1.0, 600.0, help="seconds over which they are counted"),
    "share": Param(0.5, 0.0, 1.0, low_open=True, help="retransmissions / (retransmissions + completed handshakes) of the last interval, at least"),
}
SYNACK_RTO = 1.0  # seconds: a SYN-ACK is first retransmitted this long after it was sent
MAX_POINTS = 64


class HalfOpenDetector:
    """Trips when a listener's namespace retransmitted ``min_retransmits`` SYN-ACKs over the last
    ``window`` seconds and, in the last interval, they are at least ``share`` of those plus the
    handshakes it completed (the window would still count the handshakes of before the fault).
    The onset is the last sample before the run of intervals with SYN-ACK retransmissions, less
    the second the first one waits: when the SYN-ACK that got no answer was sent."""

    kind = KIND

    def __init__(self, min_retransmits: float, window: float, share: float) -> None:
        self.min_retransmits = min_retransmits
        self.window = window
        self.share = share
        self._points: deque[tuple[float, int, int, int]] = deque()  # (time, syn retransmits, passive opens, active opens)
        self._since: float | None = None  # the sample before the current run of intervals with SYN retransmissions

    def observe(self, sample: NamespaceSample) -> Finding | None:
        p = sample.protocols
        if p is None or "tcp_syn_retransmits" not in p or "tcp_passive_opens" not in p:
            return None
        now = sample.taken_at
        point = (now, p["tcp_syn_retransmits"], p["tcp_passive_opens"], p.get("tcp_active_opens", 0))
        points = self._points
        previous = points[-1] if points else None
        if previous is not None and (point[1] < previous[1] or point[2] < previous[2] or point[3] < previous[3]):
            points.clear()  # counters went back: start again
            previous = None
        points.append(point)
        while len(points) > MAX_POINTS or (len(points) > 2 and points[1][0] <= now - self.window):
            points.popleft()
        if previous is None:
            return None
        if increase(point[1], previous[1]) == 0:
            self._since = None
            return None
        if self._since is None:
            self._since = previous[0]
        first = points[0]
        retrans, completed, opened = point[1] - first[1], point[2] - first[2], point[3] - first[3]
        last_retrans, last_completed = point[1] - previous[1], point[2] - previous[2]
        if retrans < self.min_retransmits or last_retrans < self.share * (last_retrans + last_completed):
            return None
        if not self._server_side(sample, opened, first[0]):
            return None
        s = sample.sockets
        waiting = s.tcp_states.get("syn_recv", 0) if s is not None and (s.states_at == 0 or s.states_at >= first[0]) else None
        ports = ", ".join(q.port for q in s.listen) if s is not None else ""
        return Finding(
            KIND,
            f"{retrans} SYN-ACKs retransmitted in {now - first[0]:.0f}s, {completed} handshakes completed"
            + (f" ({waiting} connections in SYN_RECV)" if waiting else "") + (f"; listening on {ports}" if ports else ""),
            {"syn_ack_retransmits": retrans, "handshakes_completed": completed, "syn_recv": waiting, "seconds": round(now - first[0], 1)},
            started_at=self._since - SYNACK_RTO,
        )

    @staticmethod
    def _server_side(sample: NamespaceSample, opened: int, since: float) -> bool:
        """Whether the SYN retransmissions are a listener's SYN-ACKs (see the module's docstring)."""
        s = sample.sockets
        if s is None or not any(q.sockets for q in s.listen):
            return False
        if opened == 0:
            return True
        fresh = s.states_at == 0 or s.states_at >= since
        return fresh and s.tcp_states.get("syn_recv", 0) > 0 and not s.tcp_states.get("syn_sent", 0)
