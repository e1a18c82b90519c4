"""What detectors have in common: the finding they report and how they read counters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..samples import NamespaceSample


@dataclass(frozen=True)
class Finding:
    """A detector saw something wrong in one sample: what, in one line, and the numbers that tripped it."""

    kind: str
    summary: str
    numbers: Mapping[str, Any] = field(default_factory=dict)


class Detector(Protocol):
    """Fed every sample of one namespace; returns a finding while the anomaly lasts, else None."""

    kind: str

    def observe(self, sample: NamespaceSample) -> Finding | None: ...


def increase(now: int, before: int | None) -> int:
    """How much a kernel counter went up (a counter that went down was reset: count from zero)."""
    if before is None:
        return 0
    return now - before if now >= before else now
