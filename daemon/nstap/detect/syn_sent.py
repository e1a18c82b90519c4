"""Connections stuck in SYN_SENT: the peer does not answer."""

from __future__ import annotations

import math

from ..samples import NamespaceSample
from .base import Finding, Param

KIND = "tcp_syn_sent_stuck"
PARAMS = {"seconds": Param(3.0, 1.0, 3600.0, help="seconds a socket has waited in SYN_SENT")}


def retransmits_for(seconds: float) -> int:
    """SYN retransmits a socket has made once it has waited ``seconds`` (RTO 1 s, doubling)."""
    return max(1, math.ceil(math.log2(seconds + 1)))


class SynSentDetector:
    """Trips when a SYN_SENT socket has retransmitted its SYN as often as waiting ``seconds`` takes
    (1 s, then 2, 4 ... between tries). Read from the socket walk, which the watcher runs early when
    TcpExt TCPSynRetrans moves. The onset is the first sample that saw a SYN retransmitted, less
    the one second the first retransmission waits: when the unanswered SYN was sent. (Later
    retransmissions come 1 s apart on kernels with ``tcp_syn_linear_timeouts``, 6.7 and newer, so
    the time waited is measured from the onset, not derived from the count.)"""

    kind = KIND

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.min_retransmits = retransmits_for(seconds)
        self._retrying_since: float | None = None

    def observe(self, sample: NamespaceSample) -> Finding | None:
        s = sample.sockets
        if s is None:
            return None
        retrans = s.syn_sent_max_retransmits
        if retrans < 1 or not s.tcp_states.get("syn_sent"):
            self._retrying_since = None
            return None
        if self._retrying_since is None:
            self._retrying_since = sample.taken_at - 1.0
        if retrans < self.min_retransmits:
            return None
        waited = round(sample.taken_at - self._retrying_since, 1)
        return Finding(
            KIND,
            f"{s.tcp_states['syn_sent']} socket(s) in SYN_SENT, one for about {waited:g}s ({retrans} SYN retransmits)",
            {"syn_sent": s.tcp_states["syn_sent"], "syn_retransmits": retrans, "waited_seconds": waited},
            started_at=self._retrying_since,
        )
