"""Interface errors and drops, on either side of the veth."""

from __future__ import annotations

from ..samples import NamespaceSample
from .base import Finding, Param, increase

KIND = "interface_drops"
PARAMS = {"min_increase": Param(1.0, 1.0, 1e12, help="errors and drops, summed over both directions, since the last sample")}


class InterfaceErrorDetector:
    """Trips when any interface's receive/transmit errors or drops went up by ``min_increase``,
    the host end of the container's veths included (drops there are the ones people miss). The
    onset is the last sample before they went up."""

    kind = KIND

    def __init__(self, min_increase: float) -> None:
        self.min_increase = min_increase
        self._before: dict[tuple[str, str], tuple[int, int, int, int]] = {}
        self._last = None
        self._last_at = 0.0  # the previous sample's time (an unchanged sample included)

    def observe(self, sample: NamespaceSample) -> Finding | None:
        interfaces = sample.interfaces
        if interfaces is None:
            return None
        before_at, self._last_at = self._last_at, sample.taken_at
        if interfaces is self._last:  # nothing moved anywhere since the last sample
            return None
        self._last = interfaces
        before = self._before
        now = {}
        moved = []
        for i in interfaces:
            key = (i.name, i.side)
            counts = now[key] = (i.rx_errors, i.rx_drops, i.tx_errors, i.tx_drops)
            old = before.get(key)
            if old is None or old == counts:  # the usual case: nothing to add up
                continue
            deltas = [increase(n, o) for n, o in zip(counts, old)]
            if sum(deltas) >= self.min_increase:
                moved.append((i.name, i.side, deltas))
        self._before = now
        if not moved:
            return None
        parts = [f"{name} ({side}): rx_err +{d[0]} rx_drop +{d[1]} tx_err +{d[2]} tx_drop +{d[3]}" for name, side, d in moved]
        numbers = {f"{name}.{side}.{what}": d[k] for name, side, d in moved for k, what in enumerate(("rx_errors", "rx_drops", "tx_errors", "tx_drops"))}
        return Finding(KIND, "; ".join(parts), numbers, started_at=before_at)
