"""Packets the kernel dropped in the namespace, by drop reason (the eBPF collector's counts).

The reasons a healthy host produces all the time are off by default (a socket closed with data
still queued, IPv6 disabled on an interface, the generic "not specified"...); every other reason
trips at ``min_increase`` drops since the last sample, or at its own threshold from ``reasons``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .. import labels as nstap_labels
from ..samples import NamespaceSample
from .base import Finding, Param, increase

KIND = "kernel_drops"
PARAMS = {"min_increase": Param(10.0, 1.0, 1e12, help="drops of one reason since the last sample")}
# Reasons a healthy host and container produce all the time (measured here under plain HTTP
# traffic: QUEUE_PURGE on every closed connection, IPV6DISABLED on the host), or that nstap's own
# captures cause: off unless the config turns them on.
QUIET_REASONS = frozenset({
    "NOT_SPECIFIED", "QUEUE_PURGE", "IPV6DISABLED", "SOCKET_CLOSE", "SOCKET_FILTER", "UNIX_DISCONNECT",
    "UNIX_SKIP_OOB", "OTHERHOST", "TCP_CLOSE", "UNHANDLED_PROTO",
})
_REASON = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
MAX_REASONS = 256


def check_reasons(value: object) -> dict[str, float | None]:
    """``reasons:`` of the config: reason name -> ``off`` (None), ``on`` (the default threshold, -1)
    or its own min_increase."""
    if not isinstance(value, Mapping):
        raise ValueError("kernel_drops.reasons must map reason names to off, on or a number")
    if len(value) > MAX_REASONS:
        raise ValueError(f"kernel_drops.reasons: at most {MAX_REASONS} reasons")
    out: dict[str, float | None] = {}
    for reason, setting in value.items():
        if not isinstance(reason, str) or not _REASON.match(reason):
            raise ValueError(f"kernel_drops.reasons: {reason!r} is not a drop reason name (like NO_SOCKET)")
        switch = nstap_labels.switch(setting) if isinstance(setting, str) else (setting if isinstance(setting, bool) else None)
        if switch is False:
            out[reason] = None
        elif switch is True:
            out[reason] = -1.0
        else:
            out[reason] = PARAMS["min_increase"].check(f"kernel_drops.reasons.{reason}", setting)  # type: ignore[arg-type]
    return out


class KernelDropDetector:
    """Trips when a reason that is not off grew by its threshold since the last sample; the onset
    is that last sample."""

    kind = KIND

    def __init__(self, min_increase: float, reasons: Mapping[str, float | None] | None = None) -> None:
        self.min_increase = min_increase
        self.thresholds: dict[str, float | None] = {r: None for r in QUIET_REASONS}
        for reason, value in (reasons or {}).items():
            self.thresholds[reason] = min_increase if value is not None and value < 0 else value
        self._before: Mapping[str, int] | None = None
        self._before_at = 0.0

    def observe(self, sample: NamespaceSample) -> Finding | None:
        now = sample.kernel_drops
        if now is None:
            return None
        before, self._before = self._before, now
        before_at, self._before_at = self._before_at, sample.taken_at
        if before is None:
            return None
        tripped = {}
        for reason, count in now.items():
            grew = increase(count, before.get(reason, 0))
            if not grew:
                continue
            threshold = self.thresholds.get(reason, self.min_increase)
            if threshold is not None and grew >= threshold:
                tripped[reason] = grew
        if not tripped:
            return None
        words = ", ".join(f"{r} {n}" for r, n in sorted(tripped.items(), key=lambda x: -x[1]))
        return Finding(KIND, f"the kernel dropped packets: {words}", tripped, started_at=before_at)
