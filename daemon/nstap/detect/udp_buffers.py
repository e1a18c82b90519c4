"""UDP datagrams dropped because a socket's receive buffer was full."""

from __future__ import annotations

from ..samples import NamespaceSample
from .base import Finding, Param, increase

KIND = "udp_receive_buffer_errors"
PARAMS = {"min_increase": Param(1.0, 1.0, 1e12, help="errors since the last sample")}


class UdpBufferDetector:
    """Trips when Udp RcvbufErrors went up by ``min_increase`` since the last sample; the onset is
    that last sample."""

    kind = KIND

    def __init__(self, min_increase: float) -> None:
        self.min_increase = min_increase
        self._before: int | None = None
        self._before_at = 0.0

    def observe(self, sample: NamespaceSample) -> Finding | None:
        p = sample.protocols
        if p is None or "udp_receive_buffer_errors" not in p:
            return None
        now = p["udp_receive_buffer_errors"]
        before, self._before = self._before, now
        before_at, self._before_at = self._before_at, sample.taken_at
        errors = increase(now, before)
        if before is None or errors < self.min_increase:
            return None
        return Finding(KIND, f"{errors} UDP datagrams dropped for a full receive buffer", {"errors": errors}, started_at=before_at)
