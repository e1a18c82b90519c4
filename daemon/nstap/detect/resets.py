"""RSTs sent, against the namespace's own baseline."""

from __future__ import annotations

from ..samples import NamespaceSample
from .base import Finding, Param, increase

KIND = "tcp_reset_spike"
PARAMS = {
    "factor": Param(5.0, 1.0, 1e6, help="times the namespace's usual rate"),
    "min_rate": Param(10.0, 0.0, 1e9, low_open=True, help="RSTs sent per second, at least"),
    "alpha": Param(0.05, 0.0, 1.0, low_open=True, help="weight of each new rate in the baseline"),
}


class ResetSpikeDetector:
    """Trips when RSTs sent per second reach ``factor`` times the namespace's usual rate (an EWMA of
    its own past, weight ``alpha``) and at least ``min_rate``. While it trips the baseline learns
    four times slower: a short storm barely moves it, a rate that stays becomes the new normal.
    The onset is the last sample before the storm: the one before the first sample of a run of
    spiking samples."""

    kind = KIND

    def __init__(self, factor: float, min_rate: float, alpha: float) -> None:
        self.factor = factor
        self.min_rate = min_rate
        self.alpha = alpha
        self.baseline = 0.0
        self._before: tuple[float, int] | None = None
        self._spike_since: float | None = None  # the sample before the current run of spikes

    def observe(self, sample: NamespaceSample) -> Finding | None:
        p = sample.protocols
        if p is None or "tcp_resets_sent" not in p:
            return None
        now = (sample.taken_at, p["tcp_resets_sent"])
        before, self._before = self._before, now
        if before is None or now[0] <= before[0]:
            return None
        resets = increase(now[1], before[1])
        rate = resets / (now[0] - before[0])
        baseline = self.baseline
        spike = rate >= self.min_rate and rate >= self.factor * baseline
        self.baseline += (self.alpha / 4 if spike else self.alpha) * (rate - baseline)
        if not spike:
            self._spike_since = None
            return None
        if self._spike_since is None:
            self._spike_since = before[0]
        return Finding(
            KIND,
            f"{rate:.0f} RST/s sent, usually {baseline:.1f}/s",
            {"rate": round(rate, 2), "baseline": round(baseline, 3), "resets": resets},
            started_at=self._spike_since,
        )
