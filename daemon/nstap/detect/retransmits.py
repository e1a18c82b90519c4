"""TCP retransmission rate: retransmitted / sent segments over a sliding window."""

from __future__ import annotations

from collections import deque

from ..samples import NamespaceSample
from .base import Finding, Param

KIND = "tcp_retransmits"
PARAMS = {
    "threshold": Param(0.05, 0.0, 1.0, low_open=True, help="share of segments that were retransmissions"),
    "window": Param(10.0, 1.0, 3600.0, help="seconds"),
    "min_segments": Param(10.0, 1.0, 1e12, help="segments over the window, at least"),
}


class RetransmitDetector:
    """Trips when at least ``threshold`` of the segments sent over ``window`` seconds were retransmissions
    (and at least ``min_segments`` were sent, so two retransmits of three segments are not an incident)."""

    kind = KIND

    def __init__(self, threshold: float, window: float, min_segments: float) -> None:
        self.threshold = threshold
        self.window = window
        self.min_segments = min_segments
        self._points: deque[tuple[float, int, int]] = deque()  # (time, retransmitted, sent)

    def observe(self, sample: NamespaceSample) -> Finding | None:
        p = sample.protocols
        if p is None or "tcp_retransmitted_segments" not in p or "tcp_segments_sent" not in p:
            return None
        now = sample.taken_at
        points = self._points
        points.append((now, p["tcp_retransmitted_segments"], p["tcp_segments_sent"]))
        # Keep one point at or before the window's start, to measure the whole window.
        while len(points) > 2 and points[1][0] <= now - self.window:
            points.popleft()
        t0, r0, s0 = points[0]
        retrans = p["tcp_retransmitted_segments"] - r0
        sent = p["tcp_segments_sent"] - s0
        if retrans < 0 or sent < 0:  # counters went back: start again
            points.clear()
            points.append((now, p["tcp_retransmitted_segments"], p["tcp_segments_sent"]))
            return None
        total = sent + retrans
        if total < self.min_segments or retrans == 0:
            return None
        rate = retrans / total
        if rate < self.threshold:
            return None
        return Finding(
            KIND,
            f"{rate:.1%} of TCP segments retransmitted over {now - t0:.0f}s ({retrans} of {total})",
            {"rate": round(rate, 4), "retransmitted": retrans, "segments": total, "seconds": round(now - t0, 1)},
        )
