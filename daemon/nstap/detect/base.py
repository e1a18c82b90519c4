"""What detectors have in common: the finding they report and how they read counters."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..samples import NamespaceSample
from .cause import Cause


@dataclass(frozen=True)
class Param:
    """One detector parameter: its default and the values it accepts.

    The bounds exclude every value that would make the detector trip on a healthy, idle
    namespace (an increase of 0, a ratio of 0): they hold for the config and for labels alike.
    """

    default: float
    low: float
    high: float
    low_open: bool = False  # True: ``low`` itself is refused (a ratio must be > 0, not >= 0)
    help: str = ""

    def check(self, name: str, value: float) -> float:
        """``value`` as a float if it is allowed; ValueError saying what is allowed otherwise."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number")
        too_low = value <= self.low if self.low_open else value < self.low
        if too_low or value > self.high:
            left = "(" if self.low_open else "["
            raise ValueError(f"{name} must be in {left}{self.low:g}, {self.high:g}]")
        return float(value)


@dataclass(frozen=True)
class Finding:
    """A detector saw something wrong in one sample: what, in one line, the numbers that tripped it,
    and its onset.

    ``started_at`` is the detector's estimate of when the fault began (wall clock): the sample
    from which the counters that tripped it departed from their baseline — for a counter, the
    last sample before it grew; for a state, when the state was first seen. None means "at this
    sample". Captures start their window from it, so the pcap holds the packets from before the
    fault began, not only from before it was noticed.
    """

    kind: str
    summary: str
    numbers: Mapping[str, Any] = field(default_factory=dict)
    started_at: float | None = None
    cause: Cause | None = None  # set by a detector that knows why (else inferred: :mod:`.causes`)


class Detector(Protocol):
    """Fed every sample of one namespace; returns a finding while the anomaly lasts, else None."""

    kind: str

    def observe(self, sample: NamespaceSample) -> Finding | None: ...


def increase(now: int, before: int | None) -> int:
    """How much a kernel counter went up (a counter that went down was reset: count from zero)."""
    if before is None:
        return 0
    return now - before if now >= before else now
