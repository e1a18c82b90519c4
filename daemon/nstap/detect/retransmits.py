"""TCP retransmission rate: retransmitted / sent segments, over a long and a short sliding window."""

from __future__ import annotations

from collections import deque

from ..samples import NamespaceSample
from .base import Finding, Param
from .steady import NewSteadyCounter

KIND = "tcp_retransmits"
PARAMS = {
    "threshold": Param(0.05, 0.0, 1.0, low_open=True, help="share of segments that were retransmissions"),
    "window": Param(10.0, 1.0, 3600.0, help="seconds of the long window"),
    "min_segments": Param(10.0, 1.0, 1e12, help="segments over the long window, at least"),
    "short_window": Param(2.0, 0.5, 600.0, help="seconds of the short window (a fault that just began)"),
    "short_min_segments": Param(30.0, 1.0, 1e12, help="segments over the short window, at least"),
    "min_retransmits": Param(2.0, 1.0, 1e12, help="retransmitted segments over either window, at least"),
    "steady_rate": Param(3.0, 0.0, 1e12, low_open=True, help="retransmissions/s, after `baseline` s without any"),
    "steady_seconds": Param(2.0, 1.0, 3600.0, help="seconds they keep coming, every interval"),
    "baseline": Param(30.0, 2.0, 86400.0, help="seconds without a retransmission before they start"),
}
SLACK = 0.25  # share of an interval a sample may come early (sampling jitter)
TCP_RTO_MIN = 0.2  # seconds: a lost segment is retransmitted at least this long after it was sent
SHORT_SLACK = 1.25  # the short window's reference sample may be this much older (sampling jitter)


class RetransmitDetector:
    """Trips when at least ``threshold`` of the segments sent were retransmissions, over the long
    window (``window`` seconds, at least ``min_segments`` segments) or the short one (the last
    ``short_window`` seconds, at least ``short_min_segments`` segments).

    The long window catches a steady, moderate loss; the short one catches a fault that just
    began under steady traffic, whose retransmissions the healthy segments of the long window
    would dilute for seconds. Both need a minimum of segments, so two retransmits of three
    segments on an idle connection are not an incident, and ``min_retransmits`` of them: one
    retransmission among a quiet container's 16 segments (on a busy host) is 6 %, and not an
    incident either; a fault's own come at once (a lost ACK's segment is resent after 0.2, 0.6,
    1.4 s: two within a sample or two of the fault).

    A fault that makes clients give up collapses the traffic the ratio divides by, so
    retransmissions are also measured against the namespace's own baseline: none for ``baseline``
    seconds, then some in every interval for ``steady_seconds`` at ``steady_rate`` a second or
    more is news whatever the ratio (its onset: the last sample before they started).

    The onset is the last sample before the run of intervals whose own retransmission ratio
    reached the threshold, less TCP's minimum retransmission timeout (the segments it resends were
    sent that much earlier).
    """

    kind = KIND

    def __init__(
        self, threshold: float, window: float, min_segments: float, short_window: float = 2.0, short_min_segments: float = 30.0,
        steady_rate: float = 3.0, steady_seconds: float = 2.0, baseline: float = 30.0, min_retransmits: float = 2.0,
    ) -> None:
        self.threshold = threshold
        self.min_retransmits = min_retransmits
        self.steady_rate = steady_rate
        self.steady_seconds = steady_seconds
        self._steady = NewSteadyCounter(baseline)
        self.window = window
        self.min_segments = min_segments
        self.short_window = short_window
        self.short_min_segments = short_min_segments
        self._points: deque[tuple[float, int, int]] = deque()  # (time, retransmitted, sent)

    def observe(self, sample: NamespaceSample) -> Finding | None:
        p = sample.protocols
        if p is None or "tcp_retransmitted_segments" not in p or "tcp_segments_sent" not in p:
            return None
        now = sample.taken_at
        retrans_now, sent_now = p["tcp_retransmitted_segments"], p["tcp_segments_sent"]
        points = self._points
        if points and (retrans_now < points[-1][1] or sent_now < points[-1][2]):
            points.clear()  # counters went back: start again
        self._steady.observe(now, retrans_now - points[-1][1] if points else 0)
        points.append((now, retrans_now, sent_now))
        # Keep one point at or before the long window's start, to measure the whole window.
        while len(points) > 2 and points[1][0] <= now - self.window:
            points.popleft()
        if len(points) < 2 or points[0][1] == retrans_now:  # nothing retransmitted in the whole window
            return None
        tripped = self._rate(points[0], "long") or self._rate(self._short_reference(now), "short")
        if tripped is None:
            return self._new_steady(now - points[-2][0])
        rate, retrans, total, seconds, which = tripped
        return Finding(
            KIND,
            f"{rate:.1%} of TCP segments retransmitted over {seconds:.0f}s ({retrans} of {total})",
            {"rate": round(rate, 4), "retransmitted": retrans, "segments": total, "seconds": round(seconds, 1), "window": which},
            started_at=self._onset(),
        )

    def _new_steady(self, interval: float) -> Finding | None:
        run = self._steady.run()
        if run is None or run.seconds < self.steady_seconds - SLACK * interval or run.rate < self.steady_rate:
            return None
        return Finding(
            KIND,
            f"{run.events} TCP segments retransmitted in {run.seconds:.0f}s ({run.rate:.1f}/s), none before",
            {"retransmitted": run.events, "rate_per_second": round(run.rate, 2), "seconds": round(run.seconds, 1), "window": "new"},
            started_at=run.since - TCP_RTO_MIN,
        )

    def _short_reference(self, now: float) -> tuple[float, int, int]:
        """The oldest point within the short window (with slack for jitter); at least the previous one."""
        earliest = now - self.short_window * SHORT_SLACK
        points = self._points
        for i in range(len(points) - 2, -1, -1):
            if points[i][0] < earliest:
                return points[min(i + 1, len(points) - 2)]
        return points[0]

    def _rate(self, ref: tuple[float, int, int], which: str) -> tuple[float, int, int, float, str] | None:
        t0, r0, s0 = ref
        t1, r1, s1 = self._points[-1]
        retrans, sent = r1 - r0, s1 - s0
        total = sent + retrans
        least = self.min_segments if which == "long" else self.short_min_segments
        if total < least or retrans == 0 or retrans < self.min_retransmits:
            return None
        rate = retrans / total
        if rate < self.threshold:
            return None
        return rate, retrans, total, t1 - t0, which

    def _onset(self) -> float:
        """The last sample before the run of intervals whose own retransmission ratio reached the
        threshold (one interval below it inside the run is allowed: backed-off retransmission
        timers skip samples), less TCP_RTO_MIN. Measured against the threshold, not against zero:
        a namespace that always retransmits a little has a baseline, and the fault is where it
        departed from it."""
        points = self._points
        start = len(points) - 1
        quiet = 0
        for i in range(len(points) - 1, 0, -1):
            retrans = points[i][1] - points[i - 1][1]
            total = retrans + points[i][2] - points[i - 1][2]
            if retrans > 0 and retrans >= self.threshold * total:
                start, quiet = i - 1, 0
            else:
                quiet += 1
                if quiet > 1:
                    break
        return points[start][0] - TCP_RTO_MIN
