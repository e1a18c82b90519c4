"""Traffic that collapsed while the namespace kept retrying or dropping: clients gave up.

When a fault makes clients give up, the connections a namespace completes (Tcp PassiveOpens) and
the segments it receives (Tcp InSegs) fall sharply, while what the fault causes goes on:
retransmissions (RetransSegs, TCPSynRetrans), listen drops, kernel drops of a reason that is not
off by default. A retransmission *ratio* cannot rise then (there is nothing left to divide by);
the fall itself, against the namespace's own recent rates, can be seen at once.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..samples import NamespaceSample
from .base import Finding, Param, increase
from .kernel_drops import QUIET_REASONS

KIND = "tcp_collapse"
PARAMS = {
    "fall": Param(0.8, 0.0, 1.0, low_open=True, help="share of the usual rate that is gone"),
    "min_connections": Param(2.0, 0.0, 1e9, low_open=True, help="usual completed connections/s, at least (else segments decide)"),
    "min_segments": Param(20.0, 0.0, 1e12, low_open=True, help="usual segments received/s, at least (else connections decide)"),
    "min_errors": Param(2.0, 1.0, 1e12, help="retransmissions and drops since the fall began, at least"),
    "alpha": Param(0.2, 0.0, 1.0, low_open=True, help="weight of each new interval in the usual rates"),
}
WARMUP = 3  # intervals of history before a rate counts as usual
DEPART = 0.75  # an interval below this share of the usual rate has departed from it (where the onset is)
TROUBLE = ("tcp_retransmitted_segments", "tcp_syn_retransmits", "tcp_listen_drops")
_RETRANSMITTED, _SYN_RETRANSMITS, _LISTEN_DROPS = TROUBLE  # named for trouble(), written out (a TROUBLE of another length fails here)


def trouble(protocols: Mapping[str, int], drops: Mapping[str, int] | None) -> int:
    """Retransmissions, listen drops and kernel drops of a reason that is not quiet, so far."""
    get = protocols.get
    total = get(_RETRANSMITTED, 0) + get(_SYN_RETRANSMITS, 0) + get(_LISTEN_DROPS, 0)  # once per sample of every namespace: no generator
    if drops:
        for reason, n in drops.items():
            if reason not in QUIET_REASONS:
                total += n
    return total


class CollapseDetector:
    """Trips when completed connections or received segments per second fell by ``fall`` of their
    usual rate (an EWMA of the namespace's own intervals, weight ``alpha``, at least
    ``min_connections`` / ``min_segments`` a second) while retransmissions or drops went on: some
    in this interval, ``min_errors`` since the fall began. A fall with nothing going wrong is
    only less traffic: the usual rates learn it (four times slower than healthy intervals). The
    onset is the last sample before the run of intervals below DEPART of the usual rate.

    A fault that begins late in an interval leaves its rates near the usual but puts its first
    errors there: the errors of the interval just before the run count towards ``min_errors``, and
    the onset is then the sample before that interval."""

    kind = KIND

    def __init__(self, fall: float, min_connections: float, min_segments: float, min_errors: float, alpha: float) -> None:
        self.fall = fall
        self.min_connections = min_connections
        self.min_segments = min_segments
        self.min_errors = min_errors
        self.alpha = alpha
        self.usual = [0.0, 0.0]  # completed connections/s, segments received/s
        self.intervals = 0
        self._before: tuple[float, int, int, int] | None = None
        self._departed_since: float | None = None
        self._errors_since_departure = 0
        self._lead: tuple[float, int] = (0.0, 0)  # the last interval that did not depart: (its start, its errors)

    def observe(self, sample: NamespaceSample) -> Finding | None:
        p = sample.protocols
        if p is None or "tcp_passive_opens" not in p or "tcp_segments_received" not in p:
            return None
        now = (sample.taken_at, p["tcp_passive_opens"], p["tcp_segments_received"], trouble(p, sample.kernel_drops))
        before, self._before = self._before, now
        if before is None or now[0] <= before[0]:
            return None
        seconds = now[0] - before[0]
        rates = (increase(now[1], before[1]) / seconds, increase(now[2], before[2]) / seconds)
        errors = increase(now[3], before[3])
        usual = list(self.usual)
        departed = fallen = False
        if self.intervals >= WARMUP:  # written out for the two rates: this runs for every sample of every namespace
            (connections, segments), (usual_connections, usual_segments) = rates, usual
            if usual_connections >= self.min_connections:
                departed = connections < DEPART * usual_connections
                fallen = connections <= (1 - self.fall) * usual_connections
            if usual_segments >= self.min_segments:
                departed = departed or segments < DEPART * usual_segments
                fallen = fallen or segments <= (1 - self.fall) * usual_segments
        self._learn(rates, departed, errors)
        if not departed:
            self._departed_since, self._errors_since_departure = None, 0
            self._lead = (before[0], errors)
            return None
        if self._departed_since is None:
            lead_start, lead_errors = self._lead
            self._departed_since, self._errors_since_departure = (lead_start, lead_errors) if lead_errors else (before[0], 0)
        self._errors_since_departure += errors
        if not fallen or errors == 0 or self._errors_since_departure < self.min_errors:
            return None
        return Finding(
            KIND,
            f"completed connections fell to {rates[0]:.1f}/s (usually {usual[0]:.1f}/s), segments received to {rates[1]:.0f}/s "
            f"(usually {usual[1]:.0f}/s), while {self._errors_since_departure} retransmissions or drops went on",
            {
                "connections_per_second": round(rates[0], 2), "usual_connections_per_second": round(usual[0], 2),
                "segments_per_second": round(rates[1], 1), "usual_segments_per_second": round(usual[1], 1),
                "errors": self._errors_since_departure,
            },
            started_at=self._departed_since,
        )

    def _learn(self, rates: tuple[float, float], departed: bool, errors: int) -> None:
        """Healthy intervals move the usual rates; a fall without errors slowly (less traffic is
        not a fault); a fall with errors not at all (that is the fault)."""
        self.intervals += 1
        if self.intervals <= WARMUP:  # the first intervals: a plain mean
            weight = 1.0 / self.intervals
        elif not departed:
            weight = self.alpha
        elif errors == 0:
            weight = self.alpha / 4
        else:
            return
        usual = self.usual
        self.usual = [usual[0] + weight * (rates[0] - usual[0]), usual[1] + weight * (rates[1] - usual[1])]
